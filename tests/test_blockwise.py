"""Blockwise merging: bit-identical to the whole-tensor path, exact top-k by blocks, and the
block-level I/O it rests on (range reads, range writes from threads).

Blocks, sample runs and the top-k sample are shrunk (monkeypatch) so that the tiny test
models cross many blocks, take the sampled-bracket path, and hit tie cuts inside blocks.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_taskarith.merging.blockwise as blockwise
import hf_taskarith.merging.engine as engine
import hf_taskarith.merging.sparsify as sparsify
from conftest import perturbed
from hf_taskarith import TaskVector, merge
from hf_taskarith.errors import NonFiniteError
from hf_taskarith.io.checkpoints import Checkpoint
from hf_taskarith.io.safetensors_file import RangeReader
from hf_taskarith.io.writer import ShardedWriter, TensorSpec
from hf_taskarith.merging.consensus import agreement, agreement_mask
from hf_taskarith.merging.sparsify import top_k_mask, top_k_rules

CASES = [
    ("task_arithmetic", {"weights": [0.3, -0.5, 0.7]}),
    ("task_arithmetic", {"weights": [0.5, 0.5, 0.5], "normalize": True, "lambda_": 0.8}),
    ("linear", {"weights": [0.2, 0.3, 0.5]}),
    ("linear", {"weights": [0.2, 0.3, 0.6], "normalize": False}),
    ("ties", {"weights": [1.0, 1.0, 1.0], "density": 0.2}),
    ("ties", {"weights": [0.3, -0.3, 0.5], "density": [0.2, 0.5, 1.0]}),
    ("ties", {"weights": [0.4, 0.4, 0.4], "density": 0.5, "normalize": False, "lambda_": 0.8}),
    ("magnitude_prune", {"weights": [0.5, 0.5, 0.5], "density": 0.3}),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 1000 entries, 4 sample runs of 8 (so tensors of >= 256 entries are bracketed)."""
    monkeypatch.setattr(blockwise, "BLOCK", 1000)
    monkeypatch.setattr(blockwise, "RUNS", 4)
    monkeypatch.setattr(blockwise, "RUN", 8)


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory, llama_models):
    """bf16 base and fine-tunes whose deltas are quantized, so equal magnitudes (ties) abound."""
    root = tmp_path_factory.mktemp("bf16")
    base, fts = llama_models
    for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / name)
    return root


