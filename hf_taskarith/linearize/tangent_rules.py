"""Hand-written forward-mode rules for the operators that dominate a transformer's cost.

Forward-mode AD in PyTorch (:mod:`torch.autograd.forward_ad`) carries a tangent beside
every tensor and applies each operator's built-in JVP formula. That is correct, but for the
linearized models of this package two operators deserve better:

* ``F.linear``: the built-in formula records the primal matmul in the graph it hands to the
  backward pass and materialises transposes. Here the primal ``x W0^T + b0`` runs outside
  autograd (``W0`` is frozen), and the tangent ``x_t W0^T + x W_t^T + b_t`` is one
  :class:`torch.autograd.Function` whose backward does exactly two matmuls
  (``g W0`` and ``g^T x``), the same as an ordinary linear layer.
* ``F.scaled_dot_product_attention``: its fused CPU/CUDA kernels have no forward-mode
  formula at all. The rule below computes attention explicitly (the math backend) with the
  analytic tangent of softmax attention, so models using ``attn_implementation="sdpa"``
  work unchanged.

Every other operator falls through to PyTorch's own JVP formulas. Rules live in a
string-free registry keyed by the torch function; :func:`register_tangent_rule` adds one.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

TangentRule = Callable[..., Any]
"""A rule takes the torch function's ``(*args, **kwargs)`` (some tensors are dual) and returns
its output as dual tensors, or :data:`NotImplemented` to fall back to PyTorch's formula."""

_RULES: dict[Callable[..., Any], TangentRule] = {}


def register_tangent_rule(func: Callable[..., Any]) -> Callable[[TangentRule], TangentRule]:
    """Decorator: use ``rule`` instead of PyTorch's JVP formula for ``func`` inside linearized calls.

    Raises:
        ValueError: a rule for ``func`` is already registered.
    """

    def decorate(rule: TangentRule) -> TangentRule:
        if func in _RULES:
            raise ValueError(f"a tangent rule for {getattr(func, '__name__', func)!r} is already registered "
                             f"({_RULES[func].__name__}); registered: {sorted(f.__name__ for f in _RULES)}.")
        _RULES[func] = rule
        return rule

    return decorate


class TangentRulesMode(TorchFunctionMode):
    """Dispatches registered torch functions to their hand-written tangent rules.

    Active only inside :func:`hf_taskarith.linearize.functional.linearized_call` with
    ``engine="dual"``. Inside ``__torch_function__`` the mode is popped, so the rules'
    own torch calls do not re-enter it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def _split(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if t is None:
        return None, None
    p, tangent = fwAD.unpack_dual(t)
    return p, tangent


class _LinearTangent(torch.autograd.Function):
    """``x_t W0^T + x W_t^T + b_t`` with a two-matmul backward (``W0`` and ``x`` are constants)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_t: torch.Tensor | None, w0: torch.Tensor,
                w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b_t, x2, w_t.t()) if b_t is not None else x2 @ w_t.t()
        if x_t is not None:
            y.addmm_(x_t.reshape(-1, x_t.shape[-1]), w0.t())
        ctx.save_for_backward(x, w0)
        ctx.x_t_shape = None if x_t is None else x_t.shape
        ctx.has_bias = b_t is not None
        return y.view(*x.shape[:-1], w_t.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w0 = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_xt = grad_wt = grad_bt = None
        if ctx.x_t_shape is not None and ctx.needs_input_grad[1]:
            grad_xt = (g2 @ w0).view(ctx.x_t_shape)
        if ctx.needs_input_grad[3]:
            grad_wt = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bt = g2.sum(0)
        return None, grad_xt, None, grad_wt, grad_bt


@register_tangent_rule(F.linear)
def linear_rule(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Tangent rule for ``F.linear`` when the weight carries a tangent (a trained layer)."""
    w0, w_t = _split(weight)
    if w_t is None or torch.is_autocast_enabled(input.device.type) or input.dim() == 0:
        return NotImplemented
    x, x_t = _split(input)
    b0, b_t = _split(bias)
    if x.requires_grad or (b0 is not None and b0.requires_grad):
        # a caller differentiating w.r.t. the input, or a bias trained non-linearly (rest="train"):
        # let autograd see everything
        return NotImplemented
    with torch.no_grad():
        y = F.linear(x, w0, b0)
    y_t = _LinearTangent.apply(x, x_t, w0, w_t, b_t)
    return fwAD.make_dual(y, y_t)


_SDPA_SIGNATURE = inspect.Signature([
    inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in [
        ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
        ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
        ("is_causal", False), ("scale", None), ("enable_gqa", False),
    ]
])


@register_tangent_rule(F.scaled_dot_product_attention)
def sdpa_rule(*args: Any, **kwargs: Any):
    """Tangent rule for ``F.scaled_dot_product_attention`` (the explicit "math" computation).

    With ``P = softmax(S)``, ``S = scale * Q K^T + mask`` and ``O = P V``:
    ``S_t = scale (Q_t K^T + Q K_t^T)``, ``P_t = P * (S_t - rowsum(P * S_t))`` and
    ``O_t = P_t V + P V_t``. Fully masked rows give zeros, as PyTorch's math backend does.
    """
    bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
    a = bound.arguments
    q, q_t = _split(a["query"])
    k, k_t = _split(a["key"])
    v, v_t = _split(a["value"])
    mask = a.get("attn_mask")
    if q_t is None and k_t is None and v_t is None:
        return NotImplemented
    if mask is not None and fwAD.unpack_dual(mask).tangent is not None:
        return NotImplemented
    if a.get("dropout_p", 0.0):
        raise ValueError(
            f"scaled_dot_product_attention was called with dropout_p={a['dropout_p']} inside a "
            "linearized model; the linearization point must be deterministic. Put the wrapped "
            "model in eval mode (LinearizedModel does this itself)."
        )
    if a.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        k_t = None if k_t is None else k_t.repeat_interleave(rep, dim=-3)
        v_t = None if v_t is None else v_t.repeat_interleave(rep, dim=-3)
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # primals need a graph only when they depend on parameters trained non-linearly (rest="train")
    primal_grad = q.requires_grad or k.requires_grad or v.requires_grad
    with contextlib.nullcontext() if primal_grad else torch.no_grad():
        s = (q @ k.transpose(-2, -1)) * scale
        if a.get("is_causal", False):
            causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~causal, float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = torch.softmax(s, dim=-1)
        p = torch.where(torch.isnan(p), torch.zeros((), dtype=p.dtype, device=p.device), p)
        out = p @ v
    s_t = None
    if q_t is not None:
        s_t = (q_t @ k.transpose(-2, -1)) * scale
    if k_t is not None:
        term = (q @ k_t.transpose(-2, -1)) * scale
        s_t = term if s_t is None else s_t + term
    out_t = None
    if s_t is not None:
        ps = p * s_t
        p_t = ps - p * ps.sum(dim=-1, keepdim=True)
        out_t = p_t @ v
    if v_t is not None:
        term = p @ v_t
        out_t = term if out_t is None else out_t + term
    return fwAD.make_dual(out, out_t)
