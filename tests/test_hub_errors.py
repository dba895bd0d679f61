"""Bad input on the Hub path: every failure names repo, revision (commit) and file; nothing half-written.

Runs against the embedded Hub server over real HTTP; corruption is made by editing the
server's LFS objects or the client's cache on disk.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("hf_taskarith.hub.server")
from hf_taskarith import (  # noqa: E402
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HubError,
    MergeConfigError,
    NonFiniteError,
    TaskArithError,
    TaskVector,
    list_task_vector_versions,
    pull_task_vector,
    push_task_vector,
)
from hf_taskarith.cli.main import main  # noqa: E402
from hf_taskarith.hub.server import serve_in_thread  # noqa: E402

TOKEN = "errors-token"
SHA = r"\(commit [0-9a-f]{40}\)"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(url, root) of a server in a thread; huggingface_hub set up online, without Xet, private cache."""
    import huggingface_hub.constants as c

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("hf_home")
    root = tmp_path_factory.mktemp("hub-root")
    with serve_in_thread(root, token=TOKEN) as url:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(c, "HF_HUB_OFFLINE", False)
        mp.setattr(c, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        if hasattr(c, "HF_HUB_DISABLE_XET"):
            mp.setattr(c, "HF_HUB_DISABLE_XET", True)
        yield url, root
    mp.undo()


@pytest.fixture(scope="module")
def tv(llama_models):
    base, fts = llama_models
    return TaskVector.from_models(base, fts[0], base_model="org/tiny-llama", base_revision="main")


@pytest.fixture(scope="module")
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub[0], token=TOKEN)


def pull(hub, repo, **kw):
    return pull_task_vector(repo, endpoint=hub[0], token=TOKEN, **kw)


def lfs_object(hub, api, repo: str, path: str = "task_vector.safetensors") -> Path:
    (info,) = api.get_paths_info(repo, [path])
    oid = info.lfs.sha256
    return hub[1] / "models" / repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- issue 1: loading errors name repo@revision (commit) and the file -----------------------

def test_config_without_weights_names_repo_revision_and_file(hub, api, tv, tmp_path):
    tv.save_pretrained(tmp_path / "tv")
    api.create_repo("team/no-weights")
    api.upload_file(path_or_fileobj=str(tmp_path / "tv" / "task_vector_config.json"),
                    path_in_repo="task_vector_config.json", repo_id="team/no-weights")
    with pytest.raises(CheckpointNotFoundError,
                       match=rf"team/no-weights@main {SHA}: file task_vector.safetensors is missing"):
        pull(hub, "team/no-weights")


def test_index_naming_a_missing_shard_names_repo_and_shard(hub, api, tv):
    push_task_vector(tv, "team/shard-gone", endpoint=hub[0], token=TOKEN, max_shard_size="20KB")
    shards = sorted(f for f in api.list_repo_files("team/shard-gone") if re.fullmatch(r"task_vector-.*safetensors", f))
    assert len(shards) > 1
    api.delete_file(shards[-1], repo_id="team/shard-gone")
    with pytest.raises(CheckpointNotFoundError,
                       match=rf"team/shard-gone@main {SHA}, file 'task_vector.safetensors.index.json': .*"
                             rf"{re.escape(shards[-1])}"):
        pull(hub, "team/shard-gone")


@pytest.mark.parametrize("config, exc, message", [
    (b"{not json", TaskArithError, r"invalid JSON"),
    (b"[1, 2]", TaskArithError, r"expected a JSON object"),
    (json.dumps({"format": "someone.else"}).encode(), TaskArithError, r"format is 'someone.else'"),
    (json.dumps({"library_version": "99.0", "format_version": 7,
                 "extra": {"compression": {"method": "future-codec", "shapes": {}}}}).encode(),
     MergeConfigError,
     r"cannot decode .*unknown compression 'future-codec'.*written by hf_taskarith 99.0.*Upgrade hf_taskarith"),
])
def test_bad_or_newer_config_names_repo_revision_and_file(hub, api, tv, config, exc, message):
    repo = f"team/bad-config-{zlib.crc32(config)}"
    push_task_vector(tv, repo, tag="v1", endpoint=hub[0], token=TOKEN)
    api.upload_file(path_or_fileobj=config, path_in_repo="task_vector_config.json", repo_id=repo)
    api.create_tag(repo, tag="v2")
    with pytest.raises(exc, match=rf"^{repo}@v2 {SHA}, file 'task_vector_config.json': {message}"):
        pull(hub, repo, revision="v2")


