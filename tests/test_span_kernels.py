"""The spherical methods and Model Stock block by block (:mod:`hf_taskarith.merging.span`), and
nearswap on blocks of weights.

The engine evaluates nuslerp, multislerp, karcher and model_stock from each tensor's Gram
matrix and a second pass over blocks; the whole-tensor functions (bit-identical to mergekit,
``test_parity_mergekit_weights.py``) are the reference. The two sum in a different order, so
they agree to float32 rounding: here, to a few float32 ulps of each tensor's scale on float32
checkpoints, and to one bf16 ulp on bf16 ones. nearswap is elementwise, so its blocks are
bit-identical. Blocks are shrunk so the tiny models cross many of them.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

import hf_taskarith.merging.blockwise as blockwise
import hf_taskarith.merging.engine as engine
from hf_taskarith import merge
from hf_taskarith.errors import MergeConfigError, NonFiniteError
from hf_taskarith.merging.methods.karcher import karcher
from hf_taskarith.merging.methods.multislerp import multislerp
from hf_taskarith.merging.methods.nuslerp import nuslerp, nuslerp_coefficients
from hf_taskarith.merging.span import block_gram, group_size, n_groups
from tests.mergekit_runs import corrupted_copy
from tests.mergekit_runs import state_dict as _sd

FT = ("ft1", "ft2", "ft3")
CASES = [
    # (method, models, base, params)
    ("nuslerp", FT[:2], "base", {"weight": [0.3, 0.7]}),
    ("nuslerp", FT[:2], None, {"weight": [0.6, 0.4]}),
    ("nuslerp", FT[:2], "base", {"nuslerp_flatten": False}),
    ("nuslerp", FT[:2], "base", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", FT, "base", {"weight": [0.2, 0.5, 0.3]}),
    ("multislerp", FT, None, {"weight": [1.0, 2.0, 1.0]}),
    ("multislerp", FT, "base", {"weight": [1.0, 2.0, -0.5], "normalize_weights": False}),
    ("multislerp", ("base",) + FT[:1], "base", {}),  # one model besides the base: that model
    ("karcher", FT, "base", {}),  # a separate base is one more point
    ("karcher", ("base",) + FT[:2], "base", {}),  # listed, it counts once
    ("karcher", FT, None, {"max_iter": 3}),
    ("model_stock", FT, "base", {}),
    ("model_stock", FT[:2], "base", {"filter_wise": True}),
    ("model_stock", ("base",) + FT[:2], "base", {}),
]


@pytest.fixture
def folders(llama_dtype_checkpoints):
    return llama_dtype_checkpoints


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 1000)






def _run(root, method, models, base, params, out, *, whole, monkeypatch):
    kw = dict(method=method, output_dir=out, progress=False, max_shard_size="20KB", **params)
    args = (root / base if base else None, [root / m for m in models])
    if not whole:
        return _sd(merge(*args, **kw))
    with monkeypatch.context() as m:
        m.setattr(engine, "kernel_for", lambda method, params, context: None)
        return _sd(merge(*args, **kw))


@pytest.mark.parametrize(("method", "models", "base", "params"), CASES)
def test_float32_blocks_equal_the_whole_tensor_function_to_rounding(method, models, base, params, folders,
                                                                    small_blocks, monkeypatch, tmp_path):
    root = folders / "float32"
    got = _run(root, method, models, base, params, tmp_path / "blocks", whole=False, monkeypatch=monkeypatch)
    want = _run(root, method, models, base, params, tmp_path / "whole", whole=True, monkeypatch=monkeypatch)
    assert set(got) == set(want)
    worst = 0.0
    for k in want:
        scale = float(want[k].abs().max()) or 1.0
        ulps = float((got[k] - want[k]).abs().max()) / (scale * 2 ** -23)
        worst = max(worst, ulps)
    assert worst <= 16, worst  # float32 ulps of each tensor's largest entry
    reference = _sd(root / "base")
    assert any(not torch.equal(got[k], reference[k]) for k in got)  # the merge did something


@pytest.mark.parametrize(("method", "models", "base", "params"), [c for c in CASES if "base" not in c[1]])
def test_bf16_blocks_round_like_the_whole_tensor_function(method, models, base, params, folders, small_blocks,
                                                          monkeypatch, tmp_path):
    root = folders / "bfloat16"
    got = _run(root, method, models, base, params, tmp_path / "blocks", whole=False, monkeypatch=monkeypatch)
    want = _run(root, method, models, base, params, tmp_path / "whole", whole=True, monkeypatch=monkeypatch)
    equal = total = 0
    for k in want:
        assert got[k].dtype == torch.bfloat16
        a, b = got[k].float(), want[k].float()
        ulp = torch.where(b == 0, 2.0 ** -133, b.abs() * 2 ** -7)  # within one bf16 step of the reference
        assert bool(((a - b).abs() <= ulp * 1.01).all()), k
        equal += int((a == b).sum())
        total += a.numel()
    assert equal / total > 0.99


def test_nearswap_blocks_are_bitwise_the_whole_tensor_result(folders, small_blocks, monkeypatch, tmp_path):
    for dtype in ("float32", "bfloat16"):
        root = folders / dtype
        args = ("nearswap", FT[:1], "base", {"t": 0.002})
        got = _run(root, *args, tmp_path / f"{dtype}_blocks", whole=False, monkeypatch=monkeypatch)
        want = _run(root, *args, tmp_path / f"{dtype}_whole", whole=True, monkeypatch=monkeypatch)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_span_kernels_run_on_blocks_not_whole_tensors(folders, small_blocks, monkeypatch, tmp_path):
    """The engine takes the block path for these methods: the whole-tensor function is never called."""
    import hf_taskarith.merging.registry as registry

    for method, models, params in [("nuslerp", FT[:2], {}), ("multislerp", FT, {}), ("karcher", FT, {}),
                                   ("model_stock", FT, {}), ("nearswap", FT[:1], {"t": 0.01})]:
        spec = registry.get_merge_method(method)
        calls = []

        def spy(*a, _fn=spec.fn, _calls=calls, **k):
            _calls.append(1)
            return _fn(*a, **k)

        with monkeypatch.context() as m:
            m.setitem(registry._METHODS, method, dataclasses.replace(spec, fn=spy))
            merge(folders / "float32" / "base", [folders / "float32" / x for x in models], method=method,
                  output_dir=tmp_path / method, progress=False, **params)
        if method == "nearswap":
            assert calls  # elementwise: the function itself runs on each block
        else:
            assert not calls, method


def test_opposite_task_vectors_average_linearly_and_three_cancelling_are_refused(folders, small_blocks, tmp_path,
                                                                                 monkeypatch):
    root = folders / "bfloat16"
    base = _sd(root / "base")
    ft1 = _sd(root / "ft1")
    opposite = tmp_path / "opposite"  # float32: 2 base - ft1 of bf16 values is exact, so its delta is -delta_1
    opposite.mkdir()
    save_file({k: 2 * base[k].float() - ft1[k].float() for k in base}, opposite / "model.safetensors",
              metadata={"format": "pt"})
    for f in (root / "base").glob("*.json"):
        (opposite / f.name).write_bytes(f.read_bytes())
    out = _sd(merge(root / "base", [root / "ft1", opposite], method="multislerp", output_dir=tmp_path / "two",
                    progress=False, dtype="float32"))
    for k in out:  # 0.5 v - 0.5 v: the base
        assert torch.equal(out[k], base[k].float()), k
    with pytest.raises(MergeConfigError, match="cancel out"):
        merge(root / "base", [root / "ft1", opposite, root / "ft1", opposite], method="multislerp",
              weight=[1.0, 1.0, 0.5, 0.5], output_dir=tmp_path / "four", progress=False)
    assert not (tmp_path / "four").exists()


def test_a_non_finite_input_is_named(folders, small_blocks, tmp_path):
    root = folders / "float32"
    bad = tmp_path / "bad"
    name = corrupted_copy(root / "ft2", bad, value=float("nan"), min_numel=1000, index=1234)
    for method in ("nuslerp", "model_stock", "karcher"):
        with pytest.raises(NonFiniteError, match=f"bad.*{name}"):
            merge(root / "base", [root / "ft1", bad], method=method, output_dir=tmp_path / method, progress=False)
        assert not (tmp_path / method).exists()


@pytest.mark.parametrize("grouping", ["tensor", "rows", "columns"])
def test_block_gram_is_the_float64_gram_of_each_group(grouping):
    torch.manual_seed(0)
    shape = (6, 5, 300) if grouping != "tensor" else (7, 1000)
    x = torch.randn(3, *shape)
    row = group_size(shape, grouping)
    got = block_gram(x.reshape(3, -1), grouping, row)
    flat = x.double().reshape(3, -1)
    if grouping == "tensor":
        want = (flat @ flat.T)[None]
    elif grouping == "rows":
        r = flat.reshape(3, -1, row).transpose(0, 1)
        want = r @ r.transpose(1, 2)
    else:
        c = flat.reshape(3, shape[0], row).permute(2, 0, 1)  # (row, k, first)
        want = c @ c.transpose(1, 2)
    assert got.shape == (n_groups(shape, grouping), 3, 3) == want.shape
    d = want.diagonal(dim1=1, dim2=2)
    scale = (d[:, :, None] * d[:, None, :]).sqrt()  # |v_i| |v_j|: what a cosine divides by
    assert float(((got - want).abs() / scale).max()) < 1e-7


def test_nuslerp_coefficients_reproduce_the_function():
    torch.manual_seed(1)
    a, b = torch.randn(500, dtype=torch.float64), torch.randn(500, dtype=torch.float64)
    for t in (0.0, 0.3, 1.0, 1.4):
        for v1 in (b, 2.5 * a, -a, torch.zeros_like(a)):  # generic, colinear, opposite, a zero vector
            stack = torch.stack([a, v1])
            c = nuslerp_coefficients((stack @ stack.T)[None], t)[0]
            assert torch.allclose(c[0] * a + c[1] * v1, nuslerp(t, a, v1), atol=1e-10), (t, v1[:2])


def test_karcher_and_multislerp_functions_agree_with_their_definitions():
    """Sanity of the references the kernels are held to: two unit vectors at 90 degrees."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = torch.tensor([math.sqrt(0.5)] * 2)
    assert torch.allclose(karcher([e1, e2]), mid)
    assert torch.allclose(multislerp([e1, e2], [0.5, 0.5]), mid)
