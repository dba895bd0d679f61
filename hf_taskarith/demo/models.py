"""The demo's model: one shared encoder (fine-tuned) and a frozen head per task.

This is the closed-vocabulary setting of the task-arithmetic papers: every task keeps a
fixed classification head, so fine-tuning, and hence every task vector, lives entirely in
the shared encoder, and any edited encoder can be scored on every task by plugging in the
frozen heads. Heads are linear probes fitted on the frozen pre-trained features (default)
or random projections; either way they never change after they are made.

Sentence features are the attention-masked mean of the last hidden states, the pooling
all-MiniLM-L6-v2 was trained with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import NonFiniteError, TaskArithError

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"


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


def fit_linear_probe(features: torch.Tensor, labels: Sequence[int] | torch.Tensor, num_labels: int, *,
                     l2: float = 0.05, max_iter: int = 200,
                     scaling: Literal["per_feature", "global"] = "per_feature") -> nn.Linear:
    """Multinomial logistic regression on frozen features, returned as one ``nn.Linear``.

    Features are standardized for the fit and the standardization is folded into the
    layer, so it applies to raw features. Full-batch L-BFGS; deterministic. ``l2`` (on the
    standardized weights) is fairly strong by default: a probe that fits its training set
    perfectly leaves fine-tuning on the same examples almost no signal.

    ``scaling="per_feature"`` divides every centred feature by its own standard deviation;
    ``"global"`` divides all of them by one scale (their mean standard deviation), so the
    penalty treats all raw weights alike. Use ``"global"`` when many features are nearly
    constant (e.g. pooled ReLU6 features of a CNN on small images): per-feature scaling gives
    them huge weights, and fine-tuning, which moves such a feature a little, makes the
    logits explode.

    Note:
        Cost: ``max_iter`` full passes over a ``(n, hidden)`` matrix; well under a second
        for a few thousand 384-d features.
    """
    x = features.detach().double()
    y = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels), dtype=torch.long)
    if scaling == "per_feature":
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    elif scaling == "global":
        mu, sd = x.mean(0), x.std(0).mean().clamp_min(1e-12)
    else:
        raise ValueError(f"unknown scaling {scaling!r}; expected 'per_feature' or 'global'.")
    z = (x - mu) / sd
    w = torch.zeros(num_labels, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], num_labels)
    with torch.no_grad():
        weight = w.detach() / sd
        head.weight.copy_(weight.float())
        head.bias.copy_((b.detach() - weight @ mu).float())
    return freeze(head)


def random_head(hidden: int, num_labels: int, *, generator: torch.Generator) -> nn.Linear:
    """A fixed random projection head (rows of unit norm scaled to give O(1) logits)."""
    head = nn.Linear(hidden, num_labels)
    with torch.no_grad():
        w = torch.randn(num_labels, hidden, generator=generator)
        head.weight.copy_(w / w.norm(dim=1, keepdim=True) * hidden ** 0.5)
        head.bias.zero_()
    return freeze(head)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def make_head(kind: Literal["probe", "random"], encoder: nn.Module, tokenizer, texts: Sequence[str],
              labels: Sequence[int], num_labels: int, *, generator: torch.Generator, max_length: int = 64,
              batch_size: int = 64, probe_l2: float = 0.05, progress: bool = False,
              desc: str = "probe") -> nn.Linear:
    """A frozen head for one task, made from the *pre-trained* encoder."""
    if kind == "probe":
        feats = encode(encoder, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                       progress=progress, desc=desc)
        return fit_linear_probe(feats, labels, num_labels, l2=probe_l2)
    if kind == "random":
        hidden = int(encoder.config.hidden_size)
        return random_head(hidden, num_labels, generator=generator)
    raise ValueError(f"unknown head kind {kind!r}; expected 'probe' or 'random'.")


def save_heads(heads: Mapping[str, nn.Linear], label_names: Mapping[str, Sequence[str]], folder: str | os.PathLike) -> Path:
    """Write every head to ``heads.safetensors`` (keys ``<task>.weight``/``<task>.bias``) + a JSON config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for task, head in heads.items():
        for k, v in head.state_dict().items():
            if not torch.isfinite(v).all():
                raise NonFiniteError(f"head of task {task!r}: {k} has NaN/inf.")
            tensors[f"{task}.{k}"] = v.detach().contiguous()
    tmp = folder / (HEADS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "hf_taskarith.demo_heads"})
    os.replace(tmp, folder / HEADS_FILE)
    cfg = {t: {"labels": list(label_names[t]), "hidden_size": int(h.in_features)} for t, h in heads.items()}
    (folder / HEADS_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def load_heads(folder: str | os.PathLike) -> dict[str, nn.Linear]:
    """Read heads written by :func:`save_heads` (frozen)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / HEADS_CONFIG).read_text())
    tensors = load_file(str(folder / HEADS_FILE))
    heads = {}
    for task, info in cfg.items():
        head = nn.Linear(info["hidden_size"], len(info["labels"]))
        head.load_state_dict({"weight": tensors[f"{task}.weight"], "bias": tensors[f"{task}.bias"]})
        heads[task] = freeze(head)
    return heads
