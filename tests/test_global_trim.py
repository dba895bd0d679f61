"""TIES ``trim_scope: global`` (the paper's trim over each whole task vector) against a
reference written here: every delta of a task vector flattened in tensor order, a stable sort
by magnitude, the first ``max(1, int(density * N))`` kept."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import hf_taskarith.merging.blockwise as blockwise
import hf_taskarith.merging.engine as engine
from hf_taskarith import merge
from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging.config import merge_from_config
from hf_taskarith.merging.global_trim import GlobalMagnitudeCut
from hf_taskarith.merging.registry import get_merge_method
from hf_taskarith.merging.sources import open_tensor_source


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory, llama_models):
    """bf16 base and fine-tunes: quantized deltas, so many magnitudes equal the cut."""
    root = tmp_path_factory.mktemp("bf16_global")
    base, fts = llama_models
    for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, llama_models):
    """float32 fine-tunes whose q_proj deltas are 20x larger than the rest (norms differ)."""
    root = tmp_path_factory.mktemp("uneven")
    base, fts = llama_models
    base.save_pretrained(root / "base")
    ref = base.state_dict()
    for i, ft in enumerate(fts[:2]):
        model = copy.deepcopy(ft)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "q_proj" in name:
                    p.copy_(ref[name] + 20 * (p - ref[name]))
        model.save_pretrained(root / f"ft{i + 1}")
    return root


def _sd(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _names(folder) -> list[str]:
    """The tensors in the order the engine merges them (the base's)."""
    return open_tensor_source(folder).names()


def _reference_trim(base: dict, ft: dict, names: list[str], density: float) -> tuple[dict, int]:
    """The paper's trim, independently: concatenate every float32 delta in tensor order, keep
    the k largest magnitudes (stable sort: ties lowest flat index first)."""
    deltas = [ft[n].float() - base[n].float() for n in names]
    flat = torch.cat([d.reshape(-1) for d in deltas])
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
    out, at = {}, 0
    for n, d in zip(names, deltas):
        out[n] = d * keep[at:at + d.numel()].reshape(d.shape)
        at += d.numel()
    return out, k


@pytest.mark.parametrize("folder", ["float32", "bfloat16"])
@pytest.mark.parametrize("density", [0.05, 0.3])
def test_global_trim_keeps_exactly_density_of_each_whole_task_vector(folder, density, llama_checkpoints,
                                                                     bf16_checkpoints, tmp_path):
    root = llama_checkpoints if folder == "float32" else bf16_checkpoints
    base, names = _sd(root / "base"), _names(root / "base")
    for ft in ("ft1", "ft2"):
        out = merge(root / "base", [root / ft], method="magnitude_prune", density=density, trim_scope="global",
                    output_dir=tmp_path / ft, progress=False)
        merged = _sd(out)
        want, k = _reference_trim(base, _sd(root / ft), names, density)
        kept = 0
        for n in names:
            expected = (base[n].float() + want[n]).to(base[n].dtype)
            assert torch.equal(merged[n], expected), n
            kept += int(torch.count_nonzero(want[n]))
        zeros = sum(int((_sd(root / ft)[n].float() == base[n].float()).sum()) for n in names)
        assert k - zeros <= kept <= k  # exactly k kept; a kept entry may be a zero delta


def test_bf16_deltas_do_split_ties_at_the_cut(bf16_checkpoints):
    """The case the tie pass exists for: more magnitudes equal the cut than can be kept."""
    base, ft, names = _sd(bf16_checkpoints / "base"), _sd(bf16_checkpoints / "ft1"), _names(bf16_checkpoints / "base")
    cut = GlobalMagnitudeCut([0.3])
    passes = 0
    while cut.needs_pass():
        passes += 1
        for n in names:
            d = (ft[n].float() - base[n].float()).reshape(1, -1)
            cut.collect(n, [0], [cut.scan(d, [0])])
        cut.end_pass()
    assert passes == 3
    partial = [n for n in names if cut.tensor_params(n, [0])["magnitude_cut"][0].ties not in (None, 0)]
    assert len(partial) <= 1  # ties are split in at most one tensor; later ones keep none


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_global_and_per_tensor_trims_differ_where_tensor_norms_differ(method, uneven, tmp_path):
    base = _sd(uneven / "base")
    kw = dict(method=method, density=0.2, progress=False)
    per_tensor = _sd(merge(uneven / "base", [uneven / "ft1"], output_dir=tmp_path / "t", **kw))
    whole = _sd(merge(uneven / "base", [uneven / "ft1"], output_dir=tmp_path / "g", trim_scope="global", **kw))

    def kept(merged, name):
        return float((merged[name] != base[name]).float().mean())

    big = "model.layers.0.self_attn.q_proj.weight"
    small = "model.layers.0.mlp.down_proj.weight"
    assert abs(kept(per_tensor, big) - 0.2) < 0.01 and abs(kept(per_tensor, small) - 0.2) < 0.01
    # q_proj holds 2048 of ~26.7K entries: all of it kept, the other tensors share the rest (~13%)
    assert kept(whole, big) > 0.9 and kept(whole, small) < 0.15
    if method == "ties":
        ties2 = _sd(merge(uneven / "base", [uneven / "ft1", uneven / "ft2"], output_dir=tmp_path / "t2", **kw))
        glob2 = _sd(merge(uneven / "base", [uneven / "ft1", uneven / "ft2"], output_dir=tmp_path / "g2",
                          trim_scope="global", **kw))
        assert not torch.equal(ties2[small], glob2[small])


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"weights": [1.0, -0.5, 0.7], "density": [0.2, 0.5, 1.0]}),
    ("ties", {"density": 0.3, "rescale": True}),  # rescale: the whole-tensor path only
    ("magnitude_prune", {"weights": [0.5, 0.5, 0.5], "density": 0.1}),
])
def test_blocks_and_whole_tensors_agree_bit_for_bit(method, params, monkeypatch, tmp_path, bf16_checkpoints):
    monkeypatch.setattr(blockwise, "BLOCK", 1000)  # many blocks per tensor; tie cuts fall inside blocks
    monkeypatch.setattr(engine, "_PREPASS_GROUP", 3)
    root = bf16_checkpoints
    models = [root / "ft1", root / "ft2", root / "ft3"]
    kw = dict(method=method, trim_scope="global", progress=False, **params)
    got = _sd(merge(root / "base", models, output_dir=tmp_path / "blocks", **kw))
    with monkeypatch.context() as m:
        m.setattr(engine, "kernel_for", lambda method, params, context: None)
        want = _sd(merge(root / "base", models, output_dir=tmp_path / "whole", **kw))
    assert set(got) == set(want)
    for n in got:
        assert torch.equal(got[n], want[n]), n


