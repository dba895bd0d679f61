"""``tokenizer_source: union``: merge models whose tokenizers differ, over the union of their vocabularies.

The output tokenizer is the base model's, with every token of the other models it lacks
appended (regular tokens in the order the models are listed, each model's in id order; then
added / special tokens, with their settings from the first model that has them). Each model's
embedding and LM-head rows are then re-indexed by token string into the output vocabulary
(:func:`align_vocab_rows`), and the merge method combines the re-indexed tensors as usual. A
model that lacks a token gets, as in mergekit:

- nothing to lack: the token is in every model, each keeps its own row;
- the row of the only model that has it;
- else the base model's row, when the base has it;
- else the mean of the rows of the models that have it (summed in model order, then divided);
- zeros when no model has it (a token the tokenizer itself brings).

``config.json`` gets the new ``vocab_size``; the union tokenizer is saved with the model.

mergekit's union order depends on hash orders (a set of models, each tokenizer's vocabulary
dict), so its token ids can differ from ours run to run; the rows each *token* gets are the
same (``tests/test_tokenizer_union.py`` compares them token by token).

Note:
    Cost: loading each model's tokenizer (``transformers.AutoTokenizer``), and for each
    vocabulary tensor (embeddings, LM head) every model's tensor held at once, in float32,
    re-indexed (one gather per model). Other tensors stream as usual. A base tokenizer with
    tokens beyond its model's ``vocab_size`` is refused (mergekit strips them from BPE
    tokenizers).

Example:
    >>> import torch
    >>> a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[5.0], [7.0]])
    >>> # output tokens: 0 (both: a row 0, b row 1), 1 (only a: row 1), 2 (only b: row 0)
    >>> rows = [torch.tensor([0, 1, -1]), torch.tensor([1, -1, 0])]
    >>> [t.flatten().tolist() for t in align_vocab_rows([a, b], rows, base_index=None)]
    [[1.0, 2.0, 5.0], [7.0, 2.0, 5.0]]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeConfigError
from .sources import DeltaSource, Meta, ModelDelta, TensorSource
from .vocab import is_vocab_tensor


def align_vocab_rows(tensors: list[torch.Tensor], rows: list[torch.Tensor], *,
                     base_index: int | None) -> list[torch.Tensor]:
    """Re-index each model's vocabulary tensor into the output vocabulary (mergekit's rules).

    Args:
        tensors: each model's tensor, tokens along dimension 0 (same trailing shape).
        rows: for each model, a long tensor with one entry per output token: the token's row in
            that model, or ``-1`` where the model lacks it.
        base_index: which model is the base (its row is used for models lacking a token that
            several have), or ``None``.

    Returns:
        One float32 tensor per model, ``(len(rows[0]), *trailing shape)``.

    Note:
        Cost: one gather per model plus one pass for the fill rows; memory one output-sized
        float32 tensor per model.
    """
    present = torch.stack([r >= 0 for r in rows])           # (models, tokens)
    count = present.sum(0)
    gathered = [t.to(torch.float32)[r.clamp_min(0)] for t, r in zip(tensors, rows)]
    fill = torch.zeros_like(gathered[0])
    total = torch.zeros_like(gathered[0])
    for g, has in zip(gathered, present):                   # the mean, summed in model order
        total = torch.where(_rows(has, g), total + g, total)
    mean = total / count.clamp_min(1).to(torch.float32).view(-1, *([1] * (total.dim() - 1)))
    fill = torch.where(_rows(count > 1, mean), mean, fill)
    if base_index is not None:
        fill = torch.where(_rows((count > 1) & present[base_index], fill), gathered[base_index], fill)
    donor = present.to(torch.int64).argmax(0)               # the one model that has it, where count == 1
    only = torch.stack(gathered).gather(0, donor.view(1, -1, *([1] * (fill.dim() - 1))).expand(1, *fill.shape))[0]
    fill = torch.where(_rows(count == 1, fill), only, fill)
    return [torch.where(_rows(has, g), g, fill) for g, has in zip(gathered, present)]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-token mask broadcast over a tensor's trailing dimensions."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class UnionVocabulary:
    """The union tokenizer and, for each model (base first), each output token's row in it."""

    tokenizer: Any
    rows: list[torch.Tensor]
    vocab_sizes: list[int]

    @property
    def size(self) -> int:
        return len(self.rows[0])