def test_newer_config_warning_names_repo(hub, api, tv, caplog):
    push_task_vector(tv, "team/newer", endpoint=hub[0], token=TOKEN)
    data = pull(hub, "team/newer").metadata.to_dict()
    data.update(library_version="99.0", new_field=1)
    api.upload_file(path_or_fileobj=json.dumps(data).encode(), path_in_repo="task_vector_config.json",
                    repo_id="team/newer")
    with caplog.at_level(logging.WARNING, logger="hf_taskarith.metadata"):
        got = pull(hub, "team/newer")
    assert got.metadata.extra["unknown"] == {"new_field": 1}
    assert re.search(rf"team/newer@main {SHA}, file 'task_vector_config.json' was written by hf_taskarith 99.0",
                     caplog.text)


# -- issue 2: network failures are HubError, and the CLI prints them ------------------------

def test_connection_refused_is_a_hub_error_naming_the_endpoint(tv):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubError, match=rf"team/x@v1: cannot reach the Hub at {re.escape(url)} .*server running"):
        pull_task_vector("team/x", revision="v1", endpoint=url)
    with pytest.raises(HubError, match=rf"team/x: listing versions: cannot reach the Hub at {re.escape(url)}"):
        list_task_vector_versions("team/x", endpoint=url)
    with pytest.raises(HubError, match=rf"team/x@main: push: cannot reach the Hub at {re.escape(url)}"):
        push_task_vector(tv, "team/x", endpoint=url)


def test_offline_mode_is_a_hub_error_with_the_fix(hub, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"team/x@main: cannot reach the Hub at .*HF_HUB_OFFLINE=1 blocks"):
        pull(hub, "team/x")


