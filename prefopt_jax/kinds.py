"""Kinds the config, the losses and the data share (a leaf: no imports, so reading a config imports no jax).

What a loss trains on and what a data source holds is one type (`InputKind`). Every loss reads pairs; a loss
of kind UNPAIRED reads each pair as a desirable and an undesirable example (as TRL's KTO trainer does) and
unpaired examples as they are; a loss of kind RANKED reads each pair as two ranked candidates and ranked sets
as they are."""

from __future__ import annotations

import enum


class InputKind(enum.Enum):
    PAIRS = "pairs"  # a prompt with a chosen and a rejected completion
    UNPAIRED = "unpaired"  # a prompt with one completion, labelled desirable or not
    RANKED = "ranked"  # a prompt with K scored completions

    def reads(self, data: InputKind) -> bool:
        """Whether a loss of this kind trains on examples of kind `data`."""
        return data is self or data is InputKind.PAIRS

    @property
    def noun(self) -> str:
        """The examples of this kind, as an error message names them."""
        return {"pairs": "pairs", "unpaired": "unpaired examples", "ranked": "ranked candidates"}[self.value]


# how a micro-batch's rows hold its examples: `padded` (a row per prompt and completion), `packed` (the prompt
# once and its completions after it, several examples per row), and each half of packed alone: `shared` (prefix
# sharing, an example per row) and `packed_unshared` (packing, each completion with its own prompt copy)
LAYOUTS = ("padded", "packed", "shared", "packed_unshared")