def build_union_vocabulary(folders: list[Path], *, labels: list[str]) -> UnionVocabulary:
    """Load each model's tokenizer (the base's first) and build the union vocabulary.

    Raises:
        MergeConfigError: a model without a loadable tokenizer; a base tokenizer with tokens
            beyond its model's ``vocab_size``.
    """
    from transformers import AutoTokenizer

    toks, sizes = [], []
    for folder, label in zip(folders, labels):
        try:
            tok = AutoTokenizer.from_pretrained(folder, use_fast=True)
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, or broken tokenizer files
            raise MergeConfigError(f"tokenizer_source: union needs every model's tokenizer; {label} has none that "
                                   f"loads ({type(e).__name__}); save its tokenizer into that folder "
                                   "(tokenizer.save_pretrained) or use tokenizer_source: base.") from None
        toks.append(tok)
        sizes.append(_vocab_size(folder, tok))
    beyond = [t for t, i in toks[0].get_vocab().items() if i >= sizes[0]]
    if beyond:
        raise MergeConfigError(f"tokenizer_source: union: the base tokenizer ({labels[0]}) has {len(beyond)} tokens "
                               f"beyond its model's vocab_size {sizes[0]} (e.g. {beyond[:3]}); use a tokenizer that "
                               "matches the model.")
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes):
        specials = {i: info for i, info in tok.added_tokens_decoder.items() if i < size}
        contents = {info.content for info in specials.values()}
        for token, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if token not in contents and tok.get_vocab()[token] < size:
                regular.setdefault(token)
        for _, info in sorted(specials.items()):
            added.setdefault(info.content, info)
    out = AutoTokenizer.from_pretrained(folders[0], use_fast=True)  # a fresh copy of the base's
    base_vocab = out.get_vocab()
    for token in regular:
        if token not in base_vocab and token not in added:
            out.add_tokens(token)
    for info in added.values():
        if info.content not in base_vocab:
            out.add_tokens(info)
    vocab = out.get_vocab()
    rows = []
    for tok, size in zip(toks, sizes):
        theirs = tok.get_vocab()
        r = torch.full((len(vocab),), -1, dtype=torch.int64)
        for token, new_id in vocab.items():
            old = theirs.get(token)
            if old is not None and old < size:
                r[new_id] = old
        rows.append(r)
    return UnionVocabulary(out, rows, sizes)


def _vocab_size(folder: Path, tok: Any) -> int:
    cfg = folder / "config.json"
    if cfg.is_file():
        size = json.loads(cfg.read_text()).get("vocab_size")
        if isinstance(size, int):
            return size
    return len(tok.get_vocab())


class _Aligner:
    """The re-indexed vocabulary tensors of every model, one tensor name at a time (cached).

    Models are in mergekit's order (the inputs, then the base), so means are summed alike."""

    def __init__(self, sources: list[TensorSource], rows: list[torch.Tensor], base_index: int | None, size: int):
        self.sources, self.rows, self.base_index, self.size = sources, rows, base_index, size
        self._name: str | None = None
        self._tensors: list[torch.Tensor] = []

    def get(self, name: str, index: int) -> torch.Tensor:
        if name != self._name:
            self._tensors, self._name = [], None
            self._tensors = align_vocab_rows([s.get(name) for s in self.sources], self.rows,
                                             base_index=self.base_index)
            self._name = name
        return self._tensors[index]


