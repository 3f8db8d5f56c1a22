"""Records to token ids with the model's chat template. The prompt is encoded once per record (with the
generation prompt that marks the completion boundary), so chosen and rejected share the same prompt
tokens by construction; each completion is what the template adds after it, ending in EOS."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from prefopt_jax.data.records import DataError, Messages, Origin, Pair, Ranked, Record, Unpaired
from prefopt_jax.data.sources import DataReport

Ids = np.ndarray  # int32 [n]


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt: Ids
    chosen: Ids
    rejected: Ids
    weight: float
    origin: Origin


@dataclasses.dataclass(frozen=True)
class TokenizedUnpaired:
    prompt: Ids
    completion: Ids
    label: bool
    weight: float
    origin: Origin


@dataclasses.dataclass(frozen=True)
class TokenizedRanked:
    prompt: Ids
    responses: tuple[Ids, ...]
    scores: tuple[float, ...]
    weight: float
    origin: Origin


Tokenized = TokenizedPair | TokenizedUnpaired | TokenizedRanked


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@dataclasses.dataclass
class Encoder:
    """Encodes records for one tokenizer. `max_length` bounds prompt + one completion; the prompt is cut
    to `max_prompt_length` (keeping its end, where the question is, unless `prompt_truncation` is
    "keep_start") and completions to `max_completion_length` and to what fits (keeping their start)."""

    tokenizer: Any
    max_length: int = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    prompt_truncation: str = "keep_end"
    use_chat_template: bool | None = None  # None: when the tokenizer has one

    def __post_init__(self) -> None:
        if self.prompt_truncation not in ("keep_end", "keep_start"):
            raise ValueError(f"prompt_truncation must be 'keep_end' or 'keep_start', got {self.prompt_truncation!r}")
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.eos = self.tokenizer.eos_token_id
        self.bos = self.tokenizer.bos_token_id

    # ---- raw encoding ----------------------------------------------------------------------------

    def _messages(self, prompt: Messages | str) -> list[dict]:
        msgs = (("user", prompt),) if isinstance(prompt, str) else prompt
        return [{"role": r, "content": c} for r, c in msgs]

    def _dedupe_bos(self, ids: list[int]) -> list[int]:
        while self.bos is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos:
            ids = ids[1:]  # a template that writes BOS plus a tokenizer that adds one: keep exactly one
        return ids

    def encode_prompt(self, prompt: Messages | str) -> list[int]:
        if self.use_chat_template:
            ids = _ids(self.tokenizer.apply_chat_template(self._messages(prompt), add_generation_prompt=True))
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(c for _, c in prompt)
            ids = _ids(self.tokenizer(text))
        return self._dedupe_bos(ids)

    def encode_completion(self, prompt: Messages | str, prompt_ids: list[int], completion: str, origin) -> list[int]:
        if self.use_chat_template:
            convo = [*self._messages(prompt), {"role": "assistant", "content": completion}]
            full = self._dedupe_bos(_ids(self.tokenizer.apply_chat_template(convo)))
            if full[: len(prompt_ids)] != prompt_ids:
                raise DataError(
                    f"{origin}: the chat template renders prompt + completion without the generation prompt as "
                    "its prefix, so the completion boundary is unknown",
                    "template mismatch",
                )
            ids = full[len(prompt_ids) :]
        else:
            ids = _ids(self.tokenizer(completion, add_special_tokens=False))
        if self.eos is not None and self.eos not in ids:
            ids = [*ids, self.eos]
        return ids

    # ---- truncation --------------------------------------------------------------------------------

    def _fit_prompt(self, ids: list[int], origin, report: DataReport) -> np.ndarray:
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            ids = ids[-limit:] if self.prompt_truncation == "keep_end" else ids[:limit]
            report.truncated["prompt"] += 1
        if len(ids) >= self.max_length:
            raise DataError(
                f"{origin}: the prompt alone is {len(ids)} tokens, max_length is {self.max_length} "
                "(set max_prompt_length to truncate prompts)",
                "prompt too long",
            )
        return np.asarray(ids, np.int32)

    def _fit_completion(self, ids: list[int], prompt_len: int, report: DataReport) -> np.ndarray:
        limit = self.max_length - prompt_len
        if self.max_completion_length is not None:
            limit = min(limit, self.max_completion_length)
        if len(ids) > limit:
            ids = ids[:limit]
            report.truncated["completion"] += 1
        return np.asarray(ids, np.int32)

    # ---- records -------------------------------------------------------------------------------------

    def __call__(self, record: Record, report: DataReport) -> Tokenized:
        raw_prompt = self.encode_prompt(record.prompt)
        prompt = self._fit_prompt(raw_prompt, record.origin, report)

        def completion(text: str) -> np.ndarray:
            ids = self.encode_completion(record.prompt, raw_prompt, text, record.origin)
            return self._fit_completion(ids, len(prompt), report)

        if isinstance(record, Pair):
            chosen, rejected = completion(record.chosen), completion(record.rejected)
            return TokenizedPair(prompt, chosen, rejected, record.weight, record.origin)
        if isinstance(record, Unpaired):
            return TokenizedUnpaired(prompt, completion(record.completion), record.label, record.weight, record.origin)
        assert isinstance(record, Ranked)
        return TokenizedRanked(
            prompt, tuple(completion(r) for r in record.responses), record.scores, record.weight, record.origin
        )


def tokenize_records(
    records: Sequence[Record], encoder: Encoder, report: DataReport, on_error: str = "raise", check: bool = True
) -> list[Tokenized]:
    """Encode every record; rows that cannot be encoded raise, or are dropped and counted on request."""
    out = []
    for record in records:
        try:
            out.append(encoder(record, report))
        except DataError as e:
            if on_error == "raise":
                raise
            report.drop(e.reason)
    if check:
        report.check()
    return out
