"""The linearized forward, stateless: ``f(x; theta0) + J_theta f(x; theta0) . delta`` in one pass.

:func:`linearized_call` evaluates a module at ``theta0`` and, in the same pass, the
Jacobian-vector product along ``delta`` (forward-mode AD). Two engines compute it:

* ``"dual"`` (default): :mod:`torch.autograd.forward_ad` dual tensors, with hand-written
  rules for ``F.linear``, ``F.layer_norm``, ``F.scaled_dot_product_attention`` and
  first-layer convolutions (:mod:`hf_taskarith.linearize.tangent_rules`). The primal pass runs outside autograd;
  only tangent operations are recorded for the backward pass.
* ``"jvp"``: ``torch.func.jvp`` over the module call, with every SDPA call computed by
  :func:`~hf_taskarith.linearize.math_attention.math_attention` (plain differentiable
  operations, zero derivatives on fully masked rows): the straightforward wrapper, kept as an
  independent reference for tests and benchmarks.

Note:
    Cost: one forward of the ``"dual"`` engine does about three matmuls per linear layer
    (primal, ``x_t W0^T`` and ``x W_t^T``) and its backward two, against one and two for an
    ordinary training step, so a step costs at least 5/3 of an ordinary one in matmuls (measured
    ratios: docs/linearized.md, *Cost, measured*). Activation
    memory is close to an ordinary step's: saved tensors are the primal activations the
    tangent needs. Operators without a forward-mode formula in PyTorch raise
    ``NotImplementedError`` naming the operator.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree as pytree
from torch import nn

from .math_attention import MathAttentionMode
from .tangent_rules import TangentRulesMode

Engine = Literal["dual", "jvp"]
ENGINES: tuple[str, ...] = ("dual", "jvp")


@contextlib.contextmanager
def swapped_parameters(module: torch.nn.Module, values: Mapping[str, torch.Tensor],
                       aliases: Mapping[str, Sequence[str]] | None = None) -> Iterator[None]:
    """Temporarily put ``values`` into ``module``'s parameter slots (restored on exit).

    Names may currently be parameters or buffers; inside the context each is a *parameter*
    slot holding the given tensor, so code that reads ``model.parameters()`` (for example
    transformers' ``model.device`` and ``model.dtype``) keeps working. ``aliases`` maps a
    name to the other names that share it (tied weights); they receive the same tensor.
    """
    aliases = aliases or {}
    saved: list[tuple[torch.nn.Module, str, str, Any]] = []
    try:
        for name, value in values.items():
            for full in (name, *aliases.get(name, ())):
                owner, _, attr = full.rpartition(".")
                mod = module.get_submodule(owner) if owner else module
                if attr in mod._parameters:
                    saved.append((mod, attr, "p", mod._parameters[attr]))
                elif attr in mod._buffers:
                    saved.append((mod, attr, "b", mod._buffers[attr]))
                    del mod._buffers[attr]
                else:
                    raise KeyError(f"{type(module).__name__} has no parameter or buffer named {full!r}.")
                mod._parameters[attr] = value
        yield
    finally:
        for mod, attr, kind, orig in reversed(saved):
            if kind == "p":
                mod._parameters[attr] = orig
            else:
                mod._parameters.pop(attr, None)
                mod._buffers[attr] = orig


@contextlib.contextmanager
def no_fused_fast_paths() -> Iterator[None]:
    """Keep ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` off their fused inference
    kernels (``torch._native_multi_head_attention``, ...), which have no forward-mode formula and
    which eval mode -- the wrapped model's mode -- would otherwise select. Restored on exit.
    A no-op while ``torch.compile`` traces (dynamo cannot trace the global switch; traced
    modules take the composite path, which has the formulas)."""
    mha = getattr(torch.backends, "mha", None)
    if torch.compiler.is_compiling() or mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def linearized_call(module: torch.nn.Module, primals: Mapping[str, torch.Tensor],
                    tangents: Mapping[str, torch.Tensor], args: Sequence[Any] = (),
                    kwargs: Mapping[str, Any] | None = None, *, engine: Engine = "dual",
                    aliases: Mapping[str, Sequence[str]] | None = None) -> tuple[Any, Any]:
    """Evaluate ``module(*args, **kwargs)`` at ``primals`` and its JVP along ``tangents``.

    Args:
        module: the network; its own tensors named in ``primals`` are replaced for the call.
        primals: name -> value of every tensor to substitute (``theta0``).
        tangents: name -> direction, for the subset of ``primals`` that is linearized
            (``delta``); names absent here are held constant.
        args, kwargs: the module's inputs.
        engine: ``"dual"`` (fast, default) or ``"jvp"`` (``torch.func.jvp`` reference).
        aliases: name -> other names sharing that tensor (tied weights).

    Returns:
        ``(output, tangent_output)``: two pytrees of the module's output structure. Leaves
        that do not depend on ``tangents`` have a ``None`` tangent.

    Raises:
        ValueError: unknown ``engine``, or a tangent has another shape than its primal.

    Example:
        >>> out, out_t = linearized_call(model, theta0, delta, (), {"input_ids": ids})
        >>> logits = out.logits + out_t.logits
    """
    kwargs = dict(kwargs or {})
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}.")
    for name, t in tangents.items():
        if name not in primals:
            raise KeyError(f"tangent {name!r} has no primal value.")
        if t.shape != primals[name].shape:
            raise ValueError(f"tangent {name!r} has shape {list(t.shape)}, its primal {list(primals[name].shape)}.")
    if engine == "jvp":
        with no_fused_fast_paths():
            return _jvp_call(module, primals, tangents, args, kwargs, aliases)
    with fwAD.dual_level(), TangentRulesMode(), no_fused_fast_paths():
        values = {n: (fwAD.make_dual(p, tangents[n]) if n in tangents else p) for n, p in primals.items()}
        with swapped_parameters(module, values, aliases):
            out = module(*args, **kwargs)
        return unpack_output(out)


def unpack_output(output: Any) -> tuple[Any, Any]:
    """``(primal, tangent)`` pytrees of an output holding dual tensors (tangent ``None`` where absent).

    Call inside the ``fwAD.dual_level()`` that made the duals.
    """
    leaves, spec = pytree.tree_flatten(output, is_leaf=_is_none)
    prim, tang = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            p, t = fwAD.unpack_dual(leaf)
            prim.append(p)
            tang.append(t)
        else:
            prim.append(leaf)
            tang.append(None)
    return pytree.tree_unflatten(prim, spec), pytree.tree_unflatten(tang, spec)


def _jvp_call(module, primals, tangents, args, kwargs, aliases):
    names = list(tangents)
    constants = {n: p for n, p in primals.items() if n not in tangents}

    def f(*values):
        with swapped_parameters(module, {**constants, **dict(zip(names, values))}, aliases):
            return module(*args, **kwargs)

    with MathAttentionMode():
        out, out_t = torch.func.jvp(f, tuple(primals[n] for n in names), tuple(tangents[n] for n in names))
    return out, out_t


def _is_none(x: Any) -> bool:
    return x is None


_HALF = (torch.float16, torch.bfloat16)


def add_tangent(output: Any, tangent: Any) -> Any:
    """``output + tangent`` leaf by leaf (floating-point tensors with a tangent only).

    Half-precision leaves (``float16``/``bfloat16``, e.g. under autocast) are summed and
    returned in float32: the tangent term is typically orders of magnitude smaller than
    ``f(x; theta0)``, and a half-precision sum (8 or 11 mantissa bits) would round most of it
    away.
    """
    leaves, spec = pytree.tree_flatten(output, is_leaf=_is_none)
    t_leaves = pytree.tree_flatten(tangent, is_leaf=_is_none)[0]
    if len(t_leaves) != len(leaves):
        raise ValueError(f"tangent output has {len(t_leaves)} leaves, the output {len(leaves)}; "
                         "their structures differ.")
    out = [_add(p, t) if isinstance(p, torch.Tensor) and isinstance(t, torch.Tensor) and p.is_floating_point() else p
           for p, t in zip(leaves, t_leaves)]
    return pytree.tree_unflatten(out, spec)


def _add(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if p.dtype in _HALF or t.dtype in _HALF:
        return p.float() + t.float()
    return p + t


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


def forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The parameters of ``model.forward``'s signature (empty when it cannot be read)."""
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def linearized_signature(model: nn.Module) -> inspect.Signature:
    """The wrapped model's forward signature, plus ``labels`` and ``num_items_in_batch`` (keyword-only).

    A :class:`~hf_taskarith.linearize.LinearizedModel` presents it, so code that reads the
    signature (``Trainer``'s ``remove_unused_columns``, its label and loss-kwargs detection)
    sees the wrapped model's inputs rather than ``(*args, **kwargs)``.
    """
    params = list(forward_params(model).values())
    if not params:
        params = [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                  inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    names = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in ("labels", "num_items_in_batch") if n not in names]
    var_kw = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature(rest + extra + var_kw)
