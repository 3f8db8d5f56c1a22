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


def completions_of(e: Tokenized) -> list[Ids]:
    """A tokenised example's completions in order: chosen and rejected, the one completion, or the candidates."""
    if isinstance(e, TokenizedPair):
        return [e.chosen, e.rejected]
    if isinstance(e, TokenizedUnpaired):
        return [e.completion]
    if isinstance(e, TokenizedRanked):
        return list(e.responses)
    raise TypeError(f"cannot batch a {type(e).__name__}")


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
        self._template = _compiled_template(self.tokenizer) if self.use_chat_template else None

    def __getstate__(self) -> dict:  # to a tokenisation worker: the compiled template is rebuilt there
        return {**self.__dict__, "_template": None, "_fast_template": self._template is not None}

    def __setstate__(self, state: dict) -> None:
        fast = state.pop("_fast_template")
        self.__dict__.update(state)
        self._template = _compiled_template(self.tokenizer) if fast else None

    # ---- raw encoding ----------------------------------------------------------------------------

    def _messages(self, prompt: Messages | str) -> list[dict]:
        msgs = (("user", prompt),) if isinstance(prompt, str) else prompt
        return [{"role": r, "content": c} for r, c in msgs]

    def _dedupe_bos(self, ids: list[int]) -> list[int]:
        while self.bos is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos:
            ids = ids[1:]  # a template that writes BOS plus a tokenizer that adds one: keep exactly one
        return ids

    def _encode(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        """Token ids of many texts at once (the Rust tokenizer's batch encoder where there is one)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not special_tokens:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [_ids(x) for x in self.tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]]

    def texts(self, records: Sequence[Record]) -> list[tuple[str, list[str]] | str]:
        """Per record, the prompt's text (with the generation prompt) and each completion's text: what the
        template renders after the prompt; or, as a str, why the template cannot split them."""
        if not self.use_chat_template:
            return [
                ((r.prompt if isinstance(r.prompt, str) else "\n".join(c for _, c in r.prompt)), list(_completions(r)))
                for r in records
            ]
        prompts = [self._messages(r.prompt) for r in records]
        heads = self._render(prompts, generation_prompt=True)
        convos = [
            [*m, {"role": "assistant", "content": c}]
            for m, r in zip(prompts, records, strict=True)
            for c in _completions(r)
        ]
        fulls = iter(self._render(convos, generation_prompt=False))
        out: list[tuple[str, list[str]] | str] = []
        for head, r in zip(heads, records, strict=True):
            rendered = [next(fulls) for _ in _completions(r)]
            if all(full.startswith(head) for full in rendered):
                out.append((head, [full[len(head) :] for full in rendered]))
            else:
                out.append(
                    "the chat template renders prompt + completion without the generation prompt as its prefix, "
                    "so the completion boundary is unknown"
                )
        return out

    def _render(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        """The chat template's text of each conversation. Rendered by the Jinja template transformers compiles
        (2-3x faster than `apply_chat_template`'s per-call preparation), which is checked against
        `apply_chat_template` on the first conversation of every batch: any difference (a template reading
        something only transformers supplies) switches to `apply_chat_template` for good."""
        reference = lambda convs: self.tokenizer.apply_chat_template(
            convs, add_generation_prompt=generation_prompt, tokenize=False
        )
        if self._template is not None:
            kwargs = {**self.tokenizer.special_tokens_map, "add_generation_prompt": generation_prompt}
            fast = [self._template.render(messages=m, **kwargs) for m in conversations]
            if not conversations or fast[0] == reference(conversations[:1])[0]:
                return fast
            self._template = None
        return reference(conversations)

    # ---- truncation --------------------------------------------------------------------------------

    def _fit_prompt(self, ids: list[int], origin) -> tuple[np.ndarray, bool]:
        limit, cut = self.max_prompt_length, False
        if limit is not None and len(ids) > limit:
            ids, cut = (ids[-limit:] if self.prompt_truncation == "keep_end" else ids[:limit]), True
        if len(ids) >= self.max_length:
            raise DataError(
                f"{origin}: the prompt alone is {len(ids)} tokens, max_length is {self.max_length} "
                "(set max_prompt_length to truncate prompts)",
                "prompt too long",
            )
        return np.asarray(ids, np.int32), cut

    def _fit_completion(self, ids: list[int], prompt_len: int) -> tuple[np.ndarray, bool]:
        if self.eos is not None and self.eos not in ids:
            ids = [*ids, self.eos]
        limit = self.max_length - prompt_len
        if self.max_completion_length is not None:
            limit = min(limit, self.max_completion_length)
        return np.asarray(ids[:limit], np.int32), len(ids) > limit

    # ---- records -------------------------------------------------------------------------------------

    def encode(self, records: Sequence[Record]) -> list[Encoded]:
        """Many records at once: the templates rendered per record, the texts tokenised in one batch. The
        prompt and each completion are tokenised apart, as generation produces them (and as TRL does)."""
        texts = self.texts(records)
        ok = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        prompt_ids = self._encode([texts[i][0] for i in ok], special_tokens=not self.use_chat_template)
        flat = self._encode([c for i in ok for c in texts[i][1]], special_tokens=False)
        out: list[Encoded] = [
            Encoded(DataError(f"{r.origin}: {t}", "template mismatch")) if isinstance(t, str) else None
            for r, t in zip(records, texts, strict=True)
        ]
        at = 0
        for i, ids in zip(ok, prompt_ids, strict=True):
            n = len(texts[i][1])
            out[i] = self._fit(records[i], self._dedupe_bos(ids), flat[at : at + n])
            at += n
        return out

    def _fit(self, record: Record, prompt_ids: list[int], completion_ids: list[list[int]]) -> Encoded:
        try:
            prompt, cut_prompt = self._fit_prompt(prompt_ids, record.origin)
        except DataError as e:
            return Encoded(e)
        fitted = [self._fit_completion(ids, len(prompt)) for ids in completion_ids]
        cs = [c for c, _ in fitted]
        if isinstance(record, Pair):
            example: Tokenized = TokenizedPair(prompt, cs[0], cs[1], record.weight, record.origin)
        elif isinstance(record, Unpaired):
            example = TokenizedUnpaired(prompt, cs[0], record.label, record.weight, record.origin)
        else:
            example = TokenizedRanked(prompt, tuple(cs), record.scores, record.weight, record.origin)
        return Encoded(example, cut_prompt, sum(cut for _, cut in fitted))

    def __call__(self, record: Record, report: DataReport) -> Tokenized:
        """One record (raises its DataError)."""
        (encoded,) = self.encode([record])
        return encoded.add_to(report, on_error="raise")


def _compiled_template(tokenizer: Any):
    """The tokenizer's chat template compiled as transformers compiles it (None where it cannot be)."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template) if isinstance(template, str) else None
    except Exception:  # another transformers version, or a template it cannot compile: the slow path decides
        return None


def _completions(record: Record) -> tuple[str, ...]:
    if isinstance(record, Pair):
        return record.chosen, record.rejected
    if isinstance(record, Unpaired):
        return (record.completion,)
    assert isinstance(record, Ranked)
    return record.responses


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One record's outcome: its example (or why it cannot be used) and what truncation cut."""

    example: Tokenized | DataError
    truncated_prompt: bool = False
    truncated_completions: int = 0

    def add_to(self, report: DataReport, on_error: str) -> Tokenized | None:
        """Count it in the report; the example, or None for a dropped record (raises with on_error="raise")."""
        if isinstance(self.example, DataError):
            if on_error == "raise":
                raise self.example
            report.drop(self.example)
            return None
        if self.truncated_prompt:
            report.truncated["prompt"] += 1
        if self.truncated_completions:
            report.truncated["completion"] += self.truncated_completions
        return self.example


CHUNK = 512  # records per batch encode: large enough for the Rust encoder's threads, small enough to stream
