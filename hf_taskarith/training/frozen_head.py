"""Fine-tune a sentence encoder through a frozen task head with :class:`LinearizedTrainer`.

The closed-vocabulary setting of the task-arithmetic papers: each task keeps a fixed head
(:mod:`.heads`), only the shared encoder learns, so the task vector lives entirely in the
encoder. :class:`FrozenHeadClassifier` puts encoder, mean pooling and head in one module that
takes tokenized inputs and ``labels`` and returns logits and a loss, what the Trainer needs;
:func:`train_encoder` runs :class:`~hf_taskarith.training.LinearizedTrainer` on a
``datasets.Dataset`` in either mode (``"linear"``: tangent space, ``"nonlinear"``: ordinary
fine-tuning) and returns the task vector over the *encoder's* parameter names.

Example:
    >>> result = train_encoder(encoder, head, tokenizer, task.dataset("train"), steps=50, mode="linear")
    >>> result.task_vector.apply_to(encoder)          # or merge it with others
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import (
    DataCollatorWithPadding,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..errors import NonFiniteError
from ..io.fingerprint import fingerprint_state_dict
from ..state import float_state_dict
from .data import check_columns, class_labels, tokenize_for_classification
from .encoders import mean_pool, progress_disabled, quiet_transformers
from .heads import freeze
from .trainer import LinearizedTrainer

if TYPE_CHECKING:
    import datasets

    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."


class FrozenHeadClassifier(nn.Module):
    """``head(mean_pool(encoder(x)))`` as one model: logits, and a cross-entropy loss given ``labels``.

    Args:
        encoder: a transformers encoder returning ``last_hidden_state``.
        head: the task's head; frozen here (``requires_grad=False``, eval mode) so only the
            encoder trains.
        encoder_dropout: keep the encoder's dropout in training mode (``False``: the encoder
            stays in ``eval()`` whatever ``train()`` is called, as a linearized model does).

    Note:
        Its parameter names are the encoder's prefixed with ``encoder.`` (and ``head.*``);
        :func:`encoder_task_vector` maps a task vector of this model back to the encoder's names.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, *, encoder_dropout: bool = True):
        super().__init__()
        self.encoder = encoder
        self.head = freeze(head)
        self.encoder_dropout = encoder_dropout

    def train(self, mode: bool = True) -> FrozenHeadClassifier:
        super().train(mode)
        self.head.eval()
        if not self.encoder_dropout:
            self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        if attention_mask is None:  # unpadded inputs: pool over every position
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        logits = self.head(mean_pool(self.encoder(**inputs).last_hidden_state, attention_mask))
        loss = frozen_head_loss(SequenceClassifierOutput(logits=logits), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def frozen_head_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of ``outputs.logits``: the mean, or the sum over ``num_items_in_batch`` when
    the Trainer gives it (gradient accumulation and several processes then average correctly)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, labels)
    return nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def encoder_task_vector(task_vector: TaskVector, *, base_fingerprint: str, base_model: str | None = None) -> TaskVector:
    """A task vector of a :class:`FrozenHeadClassifier` over the encoder's own parameter names.

    The ``encoder.`` prefix is removed, the (frozen, zero) head entries are dropped, and the
    metadata's base fingerprint becomes the encoder's, so the vector applies to and merges
    with the encoder's checkpoint folder.

    Raises:
        ValueError: a head entry is not zero (the head was trained), or no encoder entry.
    """
    from ..task_vector import TaskVector

    deltas, moved = {}, []
    for name in task_vector.keys():
        if name.startswith(ENCODER_PREFIX):
            deltas[name[len(ENCODER_PREFIX):]] = task_vector[name]
        elif task_vector[name].count_nonzero():
            moved.append(name)
    if moved or not deltas:
        raise ValueError(f"expected a task vector of a FrozenHeadClassifier (encoder.* entries, zero head entries); "
                         f"got non-zero {moved[:5]} and {len(deltas)} encoder entries.")
    meta = task_vector.metadata
    meta.base_fingerprint = base_fingerprint
    if base_model is not None:
        meta.base_model = base_model
    return TaskVector(deltas, meta)


