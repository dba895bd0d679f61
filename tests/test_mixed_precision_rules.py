"""Every tangent rule in half precision: on explicit bfloat16/float16 tensors and under CPU autocast.

Each rule runs inside the dual engine (``TangentRulesMode``) and is compared with a float64
reference: the primal and its tangent from ``torch.func.jvp`` of plain operations, and the
gradient of ``<g, tangent>`` with respect to every tangent input, which is the reverse-mode
vector-Jacobian product ``J^T g`` of the same function. Tolerances are relative (2-norm of the
error over the 2-norm of the reference), a few units of each dtype's rounding. CPU autocast
does not follow CUDA's op lists; the rules cast their operands explicitly, so the dtypes their
backward passes see are the same on both devices (the CUDA failure this guards against was a
float32 ``P`` meeting a bfloat16 gradient in the attention backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from hf_taskarith.linearize.math_attention import math_attention
from hf_taskarith.linearize.tangent_rules import TangentRulesMode

TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def _sdpa(**kw) -> Callable:
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kw)

    def ref(q, k, v):
        return math_attention(q, k, v, **kw)

    return f, ref


def _mask_bool(lq: int, lk: int) -> torch.Tensor:
    m = torch.ones(2, 1, lq, lk, dtype=torch.bool)
    m[1, :, :, :3] = False  # left padding of the second sequence
    m[1, :, 0, :] = False   # one query row with every key masked
    return m


def _mask_float(lq: int, lk: int) -> torch.Tensor:
    return torch.where(_mask_bool(lq, lk), 0.0, torch.finfo(torch.float32).min)


def _llama_parts():
    """transformers' LlamaRMSNorm and rotary embedding, built once (modules cannot be built inside
    ``torch.func`` transforms)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    if not _LLAMA:
        _LLAMA["norm"] = LlamaRMSNorm(16, eps=1e-6)
        rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=16))
        _LLAMA["cos_sin"] = rope(torch.zeros(1, dtype=torch.float64), torch.arange(7)[None])  # (1, 7, 8) each
    return _LLAMA


_LLAMA: dict = {}


def _rms_norm(x, w):
    """LlamaRMSNorm (float32 inside, output in the input's dtype), weight swapped in."""
    return torch.func.functional_call(_llama_parts()["norm"], {"weight": w}, (x,))


