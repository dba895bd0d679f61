"""LinearizedModel: fine-tune in the tangent space of a pre-trained model.

``f_lin(x; theta0 + delta) = f(x; theta0) + J_theta f(x; theta0) . delta``
(Ortiz-Jimenez et al., "Task Arithmetic in the Tangent Space", NeurIPS 2023). Task vectors
trained this way add and negate with less interference, because the linearized model is
exactly linear in ``delta``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import KeyMismatchError, ShapeMismatchError, format_names
from ..io.fingerprint import fingerprint_state_dict
from ..state import float_state_dict
from .attention import make_attention_jvp_safe
from .functional import ENGINES, Engine, add_tangent, linearized_call
from .losses import get_linearized_loss, infer_loss_type

if TYPE_CHECKING:
    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(outputs, labels, num_items_in_batch=None) -> scalar``, for models without a known loss."""


class _DeltaTree(nn.Module):
    """Holds ``delta`` parameters at the wrapped model's own dotted names (``delta.<name>``)."""

    def add(self, name: str, value: torch.Tensor) -> nn.Parameter:
        *path, attr = name.split(".")
        mod: nn.Module = self
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        param = nn.Parameter(value)
        mod.register_parameter(attr, param)
        return param


class LinearizedOutput(dict):
    """Returned when a wrapped model outputs a bare tensor and ``labels`` are given.

    A dict with ``loss`` and ``logits`` (also readable as attributes), so ``Trainer`` finds
    ``outputs["loss"]``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LinearizedModel(nn.Module):
    """A model linearized around its pre-trained weights: ``f(x; theta0) + J f(x; theta0) delta``.

    ``theta0`` is held as buffers (the wrapped model's parameters, turned into buffers) and
    ``delta = theta - theta0`` as the only parameters, named ``delta.<original name>``, so any
    optimizer, ``Trainer``, DDP or FSDP trains ``delta`` alone. One forward pass evaluates the
    model at ``theta0`` and the Jacobian-vector product along ``delta`` (forward-mode AD).

    * The wrapped model stays in ``eval()`` mode: dropout is off at the linearization point
      whatever ``train()``/``eval()`` is called on the wrapper.
    * Attention is made jvp-safe automatically (:mod:`~hf_taskarith.linearize.attention`).
    * Parameters with ``requires_grad=False`` at wrap time (e.g. a frozen zero-shot head)
      are held constant: they get no ``delta``.
    * The forward returns the wrapped model's output type; every floating-point output
      (logits, hidden states, embeddings) is linearized. With ``labels``, ``loss`` is computed
      from the linearized logits by the model's own loss function (see
      :mod:`~hf_taskarith.linearize.losses`) or ``loss_fn``.

    Args:
        model: the pre-trained model (any ``nn.Module``; transformers models get their loss,
            config and attention handled).
        engine: ``"dual"`` (default; dual tensors with hand-written rules for linear layers and
            attention) or ``"jvp"`` (``torch.func.jvp``, the plain reference).
        copy_model: wrap a deep copy (default), leaving ``model`` untouched so a task vector
            can later be applied to it. ``False`` takes ``model`` over (its parameters become
            buffers) and saves one copy of the weights.
        loss_type: a registered loss type (``"ForCausalLM"``, ``"ForSequenceClassification"``,
            ...) overriding the one inferred from the model class.
        loss_fn: ``loss_fn(outputs, labels, num_items_in_batch=None)`` for other models.
        base_model, base_revision: recorded in task vectors; default to the model config's
            ``_name_or_path`` and ``_commit_hash``.

    Raises:
        ValueError: unknown ``engine``, or the model has no trainable floating-point parameter.

    Note:
        Cost: a training step does ~5 matmuls per linear layer against 3 for ordinary
        fine-tuning (measured 1.85x an ordinary step with AdamW on a MiniLM-sized BERT, CPU;
        see ``benchmarks/linearized_step.py`` and docs/linearized.md); peak memory 1.47x;
        ``theta0`` and ``delta`` together hold two copies of the weights. Generation
        (``generate``) is not supported; call :meth:`task_vector` and apply it instead.

    Example:
        >>> lin = LinearizedModel(AutoModelForSequenceClassification.from_pretrained(path))
        >>> out = lin(input_ids=ids, attention_mask=mask, labels=y)   # out.loss, out.logits
        >>> out.loss.backward(); optimizer.step()
        >>> tv = lin.task_vector()                                      # names = model's names
        >>> tv.apply_to(original_model)
    """

    def __init__(self, model: nn.Module, *, engine: Engine = "dual", copy_model: bool = True,
                 loss_type: str | None = None, loss_fn: LossFn | None = None,
                 base_model: str | None = None, base_revision: str | None = None):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {ENGINES}.")
        if loss_type is not None:
            get_linearized_loss(loss_type)  # validates
        self.engine: Engine = engine
        self.loss_fn = loss_fn
        self.loss_type = loss_type
        cfg = getattr(model, "config", None)
        self.base_model = base_model or (getattr(cfg, "_name_or_path", None) or None)
        self.base_revision = base_revision or getattr(cfg, "_commit_hash", None)

        base_state = float_state_dict(model)
        self.base_fingerprint = fingerprint_state_dict(base_state)
        inner = copy.deepcopy(model) if copy_model else model
        inner.eval()
        self.attn_implementation = make_attention_jvp_safe(inner)

        # canonical (first, as float_state_dict keeps) name -> all names of each parameter
        params_by_id: dict[int, list[str]] = {}
        for name, p in inner.named_parameters(remove_duplicate=False):
            params_by_id.setdefault(id(p), []).append(name)
        state_names = list(float_state_dict(inner))
        canonical = {}
        for names in params_by_id.values():
            first = next((n for n in state_names if n in names), names[0])
            canonical[first] = [n for n in names if n != first]
        trainable_src = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}

        self.tv_names: list[str] = list(base_state)  # the task vector's names
        self._aliases: dict[str, list[str]] = {n: a for n, a in canonical.items() if a}
        self._param_names: list[str] = list(canonical)  # every theta0 entry, canonical names
        self._trainable: list[str] = [n for n in self._param_names
                                      if (n in trainable_src or any(a in trainable_src for a in canonical[n]))
                                      and inner.get_parameter(n).is_floating_point()]
        if not self._trainable:
            raise ValueError(f"{type(model).__name__} has no trainable floating-point parameter "
                             "(all have requires_grad=False); nothing to linearize.")

        self.delta = _DeltaTree()
        self._delta_params: dict[str, nn.Parameter] = {}
        for n in self._trainable:
            self._delta_params[n] = self.delta.add(n, torch.zeros_like(inner.get_parameter(n).detach()))
        _parameters_to_buffers(inner)
        self.model = inner
        self._accepts_use_cache = "use_cache" in _forward_params(inner)

    # -- modes ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LinearizedModel":
        """Sets the wrapper's mode; the wrapped model stays in ``eval()`` (dropout off at theta0)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def config(self):
        """The wrapped model's config (``None`` for plain modules)."""
        return getattr(self.model, "config", None)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether ``num_items_in_batch`` reaches the loss (read by ``Trainer``), as for the wrapped model."""
        value = getattr(self.model, "accepts_loss_kwargs", None)
        if value is not None:
            return bool(value)
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in _forward_params(self.model).values())

    # -- state ------------------------------------------------------------------------
    @property
    def trainable_names(self) -> list[str]:
        """Names (the wrapped model's) of the linearized parameters."""
        return list(self._trainable)

    def theta0(self) -> dict[str, torch.Tensor]:
        """Name -> pre-trained value of every parameter of the wrapped model (canonical names)."""
        return {n: self.model.get_buffer(n) for n in self._param_names}

    def deltas(self) -> dict[str, nn.Parameter]:
        """Name -> ``delta`` parameter, keyed by the wrapped model's names."""
        return dict(self._delta_params)

    # -- forward ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Linearized forward; accepts the wrapped model's inputs (plus ``labels``)."""
        labels = kwargs.pop("labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if self._accepts_use_cache:
            kwargs.setdefault("use_cache", False)
        out, out_t = linearized_call(self.model, self.theta0(), self._delta_params, args, kwargs,
                                     engine=self.engine, aliases=self._aliases)
        out = add_tangent(out, out_t)
        if labels is None:
            return out
        loss = self.compute_loss(out, labels, num_items_in_batch=num_items_in_batch)
        if isinstance(out, torch.Tensor):
            return LinearizedOutput(loss=loss, logits=out)
        if hasattr(out, "keys") and "loss" in getattr(type(out), "__dataclass_fields__", {}):
            return type(out)(**{"loss": loss, **{k: v for k, v in out.items() if k != "loss"}})
        if isinstance(out, Mapping):
            return {"loss": loss, **out}
        raise TypeError(f"cannot attach a loss to a {type(out).__name__} output; call without labels "
                        "and compute the loss yourself.")

    def compute_loss(self, outputs: Any, labels: torch.Tensor, *, num_items_in_batch: Any = None) -> torch.Tensor:
        """The loss of linearized ``outputs``: ``loss_fn`` if given, else the model's own loss function.

        Raises:
            ValueError: no ``loss_fn`` and no registered loss for the wrapped model's type.
        """
        if self.loss_fn is not None:
            return self.loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)
        loss_type = self.loss_type or infer_loss_type(self.model)
        if loss_type is None:
            raise ValueError(f"don't know the loss of {type(self.model).__name__}; pass loss_type= "
                             "(a transformers loss type) or loss_fn= to LinearizedModel.")
        return get_linearized_loss(loss_type)(self.model, outputs, labels, num_items_in_batch)

    # -- task vectors -----------------------------------------------------------------
    def task_vector(self, *, dtype: torch.dtype = torch.float32, **extra: Any) -> "TaskVector":
        """``delta`` as a :class:`~hf_taskarith.TaskVector` over the wrapped model's names.

        Names equal ``float_state_dict(model)`` (tied weights once, float buffers and frozen
        parameters included with zero deltas), so ``tv.apply_to(original_model)`` and
        :func:`~hf_taskarith.merge` accept it. ``extra`` is recorded in the metadata.
        """
        from ..metadata import TaskVectorMetadata
        from ..task_vector import TaskVector

        shapes = {n: t for n, t in self._theta0_state().items()}
        deltas = {}
        for name, ref in shapes.items():
            d = self._delta_params.get(name)
            deltas[name] = (d.detach().to(dtype=dtype, copy=True) if d is not None
                            else torch.zeros(ref.shape, dtype=dtype, device=ref.device))
        meta = TaskVectorMetadata(base_model=self.base_model, base_revision=self.base_revision,
                                  base_fingerprint=self.base_fingerprint, created_with="linearized",
                                  extra={"engine": self.engine, "linearized_parameters": len(self._trainable),
                                         **extra})
        return TaskVector(deltas, meta)

    def load_task_vector(self, tv: Mapping[str, torch.Tensor], *, scaling: float = 1.0,
                         strict: bool = True) -> "LinearizedModel":
        """Set ``delta = scaling * tv`` (e.g. a sum of tangent-space task vectors) and return self.

        Raises:
            KeyMismatchError: ``strict`` and the names differ from :meth:`task_vector`'s.
            ShapeMismatchError: a tensor has another shape.
        """
        expected = set(self.tv_names)
        if strict and set(tv.keys()) != expected:
            raise KeyMismatchError(
                f"task vector names differ from this model's: missing [{format_names(sorted(expected - set(tv)))}]"
                f"; unexpected [{format_names(sorted(set(tv) - expected))}]. Pass strict=False to load the overlap.")
        with torch.no_grad():
            for name, p in self._delta_params.items():
                if name not in tv:
                    continue
                value = tv[name]
                if tuple(value.shape) != tuple(p.shape):
                    raise ShapeMismatchError(f"{name}: task vector {list(value.shape)} vs model {list(p.shape)}.")
                p.copy_(value.to(device=p.device, dtype=p.dtype) * scaling)
        return self

    def _theta0_state(self) -> dict[str, torch.Tensor]:
        state = float_state_dict(self.model)
        missing = [n for n in self.tv_names if n not in state]
        if missing:  # cannot happen unless the wrapped model was edited after wrapping
            raise KeyMismatchError(f"wrapped model lost tensors since wrapping: {format_names(missing)}.")
        return {n: state[n] for n in self.tv_names}

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self._delta_params.values())
        return f"engine={self.engine!r}, linearized_parameters={len(self._trainable)}, numel={n}"


def _forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _parameters_to_buffers(model: nn.Module) -> None:
    """Turn every parameter of ``model`` into a (persistent) buffer holding the same tensor."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            del module._parameters[name]
            module.register_buffer(name, None if p is None else p.detach(), persistent=True)
