"""Compressed task vectors: codecs, size ratios, round trips through save/load."""

from __future__ import annotations

import pytest
import torch

from hf_taskarith import TaskVector
from hf_taskarith.compression.bits import pack_bits, unpack_bits
from hf_taskarith.compression.codecs import get_codec
from hf_taskarith.errors import MergeConfigError


def _low_rank_plus_noise(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(64, 4, generator=g) @ torch.randn(4, 48, generator=g) + 0.01 * torch.randn(64, 48, generator=g)
    return TaskVector({"w": m, "b": torch.randn(48, generator=g)})


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100])
def test_bits_roundtrip(n):
    mask = torch.rand(n) > 0.5
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8 and torch.equal(unpack_bits(packed, n), mask)


def test_topk_keeps_the_largest_exactly():
    t = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, -2.0])
    codec = get_codec("topk")
    enc = codec.encode(t, codec.resolve({"density": 0.5, "value_dtype": "float32"}))
    assert torch.equal(codec.decode(enc, (8,)), torch.tensor([0, -5.0, 0, 3.0, 0, 0, 1.0, -2.0]))


def test_sign_codec_is_sign_times_mean_magnitude():
    t = torch.tensor([4.0, -2.0, 0.1, 0.0])
    codec = get_codec("sign")
    out = codec.decode(codec.encode(t, codec.resolve({"density": 0.5})), (4,))
    assert torch.equal(out, torch.tensor([3.0, -3.0, 0.0, 0.0]))


def test_lowrank_recovers_low_rank_matrices():
    tv = _low_rank_plus_noise()
    c = tv.compress("lowrank", rank=4, value_dtype="float32")
    st = c.metadata.extra["compression"]
    assert st["relative_error"] < 0.01 and st["size_ratio"] > 5
    torch.testing.assert_close(c["b"], tv["b"])  # vectors are kept dense


@pytest.mark.parametrize("method, params, min_ratio", [
    ("topk", {"density": 0.05}, 8.0), ("sign", {"density": 0.1}, 8.0), ("lowrank", {"rank_fraction": 0.05}, 8.0)])
def test_save_load_roundtrip_decodes_transparently(tmp_path, llama_models, method, params, min_ratio):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    c = tv.compress(method, **params)
    st = c.metadata.extra["compression"]
    assert st["size_ratio"] >= min_ratio and 0 < st["relative_error"] < 1.0
    c.save_pretrained(tmp_path / "c")
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors")
    dense = TaskVector.from_models(base, fts[0]).save_pretrained(tmp_path / "d")
    dense_size = sum(p.stat().st_size for p in dense.iterdir() if p.suffix == ".safetensors")
    assert dense_size / on_disk > min_ratio * 0.8  # real files shrink too
    loaded = TaskVector.from_pretrained(tmp_path / "c")
    assert loaded.compressed and set(loaded) == set(tv)
    for k in tv:
        assert loaded[k].shape == tv[k].shape and torch.equal(loaded[k], c[k])
    assert loaded.metadata.extra["compression"]["method"] == method
    # merges and applies like any task vector
    import copy

    loaded.apply_to(copy.deepcopy(base))


def test_bad_codec_parameters():
    tv = _low_rank_plus_noise()
    with pytest.raises(MergeConfigError, match="available"):
        tv.compress("zip")
    with pytest.raises(MergeConfigError, match=r"density must be in \(0, 1\]"):
        tv.compress("topk", density=0)
    with pytest.raises(MergeConfigError, match="does not take"):
        tv.compress("sign", rank=3)