@dataclass
class EncoderTrainingResult:
    """What :func:`train_encoder` returns.

    Attributes:
        task_vector: the trained task vector over the encoder's parameter names.
        model: the trained encoder: the encoder itself (trained in place) in ``"nonlinear"``
            mode; a :class:`~hf_taskarith.LinearizedModel` of it at ``theta0 + tau`` in
            ``"linear"`` mode (the encoder is not modified).
        steps, seconds: optimizer steps and training wall time.
        losses: the training loss of every step.
        best_task_vector, best_step: with ``validation=``, the task vector of the step with the
            highest validation accuracy (the earliest on a tie) and that step; else ``None``.
        validation_curve: ``[(step, validation accuracy), ...]`` at each check.
    """

    task_vector: TaskVector
    model: nn.Module
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)
    best_task_vector: TaskVector | None = field(default=None, repr=False)
    best_step: int | None = None
    validation_curve: list[tuple[int, float]] = field(default_factory=list, repr=False)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def train_encoder(encoder: nn.Module, head: nn.Module, tokenizer: Any | None, train: datasets.Dataset, *,
                  mode: Literal["linear", "nonlinear"] = "nonlinear", steps: int, batch_size: int = 32,
                  learning_rate: float = 5e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                  max_length: int = 64, max_grad_norm: float = 1.0, seed: int = 0, progress: bool = True,
                  desc: str = "fine-tuning", output_dir: str | None = None, base_model: str | None = None,
                  text_column: str = "text", label_column: str = "label", dropout: bool | None = None,
                  validation: datasets.Dataset | None = None, eval_every: int | None = None,
                  adapter: Any | None = None, **training_args: Any) -> EncoderTrainingResult:
    """Fine-tune ``encoder`` on ``train`` through the frozen ``head`` with :class:`LinearizedTrainer`.

    Args:
        encoder: a transformers encoder. ``"nonlinear"`` mode trains it in place;
            ``"linear"`` mode trains ``delta`` of a linearized copy and leaves it unchanged.
        head: the task's frozen head (never updated).
        tokenizer: the encoder's tokenizer (texts are truncated to ``max_length``, padded per
            batch); ``None`` when ``train`` is tokenized already.
        train: a ``datasets.Dataset`` with a text and a label column (e.g.
            :meth:`TaskData.dataset("train") <hf_taskarith.training.tasks.TaskData.dataset>`), or,
            with ``tokenizer=None``, ``input_ids`` of one length and ``labels`` (class ids).
        mode: ``"linear"`` (tangent space) or ``"nonlinear"`` (ordinary fine-tuning).
        steps: optimizer steps (``max_steps``; the data is reshuffled every epoch).
        learning_rate, weight_decay, max_grad_norm: AdamW settings; the learning rate rises
            linearly over ``ceil(warmup_ratio * steps)`` steps, then decays linearly to zero.
        seed: seeds shuffling, dropout and the Trainer.
        progress: show the Trainer's progress bar (also off with ``HF_HUB_DISABLE_PROGRESS_BARS=1``).
        output_dir: the Trainer's output folder (nothing is saved there unless
            ``training_args`` asks for it); default a temporary folder.
        base_model: the base id recorded in the task vector (default the encoder's ``_name_or_path``).
        dropout: the encoder's dropout while training. ``None`` (default): each mode's own
            policy -- on in ``"nonlinear"`` mode, off in ``"linear"`` mode, whose Jacobian is
            taken at ``theta0`` in ``eval()`` (a linearized model has no dropout). ``False``:
            off in both modes, the like-for-like choice when comparing them. ``True`` is only
            valid in ``"nonlinear"`` mode.
        validation, eval_every: best-on-validation checkpointing. Every ``eval_every`` steps
            (and after the last) the model being trained -- the tangent-space model in
            ``"linear"`` mode -- is scored on ``validation`` (same columns as ``train``) through
            the head, and the task vector of the best step (the earliest on a tie) is kept as
            ``best_task_vector``; ``task_vector`` stays the final one. Each check costs a forward
            pass over ``validation`` (a forward+JVP pass in ``"linear"`` mode).
        adapter: a peft config to train instead of the full encoder: ``peft.LoraConfig`` in
            ``"nonlinear"`` mode (LoRA) or :class:`~hf_taskarith.adapters.LinearizedLoraConfig`
            in ``"linear"`` mode (L-LoRA). The adapter is put on a copy (the encoder is not
            modified) and the task vector is its dense update over the encoder's names
            (:func:`~hf_taskarith.adapters.task_vector_from_peft`, every tensor present): apply
            LoRA vectors in weight space, L-LoRA ones in the tangent space
            (:class:`~hf_taskarith.evaluation.editing.TangentEditor`), where they are exact.
        **training_args: more ``TrainingArguments`` (they override the ones set here).

    Returns:
        An :class:`EncoderTrainingResult` (task vector over the encoder's names, per-step losses,
        and with ``validation``: the best-on-validation vector, its step and the accuracy curve).

    Raises:
        NonFiniteError: a training loss was NaN/inf (lower the learning rate).
        ValueError: ``steps < 1``, an empty dataset, an unknown ``mode``, ``dropout=True``
            in ``"linear"`` mode, ``validation`` and ``eval_every`` not given together
            (``eval_every`` must be >= 1), or an ``adapter`` that does not fit ``mode``.
        DatasetError: the text or label column is missing.

    Note:
        Cost: ``steps`` forward+backward passes on ``batch_size`` sequences (a linearized step
        adds a forward-mode JVP; its measured cost ratio is in docs/linearized.md); measured 0.5 s a linearized step for
        MiniLM-L6 at batch 32 x 64 tokens on 2 quiet CPU cores (the demo's trec run), several
        times that on a loaded machine. ``"linear"`` mode holds a copy of the encoder. Runs
        under ``accelerate launch`` (one process per device or CPU process; the global batch
        is ``batch_size`` times the number of processes).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if dropout and mode == "linear":
        raise ValueError("dropout=True is not available in linear mode: the linearized model's Jacobian is taken "
                         "at theta0 in eval() mode, without dropout. Pass dropout=False (off in both modes, "
                         "like for like) or None (each mode's own policy).")
    if len(train) == 0:
        raise ValueError("the training dataset is empty.")
    if adapter is not None:
        _check_adapter(adapter, mode)
    if (validation is None) != (eval_every is None) or (eval_every is not None and eval_every < 1):
        given = "a dataset" if validation is not None else None
        raise ValueError(f"best-on-validation checkpointing needs both validation= (a dataset) and eval_every= "
                         f"(steps between checks, >= 1); got validation={given}, eval_every={eval_every!r}.")
    if validation is not None and len(validation) == 0:
        raise ValueError("the validation dataset is empty.")
    if tokenizer is None:
        check_columns(train, {"input_ids": "input_ids", "labels": "labels"}, source="the training dataset "
                      "(tokenizer=None: pass a tokenizer to train on texts)")
    else:
        check_columns(train, {"text_column": text_column, "label_column": label_column}, text=("text_column",),
                      source="the training dataset")
    base_fingerprint = fingerprint_state_dict(float_state_dict(encoder))
    base_model = base_model or getattr(getattr(encoder, "config", None), "_name_or_path", None) or None
    val_tokenized = None
    if tokenizer is None:
        tokenized, collator, val_tokenized = train, default_data_collator, validation
    else:
        labels = class_labels(train, column=label_column)
        with _datasets_bars(progress):
            tokenized, val_tokenized = (
                tokenize_for_classification(ds, tokenizer, text_column=text_column, label_column=label_column,
                                            max_length=max_length, labels=labels) if ds is not None else None
                for ds in (train, validation))
        collator = DataCollatorWithPadding(tokenizer)
    trainer_mode = mode
    if adapter is None:
        model = FrozenHeadClassifier(encoder, head, encoder_dropout=dropout is not False)
    else:  # a copy with the adapter; an L-LoRA model is linearized already, so it trains "as is"
        import peft

        adapted = peft.get_peft_model(copy.deepcopy(encoder), copy.deepcopy(adapter))
        model = FrozenHeadClassifier(adapted, head, encoder_dropout=bool(dropout) or (dropout is None and
                                                                                      mode == "nonlinear"))
        trainer_mode = "nonlinear"
    # nonlinear: train the caller's encoder in place; linear: LinearizedModel copies it (delta trains)
    linearize_kwargs = {"loss_fn": frozen_head_loss, "copy_model": trainer_mode == "linear"}
    losses: list[float] = []
    with contextlib.ExitStack() as stack:
        folder = output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-taskarith-train-"))
        kwargs: dict[str, Any] = dict(
            output_dir=folder, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            weight_decay=weight_decay, warmup_steps=math.ceil(warmup_ratio * steps), lr_scheduler_type="linear",
            max_grad_norm=max_grad_norm, seed=seed, data_seed=seed, logging_steps=1, logging_nan_inf_filter=False,
            save_strategy="no", report_to="none", disable_tqdm=progress_disabled(progress),
            remove_unused_columns=True, dataloader_pin_memory=torch.cuda.is_available())
        kwargs.update(training_args)
        with quiet_transformers():
            trainer = LinearizedTrainer(model=model, args=TrainingArguments(**kwargs), mode=trainer_mode,
                                        linearize_kwargs=linearize_kwargs, train_dataset=tokenized,
                                        data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # no log dicts on stdout; losses are collected below
        trainer.remove_callback(ProgressCallback)
        if not progress_disabled(progress):
            trainer.add_callback(_QuietProgress(desc))
        trainer.add_callback(_LossRecorder(losses))

        def vector_now() -> TaskVector:
            """The task vector of the model being trained, over the encoder's names."""
            if adapter is None:
                return encoder_task_vector(trainer.task_vector(), base_fingerprint=base_fingerprint,
                                           base_model=base_model)
            return _adapter_task_vector(model.encoder, trainer.training_details(),
                                        base_fingerprint=base_fingerprint, base_model=base_model)

        best = None
        if val_tokenized is not None and eval_every is not None:
            best = _BestOnValidation(val_tokenized, collator, eval_every, vector_now, batch_size=batch_size)
            trainer.add_callback(best)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"{desc}: the training loss is {losses[bad[0]]} at step {bad[0] + 1}; "
                                 "lower the learning rate.")
        tv = vector_now()
        checkpoint: dict[str, Any] = {}
        if best is not None and best.vector is not None:
            checkpoint = {"best_task_vector": best.vector, "best_step": best.step, "validation_curve": best.curve}
    if adapter is not None:
        trained: nn.Module = model.encoder.eval()  # the PeftModel (for L-LoRA: its linearized forward)
    elif mode == "linear":
        from ..linearize import LinearizedModel

        trained = LinearizedModel(encoder).load_task_vector(tv).eval()
    else:
        trained = encoder.eval()
    logger.info("%s: %d steps in %.1fs, loss %.3f -> %.3f", desc, steps, seconds, losses[0], losses[-1])
    return EncoderTrainingResult(tv, trained, steps, seconds, losses, **checkpoint)


