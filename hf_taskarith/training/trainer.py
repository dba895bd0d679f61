"""LinearizedTrainer: ``transformers.Trainer`` fine-tuning in the tangent space (or ordinarily).

It overrides only what a :class:`~hf_taskarith.linearize.LinearizedModel` changes:

* ``__init__``: wraps a plain model in :class:`LinearizedModel` (``mode="linear"``) or keeps
  a copy of it and a snapshot of its weights (``mode="nonlinear"``: ordinary fine-tuning with
  the same code); reads label names and dataset columns from the *wrapped* model's forward
  signature; turns DDP buffer broadcasting off (the wrapped model stays in eval mode, so its
  buffers never change).
* ``_save``: writes the trained parameters only (``delta``, and ``nonlinear`` ones for
  partial linearization; ``model.safetensors``, what ``resume_from_checkpoint`` reloads) and
  the task vector (``task_vector/``, readable by :meth:`TaskVector.from_pretrained`), never a
  second copy of the base weights. In ``"nonlinear"`` mode the ordinary checkpoint plus
  ``task_vector/``.
* ``push_to_hub`` and ``create_model_card``: the task vector (not full weights) with its
  card; training hyper-parameters in ``metadata.extra["training"]``, metrics in
  ``extra["metrics"]``.

The loss is the model's own loss computed on linearized logits (see
:meth:`LinearizedModel.compute_loss`), so ``Trainer.compute_loss`` is used unchanged.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import find_labels

from ..io.fingerprint import fingerprint_state_dict
from ..linearize import LinearizedModel
from ..linearize.storage import is_sharded, trained_weights
from ..state import float_state_dict

if TYPE_CHECKING:
    from ..hub.push import PushResult
    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)

TASK_VECTOR_DIR = "task_vector"
DELTA_WEIGHTS_NAME = "model.safetensors"

Mode = Literal["linear", "nonlinear"]
MODES: tuple[str, ...] = ("linear", "nonlinear")

#: ``create_model_card`` / ``push_to_hub`` keyword arguments recorded in ``extra["training"]``
_CARD_DETAILS = ("dataset", "dataset_args", "tasks", "language", "finetuned_from")


def _own_loss(model: torch.nn.Module, loss_type: str | None) -> Any:
    """``mode="nonlinear"``: the Trainer's ``compute_loss_func`` computing ``model``'s own loss
    from its outputs with the same function the linear mode uses (:mod:`..linearize.losses`), so
    ``num_items_in_batch`` always reaches it; ``None`` (the model's built-in loss) for models
    without a registered loss.

    Why: a transformers model whose forward takes ``**kwargs`` makes the Trainer multiply its
    loss by the process count under ``average_tokens_across_devices`` (the default), expecting a
    sum over items divided by the items of *all* processes; a sequence classifier's built-in loss
    is a plain mean that ignores ``num_items_in_batch``, so its gradient came out multiplied by
    the number of DDP processes (2x on two, measured). The registered losses divide by
    ``num_items_in_batch``: the step is the single-process step (``tests/test_trainer_ddp.py``)."""
    from ..linearize.losses import get_linearized_loss, infer_loss_type

    loss_type = loss_type or infer_loss_type(model)
    if loss_type is None:
        return None
    loss = get_linearized_loss(loss_type)

    def compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        return loss(model, outputs, labels, num_items_in_batch)

    return compute_loss


class LinearizedTrainer(Trainer):
    """Fine-tune ``delta`` of a linearized model with the ordinary Trainer loop.

    Args:
        model: a :class:`LinearizedModel`; a ``PeftModel`` with an L-LoRA or tangent adapter
            (:mod:`hf_taskarith.adapters`), trained as it is, its checkpoints the adapter files
            and ``task_vector()`` its dense task vector; or any model to wrap in a ``LinearizedModel``.
        args: ``TrainingArguments`` (``ddp_broadcast_buffers`` defaults to ``False`` here).
        mode: ``"linear"`` (default: tangent-space fine-tuning) or ``"nonlinear"`` (ordinary
            fine-tuning of a copy of ``model``, so both modes run with the same code;
            :meth:`task_vector` then returns fine-tuned minus pre-trained weights).
        linearize_kwargs: keyword arguments for :class:`LinearizedModel` when ``model`` is
            not linearized yet (``engine``, ``linearize``, ``rest``, ``loss_fn``,
            ``loss_type``, ``copy_model``). In ``"nonlinear"`` mode ``loss_fn`` becomes the
            Trainer's ``compute_loss_func`` (default: the model's own loss through the same
            registered function as the linear mode, by ``loss_type`` or the model's type, so
            ``num_items_in_batch`` reaches it and DDP steps are right), ``copy_model`` is
            honoured and the rest are ignored.
        **kwargs: everything else ``Trainer`` takes.

    Raises:
        TypeError: ``linearize_kwargs`` given with an already linearized model, or a
            ``LinearizedModel`` given with ``mode="nonlinear"``.
        ValueError: unknown ``mode``.

    Note:
        Checkpoints hold the trained parameters and the task vector only; the base weights
        are not copied (``"nonlinear"`` mode saves ordinary checkpoints). ``"nonlinear"`` mode
        keeps a CPU snapshot of the pre-trained weights to compute the task vector. Mixed
        precision (``bf16=True``) runs the linear layers through PyTorch's generic
        forward-mode formulas (slower) because the hand-written rule is skipped under
        autocast; linearized outputs are summed in float32 (see docs/linearized.md).

    Example:
        >>> trainer = LinearizedTrainer(model=model, args=TrainingArguments("out"),
        ...                             train_dataset=ds, data_collator=collator)
        >>> trainer.train()
        >>> tv = trainer.task_vector()          # or TaskVector.from_pretrained("out/task_vector")
        >>> trainer.push_to_hub(tag="v1")       # the task vector and its card, one commit
    """

    _tag_names = ["hf_taskarith", "linearized"]

    def __init__(self, model: torch.nn.Module | None = None, args: TrainingArguments | None = None, *,
                 mode: Mode = "linear", linearize_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}.")
        if model is None:
            raise TypeError("LinearizedTrainer needs a model (model_init is not supported).")
        self.mode: Mode = mode
        self._base: _BaseSnapshot | None = None
        self._adapter = mode == "linear" and _is_linearized_adapter(model)
        if mode == "nonlinear":
            model = self._prepare_nonlinear(model, dict(linearize_kwargs or {}), kwargs)
        elif self._adapter:  # a PeftModel with an L-LoRA or tangent adapter is linearized already
            if linearize_kwargs:
                raise TypeError("linearize_kwargs were given but the model is a PeftModel with a linearized adapter; "
                                "set those options in its LinearizedLoraConfig / TangentConfig.")
        elif isinstance(model, LinearizedModel):
            if linearize_kwargs:
                raise TypeError("linearize_kwargs were given but the model is already a LinearizedModel; "
                                "set those options when constructing it.")
        else:
            model = LinearizedModel(model, **(linearize_kwargs or {}))
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if args.ddp_broadcast_buffers is None and mode == "linear":
            args.ddp_broadcast_buffers = False
        super().__init__(model=model, args=args, **kwargs)
        if self.args.label_names is None and mode == "linear" and not self._adapter:
            self.label_names = find_labels(type(self.linearized_model.model)) or ["labels"]

    def _prepare_nonlinear(self, model: torch.nn.Module, lk: dict[str, Any], kwargs: dict[str, Any]) -> torch.nn.Module:
        if isinstance(model, LinearizedModel):
            raise TypeError("mode='nonlinear' fine-tunes the plain pre-trained model; got a LinearizedModel (its "
                            "weights are frozen). Pass the model you wrapped instead.")
        loss_fn = lk.pop("loss_fn", None)
        copy_model = lk.pop("copy_model", True)
        loss_type = lk.pop("loss_type", None)
        if lk:
            logger.info("mode='nonlinear': linearization options %s do not apply and are ignored", sorted(lk))
        self._base = _BaseSnapshot(model)
        trained = copy.deepcopy(model) if copy_model else model
        if kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = loss_fn or _own_loss(trained, loss_type)
        return trained

    @property
    def linearized_model(self) -> LinearizedModel:
        """The :class:`LinearizedModel` being trained (unwrapped from DDP and friends).

        Raises:
            ValueError: ``mode="nonlinear"`` (use :attr:`trained_model`).
        """
        model = self.trained_model
        if not isinstance(model, LinearizedModel):
            raise ValueError("mode='nonlinear' trains the model itself; there is no LinearizedModel. "
                             "Use trainer.trained_model.")
        return model

    @property
    def trained_model(self) -> torch.nn.Module:
        """The model being trained, unwrapped (a :class:`LinearizedModel` in ``"linear"`` mode)."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if model is None:  # __init__ refuses model=None; only a caller clearing trainer.model gets here
            raise ValueError("the trainer has no model (trainer.model is None).")
        return model

    def _set_signature_columns_if_needed(self) -> None:
        if self.mode == "nonlinear" or self._adapter:
            return super()._set_signature_columns_if_needed()
        if self._signature_columns is None:
            inner = self.linearized_model.model
            columns = list(inspect.signature(inner.forward).parameters)
            # transformers declares the attribute as None only; it holds the column list once set
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})  # type: ignore[assignment]

    # -- task vectors -------------------------------------------------------------------
    def training_details(self) -> dict[str, Any]:
        """Hyper-parameters recorded in ``task_vector().metadata.extra["training"]`` (JSON-serializable)."""
        a = self.args
        world = int(a.world_size)
        mixed = "bf16" if a.bf16 else ("fp16" if a.fp16 else "no")
        return {
            "mode": self.mode, "linearized": self.mode == "linear", "learning_rate": float(a.learning_rate),
            "global_step": int(self.state.global_step), "max_steps": int(a.max_steps),
            "num_train_epochs": float(a.num_train_epochs),
            "per_device_train_batch_size": int(a.per_device_train_batch_size),
            "gradient_accumulation_steps": int(a.gradient_accumulation_steps), "world_size": world,
            "total_train_batch_size": int(a.per_device_train_batch_size) * int(a.gradient_accumulation_steps) * world,
            "optim": str(getattr(a.optim, "value", a.optim)),
            "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
            "weight_decay": float(a.weight_decay), "mixed_precision": mixed, "seed": int(a.seed),
        }

    def metrics(self) -> dict[str, float]:
        """The latest ``train_loss`` and ``eval_*`` values from the log history."""
        found: dict[str, float] = {}
        for entry in self.state.log_history:
            for k, v in entry.items():
                if (k == "train_loss" or k.startswith("eval_")) and isinstance(v, (int, float)):
                    found[k] = float(v)
        return found

    def task_vector(self, **extra: Any) -> TaskVector:
        """The trained task vector, with :meth:`training_details` (plus ``extra``) and :meth:`metrics`.

        ``"linear"`` mode: ``delta`` (see :meth:`LinearizedModel.task_vector`). ``"nonlinear"``
        mode: fine-tuned minus pre-trained weights over the same names.
        """
        details = {**self.training_details(), **extra}
        more: dict[str, Any] = {"metrics": m} if (m := self.metrics()) else {}
        if self._adapter:
            from ..adapters.convert import task_vector_from_peft

            tv = task_vector_from_peft(self.trained_model)
            tv.metadata.extra.update(training=details, **more)
            return tv
        if self.mode == "linear":
            return self.linearized_model.task_vector(training=details, **more)
        if self._base is None:  # set by __init__ in "nonlinear" mode
            raise ValueError(f"mode={self.mode!r} without a snapshot of the pre-trained weights.")
        return self._base.task_vector(self.trained_model, training=details, **more)

    # -- saving -------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self._output_dir()
        if self.mode == "nonlinear" or self._adapter:  # ordinary checkpoint (a PeftModel saves its adapter)
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                self.task_vector().save_pretrained(Path(output_dir) / TASK_VECTOR_DIR, overwrite=True)
            return
        lin = self.linearized_model
        sharded = is_sharded(lin)  # FSDP2: gathering is a collective, so every rank takes part
        if not (self.args.should_save or sharded):
            return
        weights = trained_weights(lin, state_dict)
        tv = self.task_vector()
        if not self.args.should_save:
            return
        import safetensors.torch

        os.makedirs(output_dir, exist_ok=True)
        safetensors.torch.save_file(weights, os.path.join(output_dir, DELTA_WEIGHTS_NAME),
                                    metadata={"format": "pt", "hf_taskarith": "linearized_delta"})
        tv.save_pretrained(Path(output_dir) / TASK_VECTOR_DIR, overwrite=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        logger.info("saved linearized delta and task vector to %s", output_dir)

    def _issue_warnings_after_load(self, load_result) -> None:
        if self.mode == "nonlinear" or self._adapter:
            return super()._issue_warnings_after_load(load_result)
        # theta0 (model.*) is not in delta-only checkpoints by design; report anything else
        missing = [k for k in load_result.missing_keys if not k.startswith("model.")]
        if missing or load_result.unexpected_keys:
            logger.warning("resuming linearized model: missing %s, unexpected %s", missing,
                           load_result.unexpected_keys)

    # -- Hub ----------------------------------------------------------------------------
    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None) -> None:
        """Write ``README.md`` in ``output_dir``: the task-vector card (base, training details, metrics, usage).

        ``dataset``, ``dataset_args``, ``tasks``, ``language`` and ``finetuned_from`` are
        recorded with the training details; ``tags`` and ``dataset_tags`` are not used.
        """
        if not self.is_world_process_zero():
            return
        from ..hub.card import render_task_vector_card

        card_details = {k: v for k, v in dict(language=language, finetuned_from=finetuned_from, tasks=tasks,
                                              dataset=dataset, dataset_args=dataset_args).items() if v is not None}
        repo_id = self._repo_id(None, model_name)
        text = render_task_vector_card(self.task_vector(**card_details), repo_id=repo_id,
                                       license=license or "apache-2.0")
        os.makedirs(self._output_dir(), exist_ok=True)
        Path(self._output_dir(), "README.md").write_text(text, encoding="utf-8")

    # returns the task vector push's PushResult, not Trainer's CommitInfo (documented): a deliberate override
    def push_to_hub(  # type: ignore[override]
            self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
            revision: str | None = None, private: bool | None = None, *, repo_id: str | None = None,
            tag: str | None = None, **kwargs: Any) -> PushResult | None:
        """Push the task vector (not the model weights) and its card in one commit.

        Saves the model locally as ``Trainer.push_to_hub`` does, then calls
        :meth:`TaskVector.push_to_hub <hf_taskarith.TaskVector.push_to_hub>` from the main
        process with the training hyper-parameters in ``metadata.extra["training"]``.

        Args:
            commit_message: default ``"Upload task vector"`` (+ tag).
            blocking: accepted for compatibility; the push is always synchronous.
            token: default ``args.hub_token``.
            revision: the branch to push to (default ``args.hub_revision``, else ``main``).
            private: visibility if the repo is created (default ``args.hub_private_repo``).
            repo_id: default ``args.hub_model_id``, else the ``output_dir`` folder name.
            tag: tag the commit (e.g. ``"v1"``), an immutable version to pull.
            **kwargs: ``license`` and ``model_name`` (the repo name when no id is set);
                ``dataset``, ``dataset_args``, ``tasks``, ``language``, ``finetuned_from``
                are recorded in the training details.

        Returns:
            The :class:`~hf_taskarith.hub.push.PushResult` on the main process, else ``None``.

        Raises:
            TypeError: an unsupported keyword argument.
            HubError, ConcurrentPushError: the push failed (see ``push_task_vector``).
        """
        license = kwargs.pop("license", None)
        model_name = kwargs.pop("model_name", None)
        details = {k: kwargs.pop(k) for k in _CARD_DETAILS if kwargs.get(k) is not None}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if kwargs:
            raise TypeError(f"LinearizedTrainer.push_to_hub got unsupported arguments {sorted(kwargs)}; supported: "
                            f"license, model_name, {', '.join(_CARD_DETAILS)}, tag, repo_id.")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        push_kwargs: dict[str, Any] = dict(
            tag=tag, branch=revision or self.args.hub_revision, commit_message=commit_message,
            token=token if token is not None else self.args.hub_token,
            private=bool(private if private is not None else self.args.hub_private_repo))
        if license is not None:
            push_kwargs["license"] = license
        return self.task_vector(**details).push_to_hub(self._repo_id(repo_id, model_name), **push_kwargs)

    def _repo_id(self, repo_id: str | None, model_name: str | None) -> str:
        return (repo_id or getattr(self, "hub_model_id", None) or self.args.hub_model_id or model_name
                or Path(self._output_dir()).absolute().name)

    def _output_dir(self) -> str:
        """``args.output_dir`` (transformers fills in a default; None only if a caller cleared it)."""
        if self.args.output_dir is None:
            raise ValueError("TrainingArguments.output_dir is None; set output_dir to the folder for checkpoints.")
        return self.args.output_dir


