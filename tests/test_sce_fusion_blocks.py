"""SCE and Arcee Fusion block by block, against their whole-tensor functions.

Arcee Fusion's kernel is bit-identical (same per-row softmaxes, exact order statistics); SCE's
equals the function except through its weights' means, summed in another order, so to float32
rounding. Blocks, the sample and the whole-tensor cut-off are shrunk so the tiny models cross
many blocks and the sampled brackets are used.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import hf_taskarith.merging.blockwise as blockwise
import hf_taskarith.merging.engine as engine
import hf_taskarith.merging.methods.arcee_fusion as fusion
from hf_taskarith import merge
from hf_taskarith.errors import NonFiniteError
from hf_taskarith.merging.sparsify import order_statistics
from tests.mergekit_runs import corrupted_copy
from tests.mergekit_runs import state_dict as _sd


@pytest.fixture
def folders(llama_dtype_checkpoints):
    return llama_dtype_checkpoints


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 1000)
    monkeypatch.setattr(blockwise, "RUNS", 4)
    monkeypatch.setattr(blockwise, "RUN", 8)
    monkeypatch.setattr(fusion, "MIN_BLOCKWISE", 64)






def _both(root, method, models, params, tmp_path, monkeypatch):
    kw = dict(method=method, progress=False, max_shard_size="20KB", **params)
    got = _sd(merge(root / "base", [root / m for m in models], output_dir=tmp_path / "blocks", **kw))
    with monkeypatch.context() as m:
        m.setattr(engine, "kernel_for", lambda method, params, context: None)
        want = _sd(merge(root / "base", [root / m for m in models], output_dir=tmp_path / "whole", **kw))
    assert set(got) == set(want)
    return got, want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_arcee_fusion_blocks_are_bitwise_the_whole_tensor_result(dtype, folders, small_blocks, monkeypatch, tmp_path):
    root = folders / dtype
    got, want = _both(root, "arcee_fusion", ["ft1"], {}, tmp_path, monkeypatch)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    base, ft1 = _sd(root / "base"), _sd(root / "ft1")
    big = [k for k in got if got[k].numel() >= 64 and not torch.equal(base[k], ft1[k])]
    assert big
    for k in big:  # a fusion: some entries from each side
        took = got[k] == ft1[k]
        assert bool(took.any()) and not bool(took.all()), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.0])
def test_sce_blocks_equal_the_whole_tensor_result_to_rounding(select_topk, dtype, folders, small_blocks, monkeypatch,
                                                              tmp_path):
    root = folders / dtype
    got, want = _both(root, "sce", ["ft1", "ft2", "ft3"], {"select_topk": select_topk}, tmp_path, monkeypatch)
    same = total = 0
    for k in want:
        a, b = got[k].float(), want[k].float()
        if dtype == "float32":  # a few float32 ulps of the tensor's largest entry
            assert float((a - b).abs().max()) <= 8 * 2 ** -23 * float(b.abs().max()), k
        else:  # at most one bf16 step of each entry
            assert bool(((a - b).abs() <= b.abs() * 2 ** -7 * 1.01).all()), k
        same += int((a == b).sum())
        total += a.numel()
    if dtype == "bfloat16":  # the weights' rounding rarely moves a bf16 output
        assert same / total > 0.99
    if select_topk == 0.0:
        base = _sd(root / "base")
        assert all(torch.equal(got[k], base[k]) for k in got)  # nothing selected: the base


def test_sce_keeps_ties_at_the_cut_lowest_index_first(small_blocks, tmp_path):
    """Equal variances at the cut: the kernel keeps the same (lowest-index) ones as the function."""
    from transformers import LlamaConfig  # noqa: F401  (the config files below are plain JSON)

    base = torch.zeros(4000)
    fts = [base.clone() for _ in range(3)]
    fts[0][::2] = 1.0  # every even entry has the same variance
    fts[1][::3] = -0.5
    folders = []
    for name, t in [("base", base)] + [(f"ft{i}", f) for i, f in enumerate(fts)]:
        d = tmp_path / name
        d.mkdir()
        save_file({"w": t}, d / "model.safetensors", metadata={"format": "pt"})
        folders.append(d)
    got = _sd(merge(folders[0], folders[1:], method="sce", select_topk=0.1, output_dir=tmp_path / "out",
                    progress=False))["w"]
    from hf_taskarith.merging.methods.sce import sce

    want = sce([f.clone() for f in fts], select_topk=0.1)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.equal(got != 0, want != 0)  # the same entries selected


def test_a_non_finite_input_is_named_by_both(folders, small_blocks, tmp_path):
    root = folders / "float32"
    bad = tmp_path / "bad"
    name = corrupted_copy(root / "ft1", bad, value=float("inf"), min_numel=2000, index=777)
    for method, models in [("arcee_fusion", [bad]), ("sce", [root / "ft2", bad])]:
        with pytest.raises(NonFiniteError, match=f"bad.*{name}"):
            merge(root / "base", models, method=method, output_dir=tmp_path / method, progress=False)
        assert not (tmp_path / method).exists()


def test_order_statistics_are_kthvalue_without_the_whole_tensor():
    torch.manual_seed(0)
    scores = torch.randn(50_000).round(decimals=2)  # many ties
    ranks = [1, 12_499, 25_000, 37_498, 49_998]
    sample = scores[::97][None].expand(len(ranks), -1)

    def scan(fn):
        return [fn(s, scores[s:s + 4096].expand(len(ranks), -1), None) for s in range(0, scores.numel(), 4096)]

    got = order_statistics(scores.numel(), ranks, sample=sample, scan=scan)
    assert got == [float(torch.kthvalue(scores, r + 1).values) for r in ranks]
    with pytest.raises(ValueError, match="ranks must lie in"):
        order_statistics(10, [0], sample=None, scan=scan)


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
def test_population_variance_is_torch_var_bit_for_bit(n_models, monkeypatch):
    import hf_taskarith.merging.methods.sce as sce_module

    monkeypatch.setattr(sce_module, "_VAR_CHUNK", 1000)  # several chunks, one ragged
    torch.manual_seed(n_models)
    for scale in (1e-3, 1.0, 1e4):
        x = torch.randn(n_models, 7, 450) * scale
        for stacked in (x, x.bfloat16().float(), torch.zeros_like(x)):
            got = sce_module.population_variance(stacked)
            assert torch.equal(got, torch.var(stacked, dim=0, unbiased=False)), (n_models, scale)
