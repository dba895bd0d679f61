"""Hand-written tangent rules against PyTorch's own forward-mode formulas, operator by operator.

Each case evaluates one torch function on dual inputs twice, with the rules
(``TangentRulesMode``) and without (PyTorch's JVP formulas; SDPA on its math backend), in
float64, and compares the primal, the tangent and the gradients of a weighted sum of the
tangent with respect to every tangent input (the backward the training step runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_taskarith.linearize.tangent_rules import TangentRulesMode

DT = torch.float64


def _run(fn: Callable, primals: list, tangents: list, rules: bool):
    tangents = [None if t is None else t.detach().clone().requires_grad_() for t in tangents]
    ctx = TangentRulesMode() if rules else sdpa_kernel(SDPBackend.MATH)
    with fwAD.dual_level(), ctx:
        args = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out, out_t = fwAD.unpack_dual(fn(*args))
        out, out_t = out.detach().clone(), out_t.clone() if out_t is not None else None
    weights = torch.randn(out_t.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    leaves = [t for t in tangents if t is not None]
    grads = torch.autograd.grad((out_t * weights).sum(), leaves, allow_unused=True)
    return out, out_t.detach(), grads


def _check(fn: Callable, primals: list, tangents: list) -> None:
    ref = _run(fn, primals, tangents, rules=False)
    got = _run(fn, primals, tangents, rules=True)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    for g, r in zip(got[2], ref[2]):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["all", "input", "params", "no_affine", "two_dims"])
def test_layer_norm_rule_matches_pytorch(which):
    x, xt = _randn(3, 5, 8, seed=0) * 2 + 1, _randn(3, 5, 8, seed=1)
    w, wt, b, bt = _randn(8, seed=2), _randn(8, seed=3), _randn(8, seed=4), _randn(8, seed=5)
    if which == "two_dims":
        _check(lambda x, w, b: F.layer_norm(x, (5, 8), w, b), [x, w.repeat(5, 1), b.repeat(5, 1)],
               [xt, wt.repeat(5, 1), bt.repeat(5, 1)])
    elif which == "no_affine":
        _check(lambda x: F.layer_norm(x, (8,)), [x], [xt])
    else:
        tangents = {"all": [xt, wt, bt], "input": [xt, None, None], "params": [None, wt, bt]}[which]
        _check(lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-6), [x, w, b], tangents)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_rule_matches_pytorch(approximate):
    x, xt = _randn(4, 7, 16, seed=0) * 3, _randn(4, 7, 16, seed=1)
    _check(lambda x: F.gelu(x, approximate=approximate), [x], [xt])


@pytest.mark.parametrize("case", ["plain", "qk_only", "v_only", "bool_mask", "float_mask", "causal", "gqa"])
def test_sdpa_rule_matches_the_math_backend(case):
    q, k, v = _randn(2, 4, 6, 8, seed=0), _randn(2, 4, 7, 8, seed=1), _randn(2, 4, 7, 5, seed=2)
    # the layout transformers hands over: heads transposed out of (batch, seq, heads, dim)
    qt = _randn(2, 6, 4, 8, seed=3).transpose(1, 2)
    kt, vt = _randn(2, 4, 7, 8, seed=4), _randn(2, 4, 7, 5, seed=5)
    kwargs: dict = {}
    tangents = [qt, kt, vt]
    if case == "qk_only":
        tangents = [qt, kt, None]
    elif case == "v_only":
        tangents = [None, None, vt]
    elif case == "bool_mask":
        mask = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(6)) > 0.3
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    elif case == "float_mask":
        kwargs["attn_mask"] = _randn(6, 7, seed=7)
    elif case == "causal":
        k, v, kt, vt = k[:, :, :6], v[:, :, :6], kt[:, :, :6], vt[:, :, :6]
        tangents = [qt, kt, vt]
        kwargs["is_causal"] = True
    elif case == "gqa":
        k, v, kt, vt = k[:, :2], v[:, :2], kt[:, :2], vt[:, :2]
        tangents = [qt, kt, vt]
        kwargs["enable_gqa"] = True
    _check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3, **kwargs), [q, k, v], tangents)


def test_sdpa_rule_gives_zeros_for_fully_masked_rows():
    q, k, v = (_randn(1, 2, 4, 8, seed=i) for i in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out, out_t, grads = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                             [q, k, v], [_randn(1, 2, 4, 8, seed=i) for i in range(3, 6)], rules=True)
    assert not out[..., 1, :].any() and not out_t[..., 1, :].any()
    assert all(torch.isfinite(g).all() for g in grads)


def test_conv_rule_skips_the_zero_input_tangent():
    x = _randn(2, 3, 8, 8, seed=0)
    w, wt, b, bt = _randn(4, 3, 2, 2, seed=1), _randn(4, 3, 2, 2, seed=2), _randn(4, seed=3), _randn(4, seed=4)
    _check(lambda x, w, b: F.conv2d(x, w, b, stride=2), [x, w, b], [None, wt, bt])
    _check(lambda x, w: F.conv1d(x, w, padding="same"), [x.flatten(2), w[..., 0]], [None, wt[..., 0]])
    # an input with a tangent goes to PyTorch's formula
    _check(lambda x, w, b: F.conv2d(x, w, b), [x, w, b], [_randn(2, 3, 8, 8, seed=5), wt, bt])


def test_rules_step_aside_when_a_primal_needs_a_graph():
    x = _randn(3, 8, seed=0).requires_grad_()
    w, wt = _randn(8, seed=1), _randn(8, seed=2)
    with fwAD.dual_level(), TangentRulesMode():
        y = F.layer_norm(fwAD.make_dual(x, _randn(3, 8, seed=3)), (8,), fwAD.make_dual(w, wt))
        primal = fwAD.unpack_dual(y).primal
    assert primal.requires_grad  # PyTorch's formula ran, with the graph to x
    with contextlib.suppress(RuntimeError):
        primal.sum().backward()
    assert x.grad is not None
