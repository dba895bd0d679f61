"""LinearizedModel: fine-tune in the tangent space of a pre-trained model.

``f_lin(x; theta0 + delta) = f(x; theta0) + J_theta f(x; theta0) . delta``
(Ortiz-Jimenez et al., "Task Arithmetic in the Tangent Space", NeurIPS 2023). Task vectors
trained this way add and negate with less interference, because the linearized model is
exactly linear in ``delta``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..io.fingerprint import fingerprint_state_dict
from ..state import float_state_dict
from .attention import make_attention_jvp_safe
from .checkpointing import CheckpointingMixin, checkpointed
from .functional import (
    ENGINES,
    Engine,
    LinearizedOutput,
    add_tangent,
    forward_params,
    linearized_call,
    linearized_signature,
)
from .kernels import disable_hub_kernels
from .losses import get_linearized_loss, infer_loss_type
from .persistence import auto_class_name
from .selection import RESTS, ParameterSelector, Rest, select_parameters, selector_record
from .storage import DeltaTree, check_float_parameters, check_unsharded, delta_dtype, freeze_parameters
from .task_vector_io import TaskVectorIO

logger = logging.getLogger(__name__)

#: Dynamo does not trace forward-mode dual tensors faithfully (a compiled dual forward silently
#: dropped the tangent: wrong outputs). Under ``torch.compile`` the dual engine therefore traces the
#: ``torch.func.jvp`` formulation instead (one graph, no breaks: inductor fuses the elementwise
#: tangent work that the eager rules exist to save); only activation checkpointing, which replays
#: dual layers, keeps the eager dual call behind a graph break.
_eager_linearized_call = torch.compiler.disable(linearized_call)

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(outputs, labels, num_items_in_batch=None) -> scalar``, for models without a known loss."""


