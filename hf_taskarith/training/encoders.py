"""Sentence encoders: load a transformers encoder and its tokenizer, and turn texts into features.

Sentence features are the attention-masked mean of the last hidden states, the pooling
all-MiniLM-L6-v2 was trained with. :mod:`.heads` makes the frozen task heads that read
them, and :mod:`.frozen_head` fine-tunes an encoder through such a head with the Trainer.

Example:
    >>> encoder, tokenizer = load_encoder(folder), load_tokenizer(folder)
    >>> feats = encode(encoder, tokenizer, ["a text", "another"])     # (2, hidden)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TaskArithError

logger = logging.getLogger(__name__)


def progress_disabled(progress: bool) -> bool:
    """True when bars are off: ``progress=False`` or ``HF_HUB_DISABLE_PROGRESS_BARS=1``."""
    return not progress or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes")


def load_encoder(path: str | os.PathLike) -> nn.Module:
    """Load a transformers encoder (no task head, no pooler) from a checkpoint folder.

    Raises:
        TaskArithError: the folder does not hold a transformers model.
    """
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TaskArithError(f"{path} is not a transformers checkpoint folder ({e}).") from None
    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
    with quiet_transformers():  # the base's unused pooler weights are expected; loading is instant
        model = AutoModel.from_pretrained(path, config=config, dtype=torch.float32, **kwargs)
    return model.eval()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and per-file progress bars for the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``attention_mask`` is 1: ``(B, T, H) -> (B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embed(encoder: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence features of a tokenized batch (gradients flow if enabled)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"])


def length_sorted_batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int
                          ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(indices, padded batch)`` over ``texts`` grouped by length (little padding)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [{k: enc[k][i] for k in enc.keys()} for i in idx]
        yield idx, tokenizer.pad(rows, return_tensors="pt")


@torch.no_grad()
def encode(encoder: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64,
           progress: bool = False, desc: str = "encoding") -> torch.Tensor:
    """Sentence features ``(len(texts), hidden)`` in the order of ``texts`` (eval mode, no grad)."""
    was_training = encoder.training
    encoder.eval()
    out: torch.Tensor | None = None
    n_batches = (len(texts) + batch_size - 1) // batch_size
    batches = length_sorted_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length)
    for idx, batch in tqdm(batches, total=n_batches, desc=desc, unit="batch", leave=False,
                           disable=progress_disabled(progress)):
        feats = embed(encoder, batch).float()
        if out is None:
            out = feats.new_empty((len(texts), feats.shape[-1]))
        out[torch.tensor(idx)] = feats
    encoder.train(was_training)
    if out is None:
        raise ValueError("encode() needs at least one text.")
    return out