def _rotary(q, k):
    """transformers' apply_rotary_pos_emb on queries and keys (cos/sin carry no tangent)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = (t.to(q.device, q.dtype) for t in _llama_parts()["cos_sin"])
    q2, k2 = apply_rotary_pos_emb(q, k, cos, sin)
    return torch.cat([q2, k2], dim=1)


def cases() -> dict[str, tuple[Callable, Callable, list[tuple[int, ...]], list[bool], str | None]]:
    """name -> (function, float64 reference, input shapes, which inputs carry a tangent, Function name).

    ``rms_norm``, ``silu`` and ``rotary`` have no hand-written rule (plain operations through
    PyTorch's formulas); they are here to check the tangent pass around the rules in half precision.
    """
    _llama_parts()
    ln = lambda x, w, b: F.layer_norm(x, (16,), w, b)  # noqa: E731
    conv = lambda x, w, b: F.conv2d(x, w, b, stride=2)  # noqa: E731
    qkv = [(2, 4, 7, 8), (2, 4, 7, 8), (2, 4, 7, 8)]
    gqa = [(2, 4, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8)]
    c = {
        "linear": (F.linear, F.linear, [(3, 5, 16), (12, 16), (12,)], [True, True, True], "_LinearTangent"),
        "linear_first_layer": (F.linear, F.linear, [(3, 5, 16), (12, 16), (12,)], [False, True, True],
                               "_LinearTangent"),
        "layer_norm": (ln, ln, [(3, 5, 16), (16,), (16,)], [True, True, True], "_LayerNormTangent"),
        "gelu": (F.gelu, F.gelu, [(3, 5, 16)], [True], "_ScaleTangent"),
        "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"),
                      [(3, 5, 16)], [True], "_ScaleTangent"),
        "conv2d_patch": (conv, conv, [(2, 3, 8, 8), (6, 3, 2, 2), (6,)], [False, True, True], None),
        "sdpa": (*_sdpa(), qkv, [True, True, True], "_AttentionTangent"),
        "sdpa_causal": (*_sdpa(is_causal=True), qkv, [True, True, True], "_AttentionTangent"),
        "sdpa_gqa": (*_sdpa(enable_gqa=True), gqa, [True, True, True], "_AttentionTangent"),
        "sdpa_bool_mask": (*_sdpa(attn_mask=_mask_bool(7, 7)), qkv, [True, True, True], "_AttentionTangent"),
        "sdpa_float_mask": (*_sdpa(attn_mask=_mask_float(7, 7)), qkv, [True, True, True], "_AttentionTangent"),
        "sdpa_scaled_kv_only": (*_sdpa(scale=0.3), qkv, [False, True, True], "_AttentionTangent"),
        "rms_norm": (_rms_norm, _rms_norm, [(3, 5, 16), (16,)], [True, True], None),
        "silu": (F.silu, F.silu, [(3, 5, 16)], [True], None),
        "rotary": (_rotary, _rotary, [(2, 4, 7, 8), (2, 2, 7, 8)], [True, True], None),
    }
    return c


def _inputs(shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    primals = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    tangents = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return primals, tangents


def reference(ref: Callable, primals, tangents, has_t, g: torch.Tensor):
    """float64 ``(y, y_t, [J^T g for each input with a tangent])``."""
    idx = [i for i, h in enumerate(has_t) if h]

    def f(*vals):
        full = list(primals)
        for i, v in zip(idx, vals):
            full[i] = v
        return ref(*full)

    y, y_t = torch.func.jvp(f, tuple(primals[i] for i in idx), tuple(tangents[i] for i in idx))
    leaves = [primals[i].clone().requires_grad_() for i in idx]
    grads = torch.autograd.grad(f(*leaves), leaves, g)
    return y, y_t, list(grads)


def run_rule(fn: Callable, primals, tangents, has_t, g: torch.Tensor, dtype: torch.dtype, autocast: bool,
             device: str = "cpu"):
    """The dual engine's ``(y, y_t, grads)`` with inputs in ``dtype`` (float32 under autocast), on ``device``."""
    ctx = torch.autocast(device, dtype=dtype) if autocast else contextlib.nullcontext()
    store = torch.float32 if autocast else dtype
    leaves = [t.to(device, store).requires_grad_() if h else None for t, h in zip(tangents, has_t)]
    with ctx, fwAD.dual_level(), TangentRulesMode():
        args = [fwAD.make_dual(p.to(device, store), t) if t is not None else p.to(device, store)
                for p, t in zip(primals, leaves)]
        y, y_t = fwAD.unpack_dual(fn(*args))
    assert y_t is not None and y_t.dtype == y.dtype
    grads = torch.autograd.grad(y_t, [t for t in leaves if t is not None], g.to(device, y_t.dtype))
    for t, gr in zip([t for t in leaves if t is not None], grads):
        assert gr.dtype == t.dtype and bool(torch.isfinite(gr).all())
    return y.cpu(), y_t.cpu(), [gr.cpu() for gr in grads]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _has_node(t: torch.Tensor, name: str) -> bool:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return True
        todo += [n for n, _ in node.next_functions]
    return False


PRECISIONS = [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True), (torch.float16, True),
              (torch.float32, False)]


@pytest.mark.parametrize("name", sorted(cases()))
@pytest.mark.parametrize("dtype,autocast", PRECISIONS)
def test_rule_in_half_precision_matches_float64(name, dtype, autocast):
    check_rule(name, dtype, autocast, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(cases()))
@pytest.mark.parametrize("dtype,autocast", PRECISIONS)
def test_rule_in_half_precision_matches_float64_on_cuda(name, dtype, autocast):
    """The same checks under CUDA's autocast op lists and kernels (``pytest -m gpu``)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    check_rule(name, dtype, autocast, "cuda")


def check_rule(name: str, dtype: torch.dtype, autocast: bool, device: str) -> None:
    fn, ref, shapes, has_t, function = cases()[name]
    primals, tangents = _inputs(shapes)
    y64 = ref(*primals)
    g = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref, yt_ref, grads_ref = reference(ref, primals, tangents, has_t, g)
    y, y_t, grads = run_rule(fn, primals, tangents, has_t, g, dtype, autocast, device)
    if not autocast:
        assert y.dtype == dtype
    if function is not None:
        assert _has_node(y_t, function), f"{name}: the hand-written rule did not run"
    tol = TOL[dtype]
    assert rel(y, y_ref) < tol, ("primal", rel(y, y_ref))
    assert rel(y_t, yt_ref) < tol, ("tangent", rel(y_t, yt_ref))
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert rel(a, b) < tol, (f"grad {i}", rel(a, b))


def test_fully_masked_rows_give_zero_output_and_zero_gradients():
    fn, ref, shapes, has_t, _ = cases()["sdpa_bool_mask"]
    primals, tangents = _inputs(shapes)
    g = torch.ones(2, 4, 7, 8, dtype=torch.float64)
    y, y_t, grads = run_rule(fn, primals, tangents, has_t, g, torch.float32, False)
    assert torch.equal(y[1, :, 0], torch.zeros_like(y[1, :, 0]))
    assert torch.equal(y_t[1, :, 0], torch.zeros_like(y_t[1, :, 0]))
    _, _, grads_ref = reference(ref, primals, tangents, has_t, g)
    assert all(bool(torch.isfinite(gr).all()) for gr in grads_ref)  # the reference itself is NaN-free
