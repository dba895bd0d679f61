"""LinearizedTrainer: ``transformers.Trainer`` fine-tuning in the tangent space.

It overrides only what a :class:`~hf_taskarith.linearize.LinearizedModel` changes:

* ``__init__``: wraps a plain model in :class:`LinearizedModel`; reads label names and
  dataset columns from the *wrapped* model's forward signature; turns DDP buffer
  broadcasting off (``theta0`` buffers are identical on every rank and never change).
* ``_save``: writes ``delta`` only (``model.safetensors``, what ``resume_from_checkpoint``
  reloads) and the task vector (``task_vector/``, readable by
  :meth:`TaskVector.from_pretrained`), never a second copy of the base weights.

The loss is the model's own loss computed on linearized logits (see
:meth:`LinearizedModel.compute_loss`), so ``Trainer.compute_loss`` is used unchanged.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import find_labels

from ..linearize import LinearizedModel

if TYPE_CHECKING:
    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)

TASK_VECTOR_DIR = "task_vector"
DELTA_WEIGHTS_NAME = "model.safetensors"


class LinearizedTrainer(Trainer):
    """Fine-tune ``delta`` of a linearized model with the ordinary Trainer loop.

    Args:
        model: a :class:`LinearizedModel`, or any model to wrap in one.
        args: ``TrainingArguments`` (``ddp_broadcast_buffers`` defaults to ``False`` here).
        linearize_kwargs: keyword arguments for :class:`LinearizedModel` when ``model`` is
            not linearized yet (``engine``, ``loss_fn``, ``loss_type``, ``copy_model``).
        **kwargs: everything else ``Trainer`` takes.

    Raises:
        TypeError: ``linearize_kwargs`` given with an already linearized model.

    Note:
        Checkpoints hold ``delta`` and the task vector only; the base weights are not
        copied. Mixed precision (``bf16=True``) runs the linear layers through PyTorch's
        generic forward-mode formulas (slower) because the hand-written rule is skipped
        under autocast.

    Example:
        >>> trainer = LinearizedTrainer(model=model, args=TrainingArguments("out"),
        ...                             train_dataset=ds, data_collator=collator)
        >>> trainer.train()
        >>> tv = trainer.task_vector()          # or TaskVector.from_pretrained("out/task_vector")
    """

    _tag_names = ["hf_taskarith", "linearized"]

    def __init__(self, model: torch.nn.Module | None = None, args: TrainingArguments | None = None, *,
                 linearize_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        if model is None:
            raise TypeError("LinearizedTrainer needs a model (model_init is not supported).")
        if isinstance(model, LinearizedModel):
            if linearize_kwargs:
                raise TypeError("linearize_kwargs were given but the model is already a LinearizedModel; "
                                "set those options when constructing it.")
        else:
            model = LinearizedModel(model, **(linearize_kwargs or {}))
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if args.ddp_broadcast_buffers is None:
            args.ddp_broadcast_buffers = False
        super().__init__(model=model, args=args, **kwargs)
        if self.args.label_names is None:
            self.label_names = find_labels(type(self.linearized_model.model)) or ["labels"]

    @property
    def linearized_model(self) -> LinearizedModel:
        """The :class:`LinearizedModel` being trained (unwrapped from DDP and friends)."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            inner = self.linearized_model.model
            columns = list(inspect.signature(inner.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})

    def task_vector(self, **extra: Any) -> "TaskVector":
        """The current ``delta`` as a task vector (training details recorded in its metadata)."""
        details = {"global_step": int(self.state.global_step),
                   "learning_rate": float(self.args.learning_rate),
                   "num_train_epochs": float(self.args.num_train_epochs),
                   "max_steps": int(self.args.max_steps), "seed": int(self.args.seed), **extra}
        return self.linearized_model.task_vector(training=details)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        import safetensors.torch

        os.makedirs(output_dir, exist_ok=True)
        lin = self.linearized_model
        state = state_dict if state_dict is not None else lin.state_dict()
        deltas = {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("delta.")}
        safetensors.torch.save_file(deltas, os.path.join(output_dir, DELTA_WEIGHTS_NAME),
                                    metadata={"format": "pt", "hf_taskarith": "linearized_delta"})
        self.task_vector().save_pretrained(Path(output_dir) / TASK_VECTOR_DIR, overwrite=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        logger.info("saved linearized delta and task vector to %s", output_dir)

    def _issue_warnings_after_load(self, load_result) -> None:
        # theta0 buffers are not in delta-only checkpoints by design; report anything else
        missing = [k for k in load_result.missing_keys if not k.startswith("model.")]
        if missing or load_result.unexpected_keys:
            logger.warning("resuming linearized model: missing %s, unexpected %s", missing,
                           load_result.unexpected_keys)
