"""Hand-written forward-mode rules for the operators that dominate a transformer's cost.

Forward-mode AD in PyTorch (:mod:`torch.autograd.forward_ad`) carries a tangent beside
every tensor and applies each operator's built-in JVP formula. That is correct, but for the
linearized models of this package some operators deserve better:

* ``F.linear``: the built-in formula records the primal matmul in the graph it hands to the
  backward pass and materialises transposes. Here the primal ``x W0^T + b0`` runs outside
  autograd (``W0`` is frozen), and the tangent ``x_t W0^T + x W_t^T + b_t`` is one
  :class:`torch.autograd.Function` whose backward does exactly two matmuls
  (``g W0`` and ``g^T x``), the same as an ordinary linear layer.
* ``F.layer_norm``: PyTorch's formula decomposes into some twenty elementwise operations
  whose intermediates autograd keeps. Here the primal is one ``native_layer_norm`` (giving
  ``x_hat`` and ``rstd``) plus the affine map, and the tangent
  ``rstd (x_t - mean(x_t) - x_hat mean(x_hat x_t)) w0 + x_hat w_t + b_t`` is one
  :class:`torch.autograd.Function` saving ``x_hat`` and ``rstd`` only.
* ``F.gelu``: the built-in formula evaluates the derivative (``erf``, ``exp``) in the forward
  and again in the backward; here ``gelu'(x)`` is computed once and saved, and both directions
  are a multiply (5% of a ViT step on one CPU thread).
* ``F.scaled_dot_product_attention``: its fused CPU/CUDA kernels have no forward-mode
  formula at all; :mod:`~hf_taskarith.linearize.attention_rule` computes attention
  explicitly with the analytic tangent of softmax attention, so models using
  ``attn_implementation="sdpa"`` work unchanged.

Mixed precision (the dtype policy, see docs/linearized.md): under autocast the matmul rules
(linear, convolution, attention) compute primal and tangent in autocast's dtype, as autocast
computes the primal, casting their operands explicitly *outside* their
:class:`torch.autograd.Function`, so the backward pass sees one dtype whatever the device's
autocast lists say (CPU and CUDA differ); layer norm computes in float32 and returns the dtype
PyTorch's own call would. On half-precision tensors without autocast every rule computes in the
tensors' dtype (layer norm accumulating in float32). A rule steps aside (:data:`NotImplemented`)
where a primal needs a graph (a caller differentiating w.r.t. the input, or parameters trained
non-linearly with ``rest="train"``); every other operator falls through to PyTorch's own JVP
formulas. Rules live in a registry keyed by the torch function; :func:`register_tangent_rule`
adds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .reentrant import call_reentrant

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
    own torch calls do not re-enter it; functions without a rule that are written in Python
    (``F.multi_head_attention_forward``) run with the mode active, so the linear layers and
    attention nested in them get their rules too.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return call_reentrant(self, func, types, args, kwargs)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's lower-precision dtype on ``device_type`` when autocast is on there, else ``None``."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` in ``dtype`` (a differentiable cast; ``None`` and same-dtype tensors pass through)."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def no_autocast(device_type: str):
    """A context that switches autocast off on ``device_type`` (operands are cast explicitly)."""
    return torch.autocast(device_type, enabled=False)


def split_dual(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(primal, tangent)`` of a possibly dual tensor; ``(None, None)`` for ``None``."""
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
    w0, w_t = split_dual(weight)
    if w_t is None or input.dim() == 0:
        return NotImplemented
    x, x_t = split_dual(input)
    b0, b_t = split_dual(bias)
    if x.requires_grad or (b0 is not None and b0.requires_grad):
        # a caller differentiating w.r.t. the input, or a bias trained non-linearly (rest="train"):
        # let autograd see everything
        return NotImplemented
    device = x.device.type
    dtype = autocast_dtype(device) or x.dtype
    if any(t is not None and t.dtype != dtype for t in (w0, b0)) and autocast_dtype(device) is None:
        return NotImplemented  # mixed dtypes without autocast: PyTorch's formula raises its own error
    x, x_t, w0, w_t, b0, b_t = (cast(t, dtype) for t in (x, x_t, w0, w_t, b0, b_t))
    with no_autocast(device):
        with torch.no_grad():
            y = F.linear(x, w0, b0)
        y_t = _LinearTangent.apply(x, x_t, w0, w_t, b_t)
    return fwAD.make_dual(y, y_t)