def _check_adapter(adapter: Any, mode: str) -> None:
    """LoRA trains in ``"nonlinear"`` mode, L-LoRA (or a tangent adapter) in ``"linear"`` mode."""
    from ..adapters import LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE

    kind = str(getattr(getattr(adapter, "peft_type", None), "value", getattr(adapter, "peft_type", None)))
    linearized = kind in (LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE)
    if kind != "LORA" and not linearized:
        raise ValueError(f"adapter must be a peft.LoraConfig or an hf_taskarith LinearizedLoraConfig/TangentConfig; "
                         f"got {type(adapter).__name__} (peft_type {kind}).")
    if linearized != (mode == "linear"):
        raise ValueError(f"a {type(adapter).__name__} trains in mode={'linear' if linearized else 'nonlinear'!r}, "
                         f"got mode={mode!r}: LoRA is the ordinary adapter, L-LoRA its linearized form.")


def _adapter_task_vector(adapted: nn.Module, details: dict[str, Any], *, base_fingerprint: str,
                         base_model: str | None) -> TaskVector:
    """The dense update of ``adapted``'s adapter over the encoder's names, every tensor present."""
    from ..adapters import task_vector_from_peft

    tv = task_vector_from_peft(adapted, complete=True)
    tv.metadata.base_fingerprint = base_fingerprint
    if base_model is not None:
        tv.metadata.base_model = base_model
    tv.metadata.extra["training"] = details
    return tv


