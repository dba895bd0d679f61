"""What a merge was asked to do (:class:`MergeSummary`) and what it did (:class:`MergeReport`).

Both are plain data, free of torch: the model card, ``merge_report.json`` and the copied
config/tokenizer files (:mod:`.output`) are written from them alone, by the streaming engine
and by the torch-free path (:mod:`.lite`) alike, so the two write identical side files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .vocab import VocabAlignment


@dataclass
class MergeReport:
    """What a merge did; rendered into the model card and logged."""

    merged: int = 0
    copied_non_float: list[str] = field(default_factory=list)
    vocab: list[VocabAlignment] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)           # "input: tensor (reason)"
    zero_for_missing: list[str] = field(default_factory=list)  # task vectors that do not cover a tensor
    fingerprint_mismatch: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"merged {self.merged} tensors"]
        if self.copied_non_float:
            parts.append(f"copied {len(self.copied_non_float)} non-float tensors from the base")
        parts += [v.describe() for v in self.vocab]
        if self.fingerprint_mismatch:
            parts.append("base fingerprint mismatch (allowed): " + "; ".join(self.fingerprint_mismatch))
        if self.skipped:
            parts.append(f"skipped (allowed): {'; '.join(self.skipped[:20])}"
                         + (f" ... ({len(self.skipped) - 20} more)" if len(self.skipped) > 20 else ""))
        if self.zero_for_missing:
            parts.append(f"{len(self.zero_for_missing)} tensors absent from a task vector were left unchanged by it")
        return "; ".join(parts)


@dataclass(frozen=True)
class MergeSummary:
    """The identity of a merge, as recorded next to its output.

    Attributes:
        method, description, reference: the merge method's registry entry.
        params: its resolved parameters (per-model ones as lists).
        seed: the seed of randomized methods.
        dtype: the requested output dtype name (``"bfloat16"``), or ``None`` for the base's.
        base_label, input_labels: how the base and each input were given.
        base_folder: the base checkpoint folder (its config is copied), if any.
        tokenizer_folder: the folder whose tokenizer files are copied, if any.
    """

    method: str
    description: str
    reference: str
    params: dict[str, Any]
    seed: int
    dtype: str | None
    base_label: str
    input_labels: list[str]
    base_folder: Path | None
    tokenizer_folder: Path | None
