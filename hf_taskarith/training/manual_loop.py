"""A hand-written fine-tuning loop (encoder learns, frozen head), kept for the benchmarks only.

The demo and the examples fine-tune with :class:`~hf_taskarith.training.LinearizedTrainer`
(:func:`hf_taskarith.training.frozen_head.train_encoder`). This loop stays because
``benchmarks/vision_tasks.py`` runs its own image loop on :func:`shuffled_batches` and
:func:`warmup_linear_decay` (batches drawn without replacement, a batch may span two epochs),
and ``on_step`` (called after *every* optimizer step) serves callers that score or snapshot
the model at each step.

Plain PyTorch (AdamW, linear warm-up then linear decay, gradient clipping), deterministic on
CPU for a given seed, with no state on disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import NonFiniteError
from .encoders import embed, progress_disabled
from .tasks import Split

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune_encoder` reports."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list, repr=False)


def warmup_linear_decay(opt: torch.optim.Optimizer, steps: int,
                        warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate rising linearly over the first ``ceil(warmup_ratio * steps)`` steps, then
    falling linearly to zero at ``steps``."""
    warmup = int(math.ceil(warmup_ratio * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` examples: drawn without replacement, reshuffled
    each epoch (a batch may span two epochs)."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def finetune_encoder(encoder: nn.Module, head: nn.Module, tokenizer, train: Split, *, steps: int,
                     batch_size: int = 32, learning_rate: float = 5e-5, weight_decay: float = 0.0,
                     warmup_ratio: float = 0.1, max_length: int = 64, max_grad_norm: float = 1.0,
                     seed: int = 0, progress: bool = True, desc: str = "fine-tuning",
                     on_step: Callable[[int], None] | None = None) -> FinetuneResult:
    """Fine-tune ``encoder`` in place on ``train`` through the frozen ``head``.

    Args:
        encoder: a transformers encoder (its parameters are updated).
        head: the task's frozen classification head (never updated).
        train: texts and labels; batches are drawn without replacement, reshuffled each epoch.
        steps: optimizer steps.
        on_step: called with the 1-based step number after each optimizer step (e.g. to score
            the validation split and keep the best weights); the encoder is put back in train
            mode after it returns.

    Returns:
        A :class:`FinetuneResult` with the per-step losses.

    Raises:
        NonFiniteError: the loss became NaN/inf (lower the learning rate).

    Note:
        Cost: ``steps`` forward+backward passes of the encoder on ``batch_size`` sequences
        padded to the batch's longest (at most ``max_length``). About 1 s a step for
        MiniLM-L6 at batch 32 x 64 tokens on 2 CPU cores.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if len(train) == 0:
        raise ValueError("the training split is empty.")
    torch.manual_seed(seed)  # dropout
    g = torch.Generator().manual_seed(seed)
    head = head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    params = [p for p in encoder.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)
    sched = warmup_linear_decay(opt, steps, warmup_ratio)
    labels = torch.tensor(train.labels, dtype=torch.long)
    batches = shuffled_batches(len(train), batch_size, g)
    losses: list[float] = []
    encoder.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=progress_disabled(progress))
    for step in bar:
        idx = next(batches)
        batch = tokenizer([train.texts[i] for i in idx], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        loss = nn.functional.cross_entropy(head(embed(encoder, batch)), labels[idx])
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"{desc}: the loss is {loss.item()} at step {step}; lower the learning rate.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step + 1)
            encoder.train()
    encoder.eval()
    seconds = time.perf_counter() - start
    logger.info("%s: %d steps in %.1fs, loss %.3f -> %.3f", desc, steps, seconds, losses[0], losses[-1])
    return FinetuneResult(steps, seconds, losses[0], losses[-1], losses)