@contextlib.contextmanager
def _datasets_bars(progress: bool):
    """``datasets``' progress bars off for the block when ``progress`` is off."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    if was_on and progress_disabled(progress):
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


class _LossRecorder(TrainerCallback):
    """Collects the loss the Trainer logs each step (``logging_steps=1``)."""

    def __init__(self, losses: list[float]):
        self.losses = losses

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bar, labelled, without printing every log dict."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.desc)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")


class _BestOnValidation(TrainerCallback):
    """Scores the model being trained on tokenized validation data every ``every`` steps and
    after the last; keeps a snapshot (``snapshot()``, the trainer's task vector) of the best.

    The accuracy is computed here rather than with ``Trainer.evaluate`` so that it is the same
    frozen-head argmax in both modes and costs no evaluation loop state or logging."""

    def __init__(self, data: Any, collator: Any, every: int, snapshot: Any, *, batch_size: int):
        self.data, self.collator, self.every, self.snapshot = data, collator, every, snapshot
        self.batch_size = batch_size
        self.curve: list[tuple[int, float]] = []
        self.vector: TaskVector | None = None
        self.step: int | None = None

    @torch.no_grad()
    def _accuracy(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        keep = ("input_ids", "attention_mask", "token_type_ids", "labels")
        columns = [c for c in self.data.column_names if c in keep]
        correct = 0
        try:
            for start in range(0, len(self.data), self.batch_size):
                rows = self.data.select(range(start, min(start + self.batch_size, len(self.data))))
                batch = self.collator([{c: r[c] for c in columns} for r in rows])
                labels = batch.pop("labels").to(device)
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                correct += int((logits.argmax(-1) == labels).sum())
        finally:
            model.train(was_training)
        return correct / len(self.data)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        if self.curve and self.curve[-1][0] == state.global_step:
            return
        accuracy = self._accuracy(model)
        if not math.isfinite(accuracy):
            raise NonFiniteError(f"validation accuracy is {accuracy} at step {state.global_step}.")
        if not self.curve or accuracy > max(a for _, a in self.curve):
            self.vector, self.step = self.snapshot(), state.global_step
        self.curve.append((state.global_step, accuracy))
