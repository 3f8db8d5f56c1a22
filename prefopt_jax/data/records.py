"""Preference rows in every common format, recognised and normalised into three record types.

Formats (auto-detected per source, or forced with `format=`):
  standard      {"prompt": str, "chosen": str, "rejected": str}
  conversational {"prompt": [messages], "chosen": str | [assistant message], "rejected": ...}
  implicit      {"chosen": [messages], "rejected": [messages]}: the shared prefix is the prompt
  unpaired      {"prompt": ..., "completion": ..., "label": bool}          (KTO, BCO)
  ranked        {"prompt": ..., "responses": [str, ...], "scores": [float, ...]}   (RRHF)
Optional everywhere: "system" (a system prompt) and "weight" (a per-example weight).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)
FORMATS = ("standard", "conversational", "implicit", "unpaired", "ranked")
# the roles chat templates render; anything else would be trained on as whatever the template makes of it
ROLES = ("system", "user", "assistant", "tool")
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "developer": "system"}


class DataError(ValueError):
    """A row that cannot be used; the message names the file (or source) and the row, and `reason` is a
    short category used to count rows skipped on request."""

    def __init__(self, message: str, reason: str = "invalid row"):
        super().__init__(message)
        self.reason = reason


class Origin(typing.NamedTuple):
    """Where a row came from, said the way its source counts: a text file's 1-based line, a table's (or hub
    dataset's, or .json list's) 1-based row, an in-memory list's Python index. (A named tuple: a cached
    source of a million rows makes a million of them.)"""

    source: str
    index: int  # 0-based position within the source
    unit: str = "row"  # "line" | "row" | "index"

    def __str__(self) -> str:
        if self.unit == "index":
            return f"{self.source}[{self.index}]"
        return f"{self.source}, {self.unit} {self.index + 1}"


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: Messages | str  # str: a raw-text prompt (no chat template)
    chosen: str
    rejected: str
    weight: float
    origin: Origin


@dataclasses.dataclass(frozen=True)
class Unpaired:
    prompt: Messages | str
    completion: str
    label: bool
    weight: float
    origin: Origin


@dataclasses.dataclass(frozen=True)
class Ranked:
    prompt: Messages | str
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    weight: float
    origin: Origin


Record = Pair | Unpaired | Ranked


def detect_format(row: Mapping[str, Any]) -> str:
    keys = set(row)
    if {"responses", "scores"} <= keys:
        return "ranked"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys:
            return "implicit"
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    raise KeyError(
        f"cannot tell the format from the keys {sorted(keys)}: expected prompt/chosen/rejected, "
        "chosen/rejected (implicit prompt), prompt/completion/label, or prompt/responses/scores"
    )


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):
        msg = value[0]
        if msg.get("role") != "assistant":
            raise DataError(f"`{what}` as a message list must be one assistant message, got role {msg.get('role')!r}")
        return _text(msg.get("content"), what)
    raise DataError(f"`{what}` must be a string (or one assistant message), got {type(value).__name__}")


def _messages(value: Any, what: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"`{what}` must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"`{what}[{i}]` must be a {{'role', 'content'}} message, got {m!r:.80}")
        if not isinstance(m["content"], str):
            raise DataError(f"`{what}[{i}].content` must be a string, got {type(m['content']).__name__}")
        if m["role"] not in ROLES:
            hint = f" (rename {m['role']!r} to {ROLE_HINTS[m['role']]!r})" if m["role"] in ROLE_HINTS else ""
            raise DataError(
                f"`{what}[{i}].role` is {m['role']!r}, which chat templates do not know; expected one of "
                f"{', '.join(ROLES)}{hint}",
                "unknown role",
            )
        out.append((str(m["role"]), m["content"]))
    return tuple(out)


def _prompt(row: Mapping[str, Any]) -> Messages | str:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("`prompt` is empty")
        base: Messages | str = prompt
    else:
        base = _messages(prompt, "prompt")
    system = row.get("system")
    if system is None:
        return base
    if not isinstance(system, str):
        raise DataError(f"`system` must be a string, got {type(system).__name__}")
    if isinstance(base, str):
        base = (("user", base),)
    return (("system", system), *base)


def _weight(row: Mapping[str, Any]) -> float:
    w = row.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise DataError(f"`weight` must be a non-negative number, got {w!r}")
    return float(w)


def _split_implicit(chosen: Messages, rejected: Messages) -> tuple[Messages, str, str]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError("implicit-prompt row: chosen and rejected share no leading messages")
    rest_c, rest_r = chosen[n:], rejected[n:]
    for rest, what in ((rest_c, "chosen"), (rest_r, "rejected")):
        if len(rest) != 1 or rest[0][0] != "assistant":
            raise DataError(f"implicit-prompt row: `{what}` must end in exactly one assistant turn after the prompt")
    return chosen[:n], rest_c[0][1], rest_r[0][1]


ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"  # Anthropic HH-RLHF's turn markers


def _split_transcripts(chosen: str, rejected: str) -> tuple[Messages | str, str, str]:
    """Whole transcripts as plain strings (Anthropic HH-RLHF as published): each is split at its last
    "\n\nAssistant:", the text before it is the prompt (the same in both) and the text after it the answer. A
    character-level common prefix would move the first words both answers share into the prompt. A prompt in
    HH's turns ("\n\nHuman: ... \n\nAssistant: ...") becomes chat messages, so the chat template applies."""
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        which = "chosen" if cut_c < 0 else "rejected"
        raise DataError(f"implicit-prompt row: `{which}` is a string with no {ASSISTANT.strip()!r} turn to split at")
    prompt = chosen[:cut_c]
    if rejected[:cut_r] != prompt:
        raise DataError("implicit-prompt row: chosen and rejected differ before their last assistant turn")
    answer = lambda text, cut: text[cut + len(ASSISTANT) :].removeprefix(" ")
    return _hh_messages(prompt), answer(chosen, cut_c), answer(rejected, cut_r)