def _is_linearized_adapter(model: torch.nn.Module) -> bool:
    """A ``PeftModel`` whose active adapter is an L-LoRA or tangent adapter (peft imported only if in use)."""
    if not hasattr(model, "peft_config") or not hasattr(model, "active_peft_config"):
        return False
    from ..adapters import is_linearized_adapter

    return is_linearized_adapter(model)


class _BaseSnapshot:
    """The pre-trained weights (on CPU) and their provenance, for ``"nonlinear"`` mode's task vector."""

    def __init__(self, model: torch.nn.Module):
        state = float_state_dict(model)
        self.fingerprint = fingerprint_state_dict(state)
        self.theta0 = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        cfg = getattr(model, "config", None)
        self.base_model = getattr(cfg, "_name_or_path", None) or None
        self.base_revision = getattr(cfg, "_commit_hash", None)

    def task_vector(self, model: torch.nn.Module, **extra: Any) -> TaskVector:
        from ..metadata import TaskVectorMetadata
        from ..task_vector import TaskVector, _check_same_keys

        state = float_state_dict(model)
        _check_same_keys(self.theta0.keys(), state.keys(), "pre-trained model", "trained model")
        deltas = {}
        for k, ref in self.theta0.items():
            work = torch.float64 if ref.dtype == torch.float64 else torch.float32
            deltas[k] = (state[k].detach().to("cpu", work) - ref.to(work)).to(torch.float32)
        meta = TaskVectorMetadata(base_model=self.base_model, base_revision=self.base_revision,
                                  base_fingerprint=self.fingerprint, created_with="fine-tuning", extra=extra)
        return TaskVector(deltas, meta)