def _sd(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _whole_tensor_merge(monkeypatch, *args, **kwargs):
    """The same merge with every tensor on the whole-tensor path (the reference)."""
    with monkeypatch.context() as m:
        m.setattr(engine, "kernel_for", lambda method, params, context: None)
        return merge(*args, **kwargs)


@pytest.mark.parametrize("folder", ["float32", "bfloat16"])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_blockwise_checkpoints_are_bitwise_the_whole_tensor_result(method, params, folder, small_blocks, monkeypatch,
                                                                   tmp_path, llama_checkpoints, bf16_checkpoints):
    root = llama_checkpoints if folder == "float32" else bf16_checkpoints
    models = [root / "ft1", root / "ft2", root / "ft3"]
    kw = dict(method=method, progress=False, max_shard_size="20KB", **params)
    got = merge(root / "base", models, output_dir=tmp_path / "blocks", **kw)
    want = _whole_tensor_merge(monkeypatch, root / "base", models, output_dir=tmp_path / "whole", **kw)
    _assert_bitwise_equal(_sd(got), _sd(want))
    assert len(list(got.glob("*.safetensors"))) > 1  # block writes landed in several shards


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_count_does_not_change_the_result(workers, small_blocks, monkeypatch, tmp_path, bf16_checkpoints):
    monkeypatch.setattr(blockwise, "_default_workers", lambda: workers)
    models = [bf16_checkpoints / f"ft{i}" for i in (1, 2, 3)]
    got = merge(bf16_checkpoints / "base", models, method="ties", density=0.3, output_dir=tmp_path / "a",
                progress=False)
    want = _whole_tensor_merge(monkeypatch, bf16_checkpoints / "base", models, method="ties", density=0.3,
                               output_dir=tmp_path / "b", progress=False)
    _assert_bitwise_equal(_sd(got), _sd(want))


def test_task_vectors_and_modules_mix_on_the_blockwise_path(small_blocks, monkeypatch, tmp_path, llama_models,
                                                            llama_checkpoints):
    base, fts = llama_models
    TaskVector.from_models(base, fts[1]).save_pretrained(tmp_path / "tv2")  # lazy, read by range
    inputs = [llama_checkpoints / "ft1", tmp_path / "tv2", TaskVector.from_models(base, fts[2])]  # + in memory
    for method in ("task_arithmetic", "ties"):
        kw = dict(method=method, weights=[0.3, -0.5, 0.2], density=0.4) if method == "ties" else \
            dict(method=method, weights=[0.3, -0.5, 0.2])
        got = merge(llama_checkpoints / "base", inputs, output_dir=tmp_path / f"{method}_a", progress=False, **kw)
        want = _whole_tensor_merge(monkeypatch, llama_checkpoints / "base", inputs, output_dir=tmp_path / f"{method}_b",
                                   progress=False, **kw)
        _assert_bitwise_equal(_sd(got), _sd(want))
        # an in-memory base gathers the blocks into tensors
        module = merge(base, fts, method=method, progress=False, **({"density": 0.4} if method == "ties" else {}))
        ref = _whole_tensor_merge(monkeypatch, base, fts, method=method, progress=False,
                                  **({"density": 0.4} if method == "ties" else {}))
        _assert_bitwise_equal(module.state_dict(), ref.state_dict())


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_first_bad_input_in_order_is_named(method, small_blocks, tmp_path, llama_checkpoints):
    name = "model.layers.1.mlp.up_proj.weight"
    for i, (row, value) in enumerate([(60, float("nan")), (2, float("inf"))]):  # ft-b's bad entry comes first
        sd = _sd(llama_checkpoints / f"ft{i + 1}")
        sd[name][row, 0] = value
        (tmp_path / f"bad{'ab'[i]}").mkdir()
        save_file(sd, tmp_path / f"bad{'ab'[i]}" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=re.escape(f"input {tmp_path / 'bada'}: tensor '{name}' contains NaN")):
        merge(llama_checkpoints / "base", [llama_checkpoints / "ft3", tmp_path / "bada", tmp_path / "badb"],
              method=method, output_dir=tmp_path / "out", progress=False,
              **({"density": 0.5} if method == "ties" else {}))
    assert not (tmp_path / "out").exists()


def test_overflowing_result_is_reported_as_not_finite(small_blocks, tmp_path, llama_checkpoints):
    with pytest.raises(NonFiniteError, match="merged tensor .* is not finite"):
        merge(llama_checkpoints / "base", [llama_checkpoints / "ft1"], weights=[1e39], output_dir=tmp_path / "o",
              progress=False)


# -- exact top-k by blocks -------------------------------------------------------------
def _stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    want = torch.zeros(scores.numel(), dtype=torch.bool)
    want[torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k]] = True
    return want.reshape(scores.shape)


@pytest.mark.parametrize("seed", range(6))
def test_top_k_mask_by_sampled_bracket_matches_a_stable_sort(seed, monkeypatch):
    monkeypatch.setattr(sparsify, "_SAMPLE", 64)  # tensors over 512 entries take the bracketed path
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(600, 20_000, (1,), generator=g))
    scores = torch.randint(0, 50, (n,), generator=g).float() / 7  # many ties
    if seed % 2:
        scores = scores.sort().values  # sorted: strata are not alike
    for frac in (0.001, 0.2, 0.5, 0.97):
        k = max(1, int(frac * n))
        assert torch.equal(top_k_mask(scores, k), _stable_top_k(scores, k))