def test_vocabulary_aligned_rows_count_towards_the_whole_vector(tmp_path, llama_models, llama_checkpoints):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    fts = llama_models[1]
    big = LlamaForCausalLM(tiny_llama_config(vocab_size=136))
    sd = big.state_dict()
    for k, v in fts[0].state_dict().items():
        if v.shape == sd[k].shape:
            sd[k].copy_(v)
        else:
            sd[k][:128].copy_(v)
    big.save_pretrained(tmp_path / "big")
    out = merge(llama_checkpoints / "base", [tmp_path / "big"], method="magnitude_prune", density=0.25,
                trim_scope="global", output_dir=tmp_path / "o", progress=False)
    merged, ref = _sd(out), _sd(llama_checkpoints / "base")
    want, k = _reference_trim(ref, _sd(llama_checkpoints / "ft1"), _names(llama_checkpoints / "base"), 0.25)
    for n in want:  # the first 128 rows of the bigger model are ft1's
        assert torch.equal(merged[n], ref[n] + want[n]), n


def test_yaml_and_in_memory_merges_give_the_same_global_trim(tmp_path, llama_models, llama_checkpoints):
    cfg = {"merge_method": "ties", "base_model": str(llama_checkpoints / "base"),
           "parameters": {"density": 0.3, "trim_scope": "global"},
           "models": [{"model": str(llama_checkpoints / f"ft{i}")} for i in (1, 2)]}
    out = merge_from_config(cfg, tmp_path / "yaml", progress=False)  # the torch-free path declines ties
    direct = merge(llama_checkpoints / "base", [llama_checkpoints / "ft1", llama_checkpoints / "ft2"], method="ties",
                   density=0.3, trim_scope="global", output_dir=tmp_path / "direct", progress=False)
    base, fts = llama_models
    module = merge(base, fts[:2], method="ties", density=0.3, trim_scope="global", progress=False).state_dict()
    a, b = _sd(out), _sd(direct)
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], module[n]) for n in a)


def test_trim_scope_is_validated_and_global_needs_the_engine(tmp_path, llama_checkpoints):
    with pytest.raises(MergeConfigError, match=r"trim_scope must be one of \['tensor', 'global'\], got 'model'"):
        merge(llama_checkpoints / "base", [llama_checkpoints / "ft1"], method="ties", trim_scope="model",
              output_dir=tmp_path / "bad", progress=False)
    method = get_merge_method("ties")
    params = method.resolve_params(2, {"density": 0.5, "trim_scope": "global"})
    with pytest.raises(MergeConfigError, match="run it through hf_taskarith.merge"):
        method.fn([torch.randn(4, 4), torch.randn(4, 4)], params, None)
    assert get_merge_method("ties").param_index["trim_scope"].default == "tensor"