class _LayerNormTangent(torch.autograd.Function):
    """``rstd (x_t - mean(x_t) - x_hat mean(x_hat x_t)) w0 + x_hat w_t + b_t``; ``x_hat``, ``rstd``, ``w0`` constant.

    Means run over the last ``n`` dimensions. The map ``x_t -> rstd (x_t - mean(x_t) - x_hat
    mean(x_hat x_t))`` is symmetric, so the backward applies it to ``g w0``.
    """

    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, rstd: torch.Tensor, w0: torch.Tensor | None, n: int,
                x_t: torch.Tensor | None, w_t: torch.Tensor | None, b_t: torch.Tensor | None) -> torch.Tensor:
        dims = tuple(range(-n, 0))
        y_t = None
        if x_t is not None:
            y_t = _normalized_tangent(x_hat, rstd, x_t, dims)
            if w0 is not None:
                y_t.mul_(w0)
        if w_t is not None:
            y_t = x_hat * w_t if y_t is None else y_t.addcmul_(x_hat, w_t)
        if b_t is not None:
            y_t = torch.zeros_like(x_hat).add_(b_t) if y_t is None else y_t.add_(b_t)
        ctx.save_for_backward(x_hat, rstd, w0)
        ctx.n = n
        ctx.has = (x_t is not None, w_t is not None, b_t is not None)
        return y_t

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_hat, rstd, w0 = ctx.saved_tensors
        dims = tuple(range(-ctx.n, 0))
        rows = tuple(range(g.dim() - ctx.n))
        has_x, has_w, has_b = ctx.has
        g_x = g_w = g_b = None
        if has_x and ctx.needs_input_grad[4]:
            g_x = _normalized_tangent(x_hat, rstd, g * w0 if w0 is not None else g, dims)
        if has_w and ctx.needs_input_grad[5]:
            g_w = (g * x_hat).sum(rows)
        if has_b and ctx.needs_input_grad[6]:
            g_b = g.sum(rows)
        return None, None, None, None, g_x, g_w, g_b


def _normalized_tangent(x_hat: torch.Tensor, rstd: torch.Tensor, t: torch.Tensor,
                        dims: tuple[int, ...]) -> torch.Tensor:
    """``rstd (t - mean(t) - x_hat mean(x_hat t))`` (a new tensor)."""
    m2 = (x_hat * t).mean(dims, keepdim=True)
    out = t - t.mean(dims, keepdim=True)
    return out.addcmul_(x_hat, m2, value=-1).mul_(rstd)


@register_tangent_rule(F.layer_norm)
def layer_norm_rule(input: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5):
    """Tangent rule for ``F.layer_norm``: computed in float32 (float64 stays float64), returned in the
    dtype PyTorch's own call returns (under autocast: the device's autocast rule for layer norm)."""
    x, x_t = split_dual(input)
    w0, w_t = split_dual(weight)
    b0, b_t = split_dual(bias)
    if x_t is None and w_t is None and b_t is None:
        return NotImplemented
    if any(t is not None and t.requires_grad for t in (x, w0, b0)):
        return NotImplemented
    device = x.device.type
    if autocast_dtype(device) is None and any(t is not None and t.dtype != x.dtype for t in (w0, b0)):
        return NotImplemented
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    try:
        out_dtype = _layer_norm_dtype(x, shape, w0, b0)
    except RuntimeError:  # a dtype combination PyTorch refuses: let it raise its own error
        return NotImplemented
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, x_t, w0, w_t, b0, b_t = (cast(t, work) for t in (x, x_t, w0, w_t, b0, b_t))
    with no_autocast(device):
        with torch.no_grad():
            y, mean, rstd = torch.native_layer_norm(x, shape, w0, b0, eps)
            x_hat = (x - mean).mul_(rstd)  # cheaper than a second, non-affine layer norm
        y_t = _LayerNormTangent.apply(x_hat, rstd, w0, len(shape), x_t, w_t, b_t)
    return fwAD.make_dual(y.to(out_dtype), cast(y_t, out_dtype))