def test_counts_stay_exact_beyond_float32_integers():
    n = 20_000_001  # more scores above the bracket than float32 counts exactly
    scores = (torch.arange(n) % 1000).float()
    mask = top_k_mask(scores, n - 3)
    dropped = mask.logical_not().nonzero().reshape(-1).tolist()
    assert dropped == [n - 1 - (n - 1) % 1000 - 1000 * j for j in (2, 1, 0)]  # the last three zeros


@pytest.mark.parametrize("bracket", ["above", "below", "empty"])
def test_a_misleading_sample_costs_a_rescan_not_exactness(bracket, monkeypatch):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 30, (3, 5000), generator=g).float()
    ks = [100, 2500, 4900]
    lo, hi = {"above": (28.5, 29.0), "below": (0.0, 0.5), "empty": (10.25, 10.5)}[bracket]
    monkeypatch.setattr(sparsify, "_brackets", lambda n, ks, sample: ([lo] * len(ks), [hi] * len(ks)))
    calls = []

    def scan(fn):
        calls.append(1)
        return [fn(s, scores[:, s:s + 700], None) for s in range(0, 5000, 700)]

    rules = top_k_rules(5000, ks, sample=scores[:, :10], scan=scan)
    assert len(calls) == 2
    for row, k, rule in zip(scores, ks, rules):
        assert torch.equal(rule.mask(row), _stable_top_k(row, k))
        keep = torch.empty(5000)
        for s in range(0, 5000, 333):  # block by block, tie cut anywhere
            rule.keep(row[s:s + 333], s, keep[s:s + 333])
        assert torch.equal(keep.bool(), rule.mask(row))


def test_float_agreement_equals_the_boolean_mask():
    g = torch.Generator().manual_seed(0)
    d = torch.randint(-2, 3, (4, 5000), generator=g).float()
    d[:, :50] = -0.0  # a column of zeros: elected sign from a total of -0.0
    d[1, 100:200] = 0.0
    for method in ("sum", "count"):
        assert torch.equal(agreement(d, method), agreement_mask(d, method).float())


# -- block-level I/O ---------------------------------------------------------------------
def test_range_writer_accepts_blocks_in_any_order_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    t = {"a": torch.arange(10, dtype=torch.int32), "b": torch.randn(1000).to(torch.bfloat16)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in t.items()]
    with ShardedWriter(tmp_path, specs, max_shard_size=100) as w:
        w.write("a", t["a"])
        out = w.open_range("b")
        starts = list(range(0, 1000, 64))[::-1]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: out.write(s, t["b"][s:s + 64]), starts))
        out.close()
    got = _sd(tmp_path)
    assert torch.equal(got["a"], t["a"]) and torch.equal(_bits(got["b"]), _bits(t["b"]))


def test_range_writer_refuses_an_incomplete_tensor(tmp_path):
    w = ShardedWriter(tmp_path, [TensorSpec("x", (100,), torch.float32)])
    out = w.open_range("x")
    out.write(0, torch.zeros(60))
    with pytest.raises(RuntimeError, match="240 of 400 bytes"):
        out.close()
    w.close()


def test_range_reader_reads_any_range(tmp_path, llama_checkpoints):
    ckpt = Checkpoint(llama_checkpoints / "ft3")  # sharded
    name = "model.layers.0.mlp.down_proj.weight"
    whole = ckpt.get_tensor(name).reshape(-1)
    buf = torch.empty(4096 * 4, dtype=torch.uint8)
    with RangeReader(ckpt.info(name)) as r:
        for start, stop in [(0, 1), (7, 100), (2000, whole.numel())]:
            assert torch.equal(r.read(start, stop, buf), whole[start:stop])


def test_models_are_unchanged_by_in_memory_merges(llama_models):
    base, fts = llama_models
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merge(base, [perturbed(base, 9)], method="ties", density=0.5, progress=False)
    _assert_bitwise_equal(base.state_dict(), before)
