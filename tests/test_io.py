"""Streaming safetensors reading/writing, atomic folders, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_taskarith.errors import CheckpointNotFoundError, CorruptCheckpointError
from hf_taskarith.io.checkpoints import Checkpoint, open_checkpoint
from hf_taskarith.io.fingerprint import fingerprint_checkpoint, fingerprint_state_dict
from hf_taskarith.io.writer import ShardedWriter, TensorSpec, atomic_output_dir, parse_size, save_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "ids": torch.arange(6), "empty": torch.zeros(0, 3)}


def test_writer_roundtrip_matches_safetensors(tmp_path):
    t = _tensors()
    files = save_tensors(t, tmp_path, prefix="model")
    assert files == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")  # the reference reader agrees
    for k, v in t.items():
        assert torch.equal(loaded[k], v)
    ckpt = Checkpoint(tmp_path)
    for k, v in t.items():
        assert torch.equal(ckpt.get_tensor(k), v)


def test_sharded_writer_writes_index_and_all_shards(tmp_path):
    t = {f"w{i}": torch.full((100,), float(i)) for i in range(5)}
    files = save_tensors(t, tmp_path, max_shard_size=450)
    assert len(files) == 5 and files[0] == "model-00001-of-00005.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t) and index["metadata"]["total_size"] == 2000
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.get_tensor("w3"), t["w3"])


def test_writer_rejects_out_of_order_and_wrong_shape(tmp_path):
    specs = [TensorSpec("x", (2,), torch.float32), TensorSpec("y", (2,), torch.float32)]
    w = ShardedWriter(tmp_path, specs)
    with pytest.raises(RuntimeError, match="out of order"):
        w.write("y", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned"):
        w.write("x", torch.zeros(3))
    w.close()


def test_reads_transformers_sharded_checkpoint(llama_checkpoints, llama_models):
    ckpt = open_checkpoint(llama_checkpoints / "ft3")
    assert len(list(llama_checkpoints.joinpath("ft3").glob("*.safetensors"))) > 1
    _, fts = llama_models
    sd = fts[2].state_dict()
    for name in ckpt:
        assert torch.equal(ckpt.get_tensor(name), sd[name])


def test_truncated_file_is_reported_with_path(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors.*truncated"):
        Checkpoint(tmp_path)


def test_garbage_header_and_short_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Checkpoint(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"\x01")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        Checkpoint(tmp_path / "y.safetensors")


def test_missing_folder_missing_shard_and_pickle_only(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError, match="s1.safetensors"):
        Checkpoint(tmp_path / "m")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="safe_serialization"):
        Checkpoint(tmp_path / "p")


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(CheckpointNotFoundError, match="Hub"):
        open_checkpoint("some-org/some-model-that-is-not-here")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_output_dir(target) as tmp:
            (tmp / "partial").write_text("x")
            raise ValueError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(target) as tmp:
        (tmp / "f").write_text("1")
    assert (target / "f").read_text() == "1"
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["g"]


def test_fingerprint_is_dtype_independent_and_sensitive(llama_models, llama_checkpoints):
    base, fts = llama_models
    sd = {k: v for k, v in base.state_dict().items()}
    fp = fingerprint_state_dict(sd)
    assert fp == fingerprint_checkpoint(open_checkpoint(llama_checkpoints / "base"))
    assert fp == fingerprint_state_dict({k: v.bfloat16() for k, v in sd.items()})
    assert fp != fingerprint_state_dict(fts[0].state_dict())
    renamed = dict(sd)
    renamed["extra"] = renamed.pop("model.norm.weight")
    assert fp != fingerprint_state_dict(renamed)


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30 and parse_size(10) == 10
    with pytest.raises(ValueError):
        parse_size("lots")