def _layer_norm_dtype(x: torch.Tensor, shape: tuple[int, ...], w: torch.Tensor | None,
                      b: torch.Tensor | None) -> torch.dtype:
    """The dtype ``F.layer_norm`` returns here: the input's, or what autocast makes of it (CUDA: float32,
    CPU: unchanged), read off a call on an empty slice (no work, no device-specific list to keep)."""
    if autocast_dtype(x.device.type) is None:
        return x.dtype
    with torch.no_grad():
        return F.layer_norm(x.new_empty((0, *shape)), shape, w, b).dtype


class _ScaleTangent(torch.autograd.Function):
    """``d * x_t`` for a constant ``d`` (the derivative of an elementwise function at the
    primal): one multiply forward, one backward, ``d`` the only saved tensor."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        return d * x_t

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (d,) = ctx.saved_tensors
        return None, g * d


@register_tangent_rule(F.gelu)
def gelu_rule(input: torch.Tensor, approximate: str = "none"):
    """Tangent rule for ``F.gelu``: ``gelu'(x) x_t``, with ``gelu'(x)`` evaluated once.

    PyTorch's formula evaluates the derivative (erf and exp) twice per step: ``gelu_backward(x_t,
    x)`` forward, and again as that node's backward; here it is computed once and both
    directions are a multiply.
    """
    x, x_t = split_dual(input)
    if x_t is None or x.requires_grad:
        return NotImplemented
    with torch.no_grad():
        y = F.gelu(x, approximate=approximate)  # autocast, if on, decides the dtype
        x = cast(x, y.dtype)
        d = torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate=approximate)
    return fwAD.make_dual(y, _ScaleTangent.apply(d, cast(x_t, y.dtype)))


def _weight_only_conv_rule(conv: Callable[..., torch.Tensor]) -> TangentRule:
    def rule(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        x, x_t = split_dual(input)
        w0, w_t = split_dual(weight)
        b0, b_t = split_dual(bias)
        if x_t is not None or w_t is None:
            return NotImplemented
        if x.requires_grad or w0.requires_grad or (b0 is not None and b0.requires_grad):
            return NotImplemented
        device = x.device.type
        dtype = autocast_dtype(device) or x.dtype
        x, w0, w_t, b0, b_t = (cast(t, dtype) for t in (x, w0, w_t, b0, b_t))
        with no_autocast(device):
            with torch.no_grad():
                y = conv(x, w0, b0, *args, **kwargs)
            y_t = conv(x, w_t, b_t, *args, **kwargs)
        return fwAD.make_dual(y, y_t)

    rule.__name__ = rule.__qualname__ = f"{conv.__name__}_rule"
    rule.__doc__ = (f"Tangent rule for ``F.{conv.__name__}`` on an input without tangent (a first layer, e.g. a "
                    "patch embedding): ``conv(x, W_t) + b_t``, one convolution, where PyTorch's formula also "
                    "convolves a zero input tangent.")
    return rule


for _conv in (F.conv1d, F.conv2d, F.conv3d):
    register_tangent_rule(_conv)(_weight_only_conv_rule(_conv))


# the attention rule lives in its own module; importing it registers it
from . import attention_rule  # noqa: E402,F401
