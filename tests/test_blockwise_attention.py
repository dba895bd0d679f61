"""The blockwise attention tangent (long sequences) equals the materialised rule and float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from hf_taskarith.linearize import blockwise_attention as blockwise
from hf_taskarith.linearize.math_attention import math_attention
from hf_taskarith.linearize.tangent_rules import TangentRulesMode


def _case(variant: str, lq: int = 37, lk: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq, hk = (4, 2) if variant == "gqa" else (4, 4)
    q = torch.randn(2, hq, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hk, lk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hk, lk, 8, generator=g, dtype=torch.float64)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v)]
    kw: dict = {}
    if variant == "causal":
        kw["is_causal"] = True
    elif variant in ("padding", "float_padding"):
        m = torch.ones(2, 1, lq, lk, dtype=torch.bool)
        m[1, :, :, :5] = False  # left padding
        m[1, :, 0, :] = False   # a query row with every key masked
        kw["attn_mask"] = m if variant == "padding" else torch.where(m, 0.0, float("-inf")).double()
    elif variant == "sliding_window":  # causal within a window of 8 keys, as transformers encodes it
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        kw["attn_mask"] = ((j <= i) & (j > i - 8))[None, None]
    elif variant == "gqa":
        kw["enable_gqa"] = True
    return (q, k, v), tangents, kw


def _dual_run(primals, tangents, kw, dtype=torch.float64):
    leaves = [t.to(dtype).requires_grad_() for t in tangents]
    with fwAD.dual_level(), TangentRulesMode():
        args = [fwAD.make_dual(p.to(dtype), t) for p, t in zip(primals, leaves)]
        y, y_t = fwAD.unpack_dual(F.scaled_dot_product_attention(*args, **kw))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(y_t, leaves, g)
    return y, y_t, grads, g


VARIANTS = ["plain", "causal", "padding", "float_padding", "sliding_window", "gqa"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_blockwise_equals_the_materialised_rule_and_float64_references(variant, monkeypatch):
    primals, tangents, kw = _case(variant)
    ref = _dual_run(primals, tangents, kw)  # materialised rule (short sequence)
    monkeypatch.setattr(blockwise, "BLOCKWISE_MIN_SCORES", 0)
    monkeypatch.setattr(blockwise, "BLOCK_SIZE", 5)  # 8 blocks, the last one partial
    got = _dual_run(primals, tangents, kw)
    for a, b, name in [(got[0], ref[0], "primal"), (got[1], ref[1], "tangent"),
                       *[(x, y, f"grad {i}") for i, (x, y) in enumerate(zip(got[2], ref[2]))]]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # and both against torch.func.jvp / vjp of plain differentiable operations
    _, y_t = torch.func.jvp(lambda *a: math_attention(*a, **kw), primals, tuple(tangents))
    torch.testing.assert_close(got[1], y_t, rtol=1e-10, atol=1e-12)
    leaves = [p.clone().requires_grad_() for p in primals]
    vjp = torch.autograd.grad(math_attention(*leaves, **kw), leaves, got[3])
    for i, (a, b) in enumerate(zip(got[2], vjp)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"vjp {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blockwise_in_half_precision(dtype, monkeypatch):
    primals, tangents, kw = _case("padding")
    ref = _dual_run(primals, tangents, kw)
    monkeypatch.setattr(blockwise, "BLOCKWISE_MIN_SCORES", 0)
    monkeypatch.setattr(blockwise, "BLOCK_SIZE", 8)
    got = _dual_run(primals, tangents, kw, dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for a, b in [(got[1], ref[1]), *zip(got[2], ref[2])]:
        assert a.dtype == dtype
        assert float((a.double() - b).norm() / b.norm()) < tol


def test_blockwise_memory_is_linear_in_sequence_length():
    """No tensor of L_q x L_k per head is kept for the backward pass."""
    L = 1536  # above the default threshold: 1536^2 > BLOCKWISE_MIN_SCORES
    assert L * L > blockwise.BLOCKWISE_MIN_SCORES
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    t = [torch.randn(1, 2, L, 16, generator=g).requires_grad_() for _ in range(3)]
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with fwAD.dual_level(), TangentRulesMode():
            y = F.scaled_dot_product_attention(*[fwAD.make_dual(p, tt) for p, tt in zip((q, k, v), t)], is_causal=True)
            _, y_t = fwAD.unpack_dual(y)
    assert saved and max(saved) < L * L  # the largest saved tensor is O(L), not O(L^2)
    y_t.sum().backward()
    assert all(bool(torch.isfinite(x.grad).all()) for x in t)