@pytest.mark.parametrize("argv", [
    ["pull", "team/x", "OUT"], ["versions", "team/x"], ["push", "TV", "team/x"],
    ["apply", "team/x", "BASE", "OUT", "--from-hub"],
])
def test_cli_prints_network_errors_without_traceback(argv, tv, tmp_path, capsys):
    tv.save_pretrained(tmp_path / "tv")
    url = f"http://127.0.0.1:{free_port()}"
    argv = [{"OUT": str(tmp_path / "out"), "TV": str(tmp_path / "tv"), "BASE": str(tmp_path)}.get(a, a) for a in argv]
    assert main(argv + ["--endpoint", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: team/x") and f"cannot reach the Hub at {url}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_versions_into_a_closed_pipe_exits_quietly(hub, api, tv):
    push_task_vector(tv, "team/pipe", tag="v1", endpoint=hub[0], token=TOKEN)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -0`: the reader is gone before anything is written
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "hf_taskarith.cli.main", "versions", "team/pipe", "--json",
                               "--endpoint", hub[0], "--token", TOKEN],
                              stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr


# -- issue 3: downloads are checked; NaN deltas are refused ----------------------------------

def test_corrupt_cache_file_is_detected_removed_and_redownloaded(hub, tv, tmp_path):
    push_task_vector(tv, "team/cache-rot", tag="v1", endpoint=hub[0], token=TOKEN)
    cache = tmp_path / "cache"
    first = pull(hub, "team/cache-rot", revision="v1", cache_dir=cache)
    (cached,) = (p for p in cache.rglob("task_vector.safetensors") if "snapshots" in p.parts)
    blob = cached.resolve()
    data = bytearray(blob.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header:12 + header] = struct.pack("<f", float("nan"))  # same size, other bytes
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError,
                       match=rf"team/cache-rot@v1 {SHA}: file 'task_vector.safetensors' is corrupt: its sha256 is "
                             r".*removed from the cache"):
        pull(hub, "team/cache-rot", revision="v1", cache_dir=cache)
    assert not blob.exists()  # a later pull cannot silently reuse it ...
    again = pull(hub, "team/cache-rot", revision="v1", cache_dir=cache)  # ... and downloads it again
    for k in first:
        assert torch.equal(again[k], first[k])


def test_object_corrupted_on_the_server_is_refused_by_name(hub, api, tv, tmp_path):
    push_task_vector(tv, "team/server-rot", tag="v1", endpoint=hub[0], token=TOKEN)
    obj = lfs_object(hub, api, "team/server-rot")
    data = bytearray(obj.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header:12 + header] = struct.pack("<f", float("nan"))
    obj.write_bytes(bytes(data))
    with pytest.raises(HubError, match=rf"team/server-rot@v1 {SHA}, file 'task_vector.safetensors': download failed "
                                       r"\(HTTP 500\).*damaged on this server: .* hashes to sha256"):
        pull(hub, "team/server-rot", revision="v1", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("task_vector.safetensors"))  # nothing half-written


def test_truncated_object_on_the_server_fails_fast_and_clearly(hub, api, tv, tmp_path):
    push_task_vector(tv, "team/truncated", tag="v1", endpoint=hub[0], token=TOKEN)
    obj = lfs_object(hub, api, "team/truncated")
    size = obj.stat().st_size
    with open(obj, "r+b") as f:
        f.truncate(size // 2)
    start = time.monotonic()
    with pytest.raises(HubError, match=rf"team/truncated@v1 {SHA}, file 'task_vector.safetensors': download failed "
                                       rf"\(HTTP 500\).*has {size // 2} bytes but the pointer says {size}"):
        pull(hub, "team/truncated", revision="v1", cache_dir=tmp_path / "cache")
    assert time.monotonic() - start < 5  # it used to hang on a read timeout for about a minute
    assert not list((tmp_path / "cache").rglob("task_vector.safetensors"))


def nan_vector_repo(hub, api, tv, tmp_path, repo: str) -> str:
    """A repo holding a well-formed vector with a NaN (uploaded raw: save_pretrained refuses NaN)."""
    from safetensors.torch import save_file

    tv.save_pretrained(tmp_path / "ok")
    tensors = {k: v.clone() for k, v in tv.materialize().items()}
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(tmp_path / "task_vector.safetensors"))
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=str(tmp_path / "task_vector.safetensors"), path_in_repo="task_vector.safetensors",
                    repo_id=repo)
    api.upload_file(path_or_fileobj=str(tmp_path / "ok" / "task_vector_config.json"),
                    path_in_repo="task_vector_config.json", repo_id=repo)
    return repo


def test_nan_delta_is_refused_by_apply_to_a_module(hub, api, tv, llama_models, tmp_path):
    base, _ = llama_models
    got = pull(hub, nan_vector_repo(hub, api, tv, tmp_path, "team/nan"))  # hashes match: the upload had the NaN
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"tensor 'model.norm.weight' contains NaN or inf; nothing was applied"):
        got.apply_to(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged, not half-applied


def test_nan_delta_is_refused_by_apply_to_a_checkpoint(hub, api, tv, llama_checkpoints, tmp_path):
    got = pull(hub, nan_vector_repo(hub, api, tv, tmp_path, "team/nan-ckpt"))
    with pytest.raises(NonFiniteError, match=r"'model.norm.weight' contains NaN or inf"):
        got.apply_to(llama_checkpoints / "base", output_dir=tmp_path / "edited")
    assert not (tmp_path / "edited").exists()


def test_overflow_in_the_model_dtype_is_refused(llama_models, tv):
    base, _ = llama_models
    model = copy.deepcopy(base).to(torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"makes '.*' overflow to inf in torch.float16"):
        tv.apply_to(model, 1e9, allow_mismatch=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- issue 5: versions pushed within one second are ordered by history -----------------------

def test_versions_in_the_same_second_are_listed_newest_first(hub, tv, monkeypatch):
    from hf_taskarith.hub.server import commits

    monkeypatch.setattr(commits, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))  # one date for all
    for tag in ("v1", "v2", "v10"):
        push_task_vector(tv * (len(tag) + int(tag[1:])), "team/same-second", tag=tag, endpoint=hub[0], token=TOKEN)
    versions = list_task_vector_versions("team/same-second", endpoint=hub[0], token=TOKEN)
    assert len({v.date for v in versions}) == 1  # the tie the ordering has to break
    assert [v.name for v in versions if v.kind == "tag"] == ["v10", "v2", "v1"]
    assert [(v.kind, v.name) for v in versions][:2] == [("branch", "main"), ("tag", "v10")]