def _hh_messages(prompt: str) -> Messages | str:
    """HH's "\n\nHuman: ...\n\nAssistant: ..." turns as messages (ending with a user turn), or the text as it is."""
    if not prompt.startswith(HUMAN):
        return prompt
    turns, role, rest, found = [], "user", prompt[len(HUMAN) :], True
    while found:
        text, found, rest = rest.partition(ASSISTANT if role == "user" else HUMAN)
        turns.append((role, text.strip()))
        role = "assistant" if role == "user" else "user"
    if turns[-1][0] != "user" or not all(text for _, text in turns):
        return prompt
    return tuple(turns)


def normalize(row: Any, fmt: str, origin: Origin) -> Record:
    """One row as a record; a DataError names the origin and what is wrong."""
    try:
        if not isinstance(row, Mapping):
            raise DataError(f"a row must be a JSON object, got {type(row).__name__}")
        if fmt == "implicit" and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
            prompt, chosen, rejected = _split_transcripts(row["chosen"], row["rejected"])
            record: Record = Pair(prompt, chosen, rejected, _weight(row), origin)
        elif fmt == "implicit":
            prompt, chosen, rejected = _split_implicit(
                _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
            )
            record = Pair(prompt, chosen, rejected, _weight(row), origin)
        elif fmt in ("standard", "conversational") and all(
            isinstance(row[k], list) and len(row[k]) > 1 for k in ("chosen", "rejected")
        ):  # whole conversations (UltraFeedback-style, e.g. princeton-nlp/*-ultrafeedback*): their shared turns
            # are the prompt, as chat messages, and the `prompt` column is its text
            prompt, chosen, rejected = _split_implicit(
                _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
            )
            record = Pair(prompt, chosen, rejected, _weight(row), origin)
        elif fmt in ("standard", "conversational"):
            record = Pair(
                _prompt(row), _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected"), _weight(row), origin
            )
        elif fmt == "unpaired":
            label = row["label"]
            if not isinstance(label, bool):
                raise DataError(f"`label` must be true or false, got {label!r}")
            record = Unpaired(_prompt(row), _text(row["completion"], "completion"), label, _weight(row), origin)
        elif fmt == "ranked":
            responses, scores = row["responses"], row["scores"]
            if not isinstance(responses, Sequence) or not isinstance(scores, Sequence) or len(responses) < 2:
                raise DataError("`responses` and `scores` must be lists with at least two entries")
            if len(responses) != len(scores):
                raise DataError(f"{len(responses)} responses but {len(scores)} scores")
            texts = tuple(_text(r, f"responses[{i}]") for i, r in enumerate(responses))
            if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
                raise DataError("`scores` must be numbers")
            record = Ranked(_prompt(row), texts, tuple(float(s) for s in scores), _weight(row), origin)
        else:
            raise DataError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    except KeyError as e:
        raise DataError(f"{origin}: missing field {e.args[0]!r} for the {fmt} format", "missing field") from None
    except DataError as e:
        raise DataError(f"{origin}: {e}", e.reason) from None
    _check_content(record)
    return record


def _check_content(r: Record) -> None:
    if isinstance(r, Pair):
        if not r.chosen.strip() or not r.rejected.strip():
            which = "chosen" if not r.chosen.strip() else "rejected"
            raise DataError(f"{r.origin}: empty {which} completion", "empty completion")
        if r.chosen == r.rejected:
            raise DataError(f"{r.origin}: chosen and rejected are identical", "identical pair")
    elif isinstance(r, Unpaired) and not r.completion.strip():
        raise DataError(f"{r.origin}: empty completion", "empty completion")