class LinearizedModel(TaskVectorIO, CheckpointingMixin, nn.Module):
    """A model linearized around its pre-trained weights: ``f(x; theta0) + J f(x; theta0) delta``.

    ``theta0`` is the wrapped model's own parameters, frozen (``requires_grad=False``; the wrapped
    model stays an ordinary transformers model: ``.device``, ``.dtype``, ``save_pretrained``), and
    ``delta = theta - theta0`` is held as parameters named ``delta.<original name>``, so
    ``Trainer``, DDP or any optimizer over the ``requires_grad`` parameters trains ``delta``
    alone (FSDP2: shard the whole wrapper as one unit, ``fully_shard(lin)``; see docs/linearized.md). One forward
    pass evaluates the model at ``theta0`` and the Jacobian-vector product along ``delta``
    (forward-mode AD).

    * The wrapped model stays in ``eval()`` mode: dropout is off at the linearization point
      whatever ``train()``/``eval()`` is called on the wrapper.
    * Attention is made jvp-safe automatically (:mod:`~hf_taskarith.linearize.attention`).
    * Parameters with ``requires_grad=False`` at wrap time (e.g. a frozen zero-shot head)
      are held constant: they get no ``delta``.
    * Partial linearization: ``linearize=`` picks which trainable parameters get a ``delta``
      (:mod:`~hf_taskarith.linearize.selection`); the others are held constant
      (``rest="frozen"``) or trained normally, non-linearly, as parameters named
      ``nonlinear.<original name>`` (``rest="train"``).
    * The forward returns the wrapped model's output type; every floating-point output
      (logits, hidden states, embeddings) is linearized. With ``labels``, ``loss`` is computed
      from the linearized logits by the model's own loss function (see
      :mod:`~hf_taskarith.linearize.losses`) or ``loss_fn``.

    Args:
        model: the pre-trained model (any ``nn.Module``; transformers models get their loss,
            config and attention handled).
        engine: ``"dual"`` (default; dual tensors with hand-written rules for linear layers and
            attention) or ``"jvp"`` (``torch.func.jvp``, the plain reference).
        linearize: which trainable parameters are linearized: ``None`` (all), a regex or list
            of regexes searched in parameter names, or ``(name, tensor) -> bool``.
        rest: what the trainable parameters ``linearize`` leaves out do: ``"frozen"`` (held at
            ``theta0``) or ``"train"`` (ordinary parameters, entering the model non-linearly).
        copy_model: wrap a deep copy (default), leaving ``model`` untouched so a task vector
            can later be applied to it. ``False`` takes ``model`` over (its parameters become
            buffers) and saves one copy of the weights.
        loss_type: a registered loss type (``"ForCausalLM"``, ``"ForSequenceClassification"``,
            ...) overriding the one inferred from the model class.
        loss_fn: ``loss_fn(outputs, labels, num_items_in_batch=None)`` for other models.
        base_model, base_revision: recorded in task vectors (and used by :meth:`from_pretrained`
            to reload the base); default to the model config's ``_name_or_path`` and
            ``_commit_hash``.

    Raises:
        ValueError: unknown ``engine`` or ``rest``; the model has no parameters, no
            floating-point parameters (quantized weights: dequantize first) or no trainable
            ones; a ``linearize`` pattern matches nothing.

    Note:
        Cost: a training step does ~5 matmuls per linear layer against 3 for ordinary
        fine-tuning, so at least 5/3 of an ordinary step in matmul work; the measured ratios
        (time and peak memory, by model and device) are in docs/linearized.md, *Cost,
        measured* (``benchmarks/linearized_step.py``), the one place they are quoted;
        ``theta0`` and ``delta`` together hold two copies of the weights (so do ``theta0`` and
        the ``nonlinear`` parameters). Half-precision bases keep ``delta`` in float32 and
        return linearized outputs in float32, so the small tangent term is not rounded away
        (see docs/linearized.md). Generation (``generate``) is not supported; call
        :meth:`task_vector` and apply it instead.

    Example:
        >>> lin = LinearizedModel(AutoModelForSequenceClassification.from_pretrained(path))
        >>> out = lin(input_ids=ids, attention_mask=mask, labels=y)   # out.loss, out.logits
        >>> out.loss.backward(); optimizer.step()
        >>> tv = lin.task_vector()                                      # names = model's names
        >>> tv.apply_to(original_model)
        >>> LinearizedModel(model, linearize=r"attention", rest="train")   # partial
    """

    def __init__(self, model: nn.Module, *, engine: Engine = "dual", linearize: ParameterSelector | None = None,
                 rest: Rest = "frozen", copy_model: bool = True, loss_type: str | None = None,
                 loss_fn: LossFn | None = None, base_model: str | None = None, base_revision: str | None = None):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {ENGINES}.")
        if rest not in RESTS:
            raise ValueError(f"rest={rest!r} is not one of {RESTS}: 'frozen' holds the parameters linearize= "
                             "leaves out at theta0, 'train' trains them normally.")
        if loss_type is not None:
            get_linearized_loss(loss_type)  # validates
        check_float_parameters(model)
        self.engine: Engine = engine
        self.rest: Rest = rest
        self.loss_fn = loss_fn
        self.loss_type = loss_type
        cfg = getattr(model, "config", None)
        self.base_model = base_model or (getattr(cfg, "_name_or_path", None) or None)
        self.base_revision = base_revision or getattr(cfg, "_commit_hash", None)

        base_state = float_state_dict(model)
        self.base_fingerprint = fingerprint_state_dict(base_state)
        inner = copy.deepcopy(model) if copy_model else model
        disable_hub_kernels(inner)  # before eval(): mode switches re-kernelize a kernelized model
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
        trainable = [n for n in self._param_names
                     if (n in trainable_src or any(a in trainable_src for a in canonical[n]))
                     and inner.get_parameter(n).is_floating_point()]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable floating-point parameter "
                             "(all have requires_grad=False); nothing to linearize.")
        selected = select_parameters({n: canonical[n] for n in trainable},
                                     {n: inner.get_parameter(n) for n in trainable}, linearize)
        self._trainable: list[str] = selected
        self._nonlinear: list[str] = [n for n in trainable if n not in selected] if rest == "train" else []
        self._linearize_record = selector_record(linearize, selected)
        self._model_class = type(inner).__name__
        self._auto_class = auto_class_name(inner)

        self.delta = DeltaTree()
        for n in self._trainable:
            w = inner.get_parameter(n).detach()
            self.delta.add(n, torch.zeros_like(w, dtype=delta_dtype(w.dtype)))
        self.nonlinear = DeltaTree()
        for n in self._nonlinear:
            self.nonlinear.add(n, inner.get_parameter(n).detach().clone())
        freeze_parameters(inner)
        self.model = inner
        self._accepts_use_cache = "use_cache" in forward_params(inner)
        self._gradient_checkpointing = False
        self._checkpoint_layers: list[nn.Module] = []
        self._present_signature()

    # Looked up by name at each use, never cached: FSDP (fully_shard) and other wrappers replace
    # the registered parameter objects (sharded DTensors at rest, unsharded ones in forward).
    @property
    def _delta_params(self) -> dict[str, nn.Parameter]:
        return {n: _tensor_at(self.delta, n) for n in self._trainable}

    @property
    def _nonlinear_params(self) -> dict[str, nn.Parameter]:
        return {n: _tensor_at(self.nonlinear, n) for n in self._nonlinear}

    def _present_signature(self) -> None:
        """Give this instance's ``forward`` the wrapped model's signature (see :func:`linearized_signature`)."""
        signature = linearized_signature(self.model)
        plain = type(self).forward

        @functools.wraps(plain)
        def forward(module: LinearizedModel, *args: Any, **kwargs: Any) -> Any:
            return plain(module, *args, **kwargs)

        forward.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *signature.parameters.values()])
        self.forward = types.MethodType(forward, self)  # type: ignore[method-assign]  # per-instance signature

    # -- construction from task vectors and saved folders ------------------------------
    # -- modes ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> LinearizedModel:
        """Sets the wrapper's mode; the wrapped model stays in ``eval()`` (dropout off at theta0).

        The wrapped model's ``train()`` is never called, so nothing transformers does on a mode
        switch (re-kernelizing, for one) runs on it.
        """
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}.")
        self.training = mode
        for child in self.children():
            if child is not self.model:
                child.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        """The device of theta0 (the wrapped model's parameters)."""
        return next(iter(self.theta0().values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The wrapped model's floating-point dtype (theta0's; ``delta`` may be float32, see the dtype policy)."""
        return getattr(self.model, "dtype", None) or next(iter(self.theta0().values())).dtype

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
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward_params(self.model).values())

    # -- state ------------------------------------------------------------------------
    @property
    def trainable_names(self) -> list[str]:
        """Names (the wrapped model's) of the linearized parameters."""
        return list(self._trainable)

    @property
    def nonlinear_names(self) -> list[str]:
        """Names (the wrapped model's) of the parameters trained non-linearly (``rest="train"``)."""
        return list(self._nonlinear)

    def theta0(self) -> dict[str, torch.Tensor]:
        """Name -> pre-trained value of every parameter of the wrapped model (canonical names)."""
        return {n: self.model.get_parameter(n) for n in self._param_names}

    def deltas(self) -> dict[str, nn.Parameter]:
        """Name -> ``delta`` parameter, keyed by the wrapped model's names."""
        return dict(self._delta_params)

    def nonlinear_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter trained non-linearly (``rest="train"``; empty otherwise)."""
        return dict(self._nonlinear_params)

    # -- forward ----------------------------------------------------------------------
    def forward(self, *args: Any, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        """Linearized forward; accepts the wrapped model's inputs (plus ``labels``).

        Each instance presents the wrapped model's signature (``inspect.signature(lin.forward)``),
        with ``labels`` and ``num_items_in_batch`` added.
        """
        if self._accepts_use_cache:
            kwargs.setdefault("use_cache", False)
        primals = self.theta0()
        primals.update(self._nonlinear_params)
        check_unsharded(primals)
        tangents = {n: d if d.dtype == primals[n].dtype else d.to(primals[n].dtype)
                    for n, d in self._delta_params.items()}
        layers = self._checkpoint_layers if self._gradient_checkpointing and self.training else []
        engine, call = self._engine_for_call(bool(layers))
        try:
            with checkpointed(layers):
                out, out_t = call(self.model, primals, tangents, args, kwargs, engine=engine, aliases=self._aliases)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"{e}\nThe linearized forward needs forward-mode AD through every operation downstream of a "
                "linearized parameter, and this one has none. Workarounds: linearize only parameters after that "
                "operation (linearize=[...] with rest='frozen' or 'train'); give the operation a rule with "
                "hf_taskarith.linearize.register_tangent_rule(torch_function); for a custom "
                "torch.autograd.Function, implement its jvp staticmethod.") from e
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

    def _engine_for_call(self, checkpointing: bool) -> tuple[Engine, Callable[..., Any]]:
        """The engine this call runs and how: eager, or traced by ``torch.compile`` (see above)."""
        if self.engine == "jvp":
            return "jvp", linearized_call
        if torch.compiler.is_compiling() and not checkpointing:
            return "jvp", linearized_call
        return "dual", _eager_linearized_call

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

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self._delta_params.values())
        s = f"engine={self.engine!r}, linearized_parameters={len(self._trainable)}, numel={n}"
        if self._nonlinear:
            s += f", rest='train', nonlinear_parameters={len(self._nonlinear)}"
        return s


def _tensor_at(root: nn.Module, name: str) -> Any:
    """The parameter ``name`` of ``root`` (``get_parameter`` without its type check), so the
    lookup also works while ``torch.func.functional_call`` has put plain tensors in its place
    (learned coefficients substitute ``delta`` that way)."""
    module, _, leaf = name.rpartition(".")
    return getattr(root.get_submodule(module) if module else root, leaf)

