"""Aligning embedding / LM-head rows across models whose vocabularies differ in size.

Rows ``[0, common)`` (common to every input and the output) are merged; rows beyond come
from the tokenizer source (the base model unless configured otherwise), so a merged model
keeps the vocabulary of the tokenizer it ships with. This assumes the shared rows mean the
same tokens (a fine-tune that *appended* tokens), which is how vocabularies usually grow.
``tokenizer_source: union`` re-maps rows token by token instead
(:mod:`hf_taskarith.merging.tokenizer_union`); with ``base`` or a model, rows are aligned by index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: tensor names treated as vocabulary-indexed (rows = tokens).
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|tok_embeddings|"
    r"output|shared|embeddings)\.weight$|(^|\.)lm_head\.bias$"
)


def is_vocab_tensor(name: str) -> bool:
    return bool(VOCAB_TENSOR.search(name))


def rows_differ_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True if two shapes agree everywhere except the first dimension."""
    return len(a) == len(b) >= 1 and a[1:] == b[1:] and a[0] != b[0]


@dataclass
class VocabAlignment:
    """What happened to one vocabulary tensor."""

    name: str
    base_rows: int
    input_rows: list[int]
    output_rows: int
    common_rows: int
    source_label: str

    def describe(self) -> str:
        extra = self.output_rows - self.common_rows
        return (f"{self.name}: base {self.base_rows} rows, inputs {self.input_rows}, output "
                f"{self.output_rows}; merged rows [0, {self.common_rows})"
                + (f", {extra} rows copied from {self.source_label}" if extra else ""))
