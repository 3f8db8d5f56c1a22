"""Uploading an export to the Hugging Face hub (`prefopt-jax export --push-to-hub REPO`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class HubError(RuntimeError):
    """The hub cannot be reached or written to; the message says how to fix it."""


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def preflight(repo: str) -> Any:
    """An `HfApi` that can push to `repo`, checked before the export does any work."""
    if "/" not in repo:
        raise HubError(f"--push-to-hub {repo!r}: expected a repository id such as user/name")
    if _offline():
        raise HubError(
            f"--push-to-hub {repo}: the hub is offline here (HF_HUB_OFFLINE is set); export without "
            f"--push-to-hub and upload the folder later (`huggingface-cli upload {repo} DIR`)"
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.whoami()
    except Exception as e:  # no network, no token or a bad one: all mean "cannot push"
        raise HubError(
            f"--push-to-hub {repo}: cannot use the hub ({type(e).__name__}: {e}); check the network and log in "
            "(`huggingface-cli login` or HF_TOKEN)"
        ) from None
    return api


def upload(api: Any, repo: str, folder: Path) -> str:
    """The folder as one commit to `repo` (a model repository, created if missing); returns its URL."""
    api.create_repo(repo, repo_type="model", exist_ok=True)
    return str(api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="prefopt_jax export"))