class _UnionView(TensorSource):
    """A model whose vocabulary tensors are re-indexed into the union vocabulary (float32)."""

    fresh = False  # the re-indexed tensors are shared with the cache: the engine must copy them

    def __init__(self, source: TensorSource, aligner: _Aligner, index: int, size: int):
        self.source, self._aligner, self._index = source, aligner, index
        self.label, self.folder = source.label, source.folder
        self._vocab = {n for n in source.names() if is_vocab_tensor(n) and source.meta(n).shape[:1] == (size,)}

    def names(self) -> list[str]:
        return self.source.names()

    def meta(self, name: str) -> Meta:
        meta = self.source.meta(name)
        if name in self._vocab:
            return Meta((self._aligner.size, *meta.shape[1:]), meta.dtype)
        return meta

    def get(self, name: str) -> torch.Tensor:
        if name in self._vocab:
            return self._aligner.get(name, self._index)
        return self.source.get(name)

    def open_range(self, name: str):
        if name in self._vocab:
            return super().open_range(name)
        return self.source.open_range(name)

    def fingerprint(self) -> str:
        return self.source.fingerprint()


@dataclass
class UnionMerge:
    """The base and inputs of a merge, seen through the union vocabulary; see :func:`union_sources`."""

    base: TensorSource
    inputs: list[DeltaSource]
    vocab: UnionVocabulary

    def save_tokenizer(self, folder: Path) -> None:
        """Save the union tokenizer into ``folder`` (before the side files, so a ``chat_template``
        is written into it)."""
        self.vocab.tokenizer.save_pretrained(folder)

    def set_vocab_size(self, folder: Path) -> None:
        """Set ``vocab_size`` in ``folder``'s ``config.json`` to the union's size."""
        cfg_path = folder / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            cfg["vocab_size"] = self.vocab.size
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def union_sources(base: TensorSource, inputs: list[DeltaSource], *, base_given: bool) -> UnionMerge:
    """Views of the base and the inputs whose embedding and LM-head rows follow the union vocabulary.

    Args:
        base: the base model (or the first model standing in, ``base_given=False``).
        inputs: the merged models (checkpoint folders with tokenizers).
        base_given: whether ``base`` is a base model the user chose (its rows fill tokens that
            several models have); ``False`` for the first model standing in.

    Returns:
        A :class:`UnionMerge`: plan the merge with its ``base`` and ``inputs``; save its
        tokenizer into the output folder and set the output's ``vocab_size``.

    Raises:
        MergeConfigError: an input is a task vector or a model held in memory (no tokenizer),
            or a tokenizer is missing (:func:`build_union_vocabulary`).
    """
    for src in inputs:
        if not isinstance(src, ModelDelta) or src.source.folder is None:
            raise MergeConfigError(f"tokenizer_source: union needs every input to be a model checkpoint folder with "
                                   f"its tokenizer; {src.label} is not (a task vector or a model in memory).")
    if base.folder is None:
        raise MergeConfigError("tokenizer_source: union needs the base model as a checkpoint folder with its "
                               "tokenizer, not a model in memory.")
    # the models, in mergekit's order: the inputs, then the base (without one, the first input stands in)
    models = [src.source for src in inputs] + ([base] if base_given else [])
    first = len(models) - 1 if base_given else 0  # whose tokenizer the union starts from
    tok_order = [first] + [i for i in range(len(models)) if i != first]
    vocab = build_union_vocabulary([Path(models[i].folder) for i in tok_order],
                                   labels=[models[i].label for i in tok_order])
    rows = [vocab.rows[tok_order.index(i)] for i in range(len(models))]
    sizes = [vocab.vocab_sizes[tok_order.index(i)] for i in range(len(models))]
    aligner = _Aligner(models, rows, first if base_given else None, vocab.size)
    views = [_UnionView(m, aligner, i, sizes[i]) for i, m in enumerate(models)]
    base_view = views[first] if base_given else _UnionView(base, aligner, 0, sizes[0])
    return UnionMerge(base_view, [ModelDelta(v) for v in views[:len(inputs)]], vocab)
