"""The embedded Hub server, driven by the real huggingface_hub client over real HTTP on 127.0.0.1.

Also checked independently of our own reader: ``git clone``/``git log`` read the repos, and
olah (a read-only Hub mirror, when installed) serves what the server wrote.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from hf_taskarith.hub.server import HubServer, serve_in_thread

TOKEN = "test-token-123"
SAFETENSORS_V1 = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + os.urandom(3000)
SAFETENSORS_V2 = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + os.urandom(4000)


@pytest.fixture(scope="module")
def client_env(tmp_path_factory):
    """huggingface_hub set up for a local server: online, no Xet, a private HF_HOME."""
    import huggingface_hub.constants as c

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("hf_home")
    mp.setenv("HF_HOME", str(home))
    mp.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    mp.setenv("HF_HUB_DISABLE_XET", "1")
    mp.setattr(c, "HF_HUB_OFFLINE", False)
    mp.setattr(c, "HF_HUB_DISABLE_XET", True)
    mp.setattr(c, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, client_env):
    root = tmp_path_factory.mktemp("hub-root")
    with serve_in_thread(root, token=TOKEN) as url:
        yield url, root


@pytest.fixture(scope="module")
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub[0], token=TOKEN)


@pytest.fixture(scope="module")
def versioned(api, hub, tmp_path_factory):
    """team/model with v1 (3 files in one commit) and v2 tags; returns the two commit shas."""
    folder = tmp_path_factory.mktemp("upload")
    (folder / "model.safetensors").write_bytes(SAFETENSORS_V1)
    (folder / "config.json").write_text(json.dumps({"version": 1}))
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: org/base\n---\n# A model\n")
    api.create_repo("team/model")
    c1 = api.upload_folder(repo_id="team/model", folder_path=str(folder), commit_message="v1 weights")
    api.create_tag("team/model", tag="v1", revision=c1.oid)
    (folder / "model.safetensors").write_bytes(SAFETENSORS_V2)
    (folder / "config.json").write_text(json.dumps({"version": 2}))
    c2 = api.upload_folder(repo_id="team/model", folder_path=str(folder), commit_message="v2 weights")
    api.create_tag("team/model", tag="v2", tag_message="second version")
    return c1.oid, c2.oid


def raw_request(url: str, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, Any, bytes]:
    """A request with the path sent exactly as given (no client-side normalization)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()  # an email.message.Message: case-insensitive
    finally:
        conn.close()


def head_of(root: Path, repo: str, ref: str = "refs/heads/main") -> str:
    out = subprocess.run(["git", f"--git-dir={root / 'models' / repo / '.git'}", "rev-parse", ref],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


# -- the push / tag / pull cycle ------------------------------------------------------------

def test_one_commit_per_upload_and_lfs_for_weights(api, versioned):
    c1, c2 = versioned
    commits = api.list_repo_commits("team/model")
    assert [c.commit_id for c in commits[:2]] == [c2, c1]
    assert [c.title for c in commits] == ["v2 weights", "v1 weights", "initial commit"]
    info = {f.path: f for f in api.get_paths_info("team/model", ["model.safetensors", "config.json", "README.md"],
                                                  revision="v1")}
    assert info["model.safetensors"].lfs.sha256 == hashlib.sha256(SAFETENSORS_V1).hexdigest()
    assert info["model.safetensors"].size == len(SAFETENSORS_V1)
    assert info["config.json"].lfs is None and info["README.md"].lfs is None
    assert sorted(api.list_repo_files("team/model", revision="v1")) == [
        ".gitattributes", "README.md", "config.json", "model.safetensors"]


def test_pull_by_tag_branch_and_sha_returns_that_versions_bytes(api, hub, versioned, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    url, _ = hub
    c1, c2 = versioned
    kw = {"endpoint": url, "token": TOKEN, "cache_dir": tmp_path / "cache"}
    assert Path(hf_hub_download("team/model", "model.safetensors", revision="v1", **kw)).read_bytes() == SAFETENSORS_V1
    assert Path(hf_hub_download("team/model", "model.safetensors", **kw)).read_bytes() == SAFETENSORS_V2
    assert Path(hf_hub_download("team/model", "config.json", revision=c1[:10], **kw)).read_text() == '{"version": 1}'
    snap = Path(snapshot_download("team/model", revision="v1", **kw))
    assert (snap / "model.safetensors").read_bytes() == SAFETENSORS_V1 and snap.name == c1
    snap2 = Path(snapshot_download("team/model", revision="v2", local_dir=tmp_path / "v2", **kw))
    assert json.loads((snap2 / "config.json").read_text()) == {"version": 2}
    assert api.model_info("team/model", revision="v1").sha == c1
    info = api.model_info("team/model")
    assert info.sha == c2 and info.card_data.base_model == "org/base"


def test_refs_tags_and_branches(api, versioned, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    c1, c2 = versioned
    refs = api.list_repo_refs("team/model")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": c1, "v2": c2}  # annotated v2 peeled
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", c2)]
    with pytest.raises(HfHubHTTPError, match="already exists") as e:
        api.create_tag("team/model", tag="v1")
    assert e.value.response.status_code == 409

    api.create_branch("team/model", branch="exp/small-lr", revision="v1")
    api.upload_file(path_or_fileobj=b"branch notes", path_in_repo="notes/readme.txt", repo_id="team/model",
                    revision="exp/small-lr", commit_message="notes on the branch")
    assert "notes/readme.txt" in api.list_repo_files("team/model", revision="exp/small-lr")
    assert "notes/readme.txt" not in api.list_repo_files("team/model")
    got = hf_hub_download("team/model", "notes/readme.txt", revision="exp/small-lr", endpoint=api.endpoint,
                          token=TOKEN, cache_dir=tmp_path)
    assert Path(got).read_bytes() == b"branch notes"
    tree = {e.path for e in api.list_repo_tree("team/model", revision="exp/small-lr", path_in_repo="notes")}
    assert tree == {"notes/readme.txt"}
    api.create_tag("team/model", tag="exp-1", revision="exp/small-lr")
    api.delete_tag("team/model", tag="exp-1")
    api.delete_branch("team/model", branch="exp/small-lr")
    assert [b.name for b in api.list_repo_refs("team/model").branches] == ["main"]
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("team/model", revision="exp/small-lr")
    with pytest.raises(HfHubHTTPError, match="cannot be deleted"):
        api.delete_branch("team/model", branch="main")


def test_git_clone_reads_the_repo_and_its_lfs_pointers(hub, versioned, tmp_path):
    _, root = hub
    c1, c2 = versioned
    repo_dir = root / "models" / "team" / "model"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_dir), str(clone)], check=True)
    log = subprocess.run(["git", "-C", str(clone), "log", "--format=%H %s"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert log[:2] == [f"{c2} v2 weights", f"{c1} v1 weights"]
    oid = hashlib.sha256(SAFETENSORS_V2).hexdigest()
    assert (clone / "model.safetensors").read_text() == (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(SAFETENSORS_V2)}\n")
    assert (repo_dir / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == SAFETENSORS_V2
    tags = subprocess.run(["git", "-C", str(clone), "tag"], capture_output=True, text=True).stdout.split()
    assert {"v1", "v2"} <= set(tags)
    subprocess.run(["git", f"--git-dir={repo_dir / '.git'}", "fsck", "--no-progress"], check=True,
                   capture_output=True)


# -- concurrency and atomicity --------------------------------------------------------------

def test_concurrent_commits_on_the_same_parent_one_wins(api, hub):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo("team/race")
    parent = api.model_info("team/race").sha
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def push(name: str) -> None:
        op = CommitOperationAdd(path_in_repo="weights.safetensors", path_or_fileobj=name.encode() * 500)
        barrier.wait()
        try:
            results[name] = api.create_commit("team/race", operations=[op], commit_message=f"push {name}",
                                              parent_commit=parent)
        except HfHubHTTPError as e:
            results[name] = e

    threads = [threading.Thread(target=push, args=(n,)) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wins = [r for r in results.values() if not isinstance(r, Exception)]
    losses = [r for r in results.values() if isinstance(r, Exception)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].response.status_code == 412 and "has moved" in str(losses[0])
    assert head_of(hub[1], "team/race") == wins[0].oid
    # a stale parent is refused even when nothing runs concurrently
    with pytest.raises(HfHubHTTPError, match="has moved"):
        api.upload_file(path_or_fileobj=b"late", path_in_repo="late.txt", repo_id="team/race", parent_commit=parent)
    assert head_of(hub[1], "team/race") == wins[0].oid


def _lfs_upload_href(url: str, repo: str, data: bytes) -> str:
    body = json.dumps({"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
                       "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}]}).encode()
    status, _, out = raw_request(url, "POST", f"/{repo}.git/info/lfs/objects/batch", body,
                                 {"Content-Type": "application/vnd.git-lfs+json"})
    assert status == 200, out
    return json.loads(out)["objects"][0]["actions"]["upload"]["href"]


def test_interrupted_lfs_upload_leaves_the_repo_unchanged(api, hub, caplog):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    url, root = hub
    api.create_repo("team/interrupted")
    before = head_of(root, "team/interrupted")
    data = os.urandom(200_000)
    oid = hashlib.sha256(data).hexdigest()
    target = urlsplit(_lfs_upload_href(url, "team/interrupted", data))
    with socket.create_connection((target.hostname, target.port), timeout=10) as s:
        s.sendall(f"PUT {target.path}?{target.query} HTTP/1.1\r\nHost: {target.netloc}\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:50_000])
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):  # the server closes the connection once it has given up on the body (and
            pass             # cleaned up): checking earlier raced with the server creating its temp file
    lfs_dir = root / "models" / "team" / "interrupted" / ".git" / "lfs"
    # the socket closes before the worker thread has handled the disconnect (on a loaded machine it may
    # not even have created its part file yet): wait for its log line, written after the cleanup
    deadline = time.time() + 30
    while time.time() < deadline and not any("interrupted LFS upload" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert any("interrupted LFS upload" in r.getMessage() for r in caplog.records), "the upload was never discarded"
    left = sorted(p.name for p in (lfs_dir / "tmp").glob("*"))
    assert not left, f"partial upload left behind: {left}"
    assert not (lfs_dir / "objects" / oid[:2] / oid[2:4] / oid).exists()
    # a body that does not hash to its oid is refused too
    bad = urlsplit(_lfs_upload_href(url, "team/interrupted", data))
    status, headers, _ = raw_request(url, "PUT", f"{bad.path}?{bad.query}", os.urandom(len(data)))
    assert status == 400 and "does not match its oid" in headers["X-Error-Message"]
    assert not (lfs_dir / "objects" / oid[:2] / oid[2:4] / oid).exists()
    # committing the never-uploaded object is refused, and the branch did not move
    op = CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=data)
    op._upload_mode, op._is_uploaded = "lfs", True  # skip the client's own upload step
    with pytest.raises(HfHubHTTPError, match="was not uploaded"):
        api.create_commit("team/interrupted", operations=[op], commit_message="should fail")
    assert head_of(root, "team/interrupted") == before


# -- strictness: tokens, private repos, names, sizes ----------------------------------------

def test_tokens_and_private_repos(api, hub, tmp_path_factory):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    url, _ = hub
    api.create_repo("team/secret", private=True)
    assert api.model_info("team/secret").private is True
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as e:
        HfApi(endpoint=url, token="wrong-token-456").model_info("team/secret")
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=url, token=False).list_repo_refs("team/model")
    assert e.value.response.status_code == 401
    # public_read: anonymous reads of public repos only; private repos look missing; writes refused
    root = tmp_path_factory.mktemp("public-read-root")
    with serve_in_thread(root, token=TOKEN, public_read=True) as url2:
        owner, anon = HfApi(endpoint=url2, token=TOKEN), HfApi(endpoint=url2, token=False)
        owner.create_repo("team/open")
        owner.create_repo("team/closed", private=True)
        assert anon.list_repo_files("team/open") == [".gitattributes"]
        with pytest.raises(RepositoryNotFoundError):
            anon.list_repo_files("team/closed")
        with pytest.raises(HfHubHTTPError) as e:
            anon.create_repo("team/new")
        assert e.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError, match="Invalid credentials"):
            HfApi(endpoint=url2, token="wrong-token-456").list_repo_files("team/open")


@pytest.mark.parametrize("path", [
    "/team/model/resolve/main/..%2F..%2F..%2Fetc%2Fpasswd",
    "/team/model/resolve/main/%2e%2e/%2e%2e/x",
    "/team/model/resolve/main/.git/config",
    "/team/model/resolve/main/a%00b",
    "/team/model/resolve/main//etc/passwd",
    "/api/models/team/model/tree/main/..%2F..",
    "/api/models/..%2F..%2Fetc/passwd",
    "/api/models/team/..",
])
def test_path_traversal_in_urls_is_rejected(hub, versioned, path):
    status, headers, body = raw_request(hub[0], "GET", path)
    assert status in (400, 404), (status, body)
    assert "root:" not in body.decode(errors="replace")
    if status == 400:
        assert "Invalid" in headers["X-Error-Message"]


@pytest.mark.parametrize("bad", ["../escape.txt", "a/../../b", ".git/hooks/post-update", "/abs.txt",
                                 "nul\x00byte", "back\\slash", "a//b"])
def test_path_traversal_in_commits_is_rejected(hub, versioned, bad):
    url, root = hub
    before = head_of(root, "team/model")
    lines = [{"key": "header", "value": {"summary": "evil"}},
             {"key": "file", "value": {"path": bad, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, headers, _ = raw_request(url, "POST", "/api/models/team/model/commit/main", body,
                                     {"Content-Type": "application/x-ndjson"})
    assert status == 400 and "Invalid file path" in headers["X-Error-Message"]
    assert head_of(root, "team/model") == before
    assert not (root.parent / "escape.txt").exists() and not (root / "escape.txt").exists()


@pytest.mark.parametrize("repo_id", ["team/..", "te..am/x", "team/x.git", "-team/x", "api/x", "a/b/c"])
def test_bad_repo_ids_are_rejected(hub, repo_id):
    namespace, _, name = repo_id.partition("/")
    status, headers, _ = raw_request(hub[0], "POST", "/api/repos/create",
                                     json.dumps({"organization": namespace, "name": name}).encode(),
                                     {"Content-Type": "application/json"})
    assert status == 400 and "Invalid repo id" in headers["X-Error-Message"]
    assert not any(p.name in ("..", "x.git") for p in (hub[1] / "models").rglob("*"))


def test_request_size_limits(tmp_path, client_env):
    from huggingface_hub import CommitOperationAdd, HfApi

    with serve_in_thread(tmp_path / "root", token=TOKEN, max_request_bytes=64 * 1024,
                         max_regular_file_bytes=32 * 1024, max_upload_bytes=100_000) as url:
        api = HfApi(endpoint=url, token=TOKEN)
        api.create_repo("team/limits")
        status, headers, _ = raw_request(url, "POST", "/api/models/team/limits/commit/main", b"x" * 70_000,
                                         {"Content-Type": "application/x-ndjson"})
        assert status == 413 and "exceeds" in headers["X-Error-Message"]
        with pytest.raises(ValueError, match="LFS limit"):
            api.upload_file(path_or_fileobj=os.urandom(150_000), path_in_repo="big.safetensors",
                            repo_id="team/limits")
        text = ("word " * 9000).encode()  # 45 kB of text: over the regular-file limit => LFS
        api.create_commit("team/limits", operations=[CommitOperationAdd("notes.txt", text)], commit_message="x")
        assert api.get_paths_info("team/limits", ["notes.txt"])[0].lfs is not None


def test_client_errors_are_specific(api, hub, versioned):
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url, _ = hub
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("team/nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("team/model", revision="v9")
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download("team/model", "missing.bin", cache_dir=hub[1].parent / "errors-cache")
    with pytest.raises(HfHubHTTPError, match="already created") as e:
        api.create_repo("team/model")
    assert e.value.response.status_code == 409
    assert api.create_repo("team/model", exist_ok=True).repo_id == "team/model"
    with pytest.raises(HfHubHTTPError, match="not a branch"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="team/model", revision="v1")
    status, headers, _ = raw_request(url, "GET", "/api/models/team/model/xet-write-token/main")
    assert status == 400 and "HF_HUB_DISABLE_XET=1" in headers["X-Error-Message"]
    status, headers, body = raw_request(url, "GET", "/team/model/resolve/v1/config.json",
                                        headers={"Range": "bytes=2-8"})
    assert status == 206 and body == b'{"version": 1}'[2:9] and headers["Content-Range"] == "bytes 2-8/14"


# -- command line ---------------------------------------------------------------------------

def test_cli_serve_builds_a_strict_server(tmp_path, monkeypatch, capsys):
    import argparse

    from hf_taskarith.cli import hub as hub_cli

    parser = argparse.ArgumentParser()
    hub_cli.register(parser.add_subparsers())
    args = parser.parse_args(["hub", "serve", "--root", str(tmp_path), "--port", "0",
                              "--max-upload-size", "1GiB"])
    monkeypatch.setenv(hub_cli.TOKEN_ENV, "env-token-123")
    config = hub_cli.build_config(args)
    assert config.token == "env-token-123" and config.max_upload_bytes == 2**30 and config.host == "127.0.0.1"
    remote = parser.parse_args(["hub", "serve", "--root", str(tmp_path), "--host", "0.0.0.0", "--no-auth"])
    monkeypatch.delenv(hub_cli.TOKEN_ENV)
    assert hub_cli.run_serve(remote) == 2
    assert "no_auth" in capsys.readouterr().err
    both = parser.parse_args(["hub", "serve", "--root", str(tmp_path), "--no-auth", "--token", "abcdefgh123"])
    with pytest.raises(ValueError, match="contradict"):
        hub_cli.build_config(both)
    server = HubServer(hub_cli.build_config(args))
    try:
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.server_close()


# -- an independent reader: olah ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def olah_endpoint(hub, versioned, tmp_path):
    """olah (read-only mirror) serving the server's root in offline mode."""
    pytest.importorskip("olah", reason="olah is not installed (pip install olah)")
    port = _free_port()
    config = tmp_path / "olah.toml"
    config.write_text(f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "olah-repos"}"\n'
                      f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
                      f'mirrors-path = ["{hub[1]}"]\n[accessibility]\noffline = true\n')
    olah_cli = shutil.which("olah-cli", path=str(Path(sys.executable).parent)) or shutil.which("olah-cli")
    cmd = [olah_cli, "-c", str(config)] if olah_cli else [sys.executable, "-m", "olah.server", "-c", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.skip(f"olah did not start: {proc.stderr.read().decode(errors='replace')[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.skip("olah did not open its port within 30 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_olah_serves_what_the_server_wrote(olah_endpoint, versioned, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    c1, c2 = versioned
    mirror = HfApi(endpoint=olah_endpoint, token=False)
    assert {t.name: t.target_commit for t in mirror.list_repo_refs("team/model").tags} == {"v1": c1, "v2": c2}
    kw = {"endpoint": olah_endpoint, "token": False, "cache_dir": tmp_path / "cache"}
    assert Path(hf_hub_download("team/model", "model.safetensors", revision="v1", **kw)).read_bytes() == SAFETENSORS_V1
    assert Path(hf_hub_download("team/model", "config.json", revision="v2", **kw)).read_text() == '{"version": 2}'


def test_a_missing_lfs_object_is_an_error_not_its_pointer_text(api, hub):
    """The listing keeps the LFS size; a download fails naming the missing object (it used to be
    served as the 131-byte pointer with 200 OK)."""
    from huggingface_hub.errors import HfHubHTTPError

    url, root = hub
    api.create_repo("team/lost-object")
    data = os.urandom(50_000)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="team/lost-object")
    oid = hashlib.sha256(data).hexdigest()
    obj = root / "models" / "team" / "lost-object" / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    obj.unlink()
    info = {f.path: f for f in api.list_repo_tree("team/lost-object")}["w.safetensors"]
    assert info.size == 50_000 and info.lfs is not None and info.lfs.sha256 == oid
    with pytest.raises(HfHubHTTPError, match="missing"):
        api.hf_hub_download("team/lost-object", "w.safetensors", cache_dir=root.parent / "lost-cache")


def test_unsigned_lfs_put_does_not_reveal_private_repos(api, hub):
    import http.client

    url, _ = hub
    api.create_repo("team/hidden-lfs", private=True)
    target = urlsplit(url)
    answers = {}
    for repo in ("team/hidden-lfs", "team/no-such-repo"):
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        conn.request("PUT", f"/{repo}.git/info/lfs/objects/{'a' * 64}", body=b"x", headers={"Content-Length": "1"})
        resp = conn.getresponse()
        answers[repo] = (resp.status, resp.read())
        conn.close()
    assert answers["team/hidden-lfs"] == answers["team/no-such-repo"]
    assert answers["team/hidden-lfs"][0] == 404


def test_leftovers_of_a_killed_server_are_removed_at_start(tmp_path):
    from huggingface_hub import HfApi

    from hf_taskarith.hub.server import serve_in_thread

    root = tmp_path / "hub"
    with serve_in_thread(root, no_auth=True) as url:
        import huggingface_hub.constants as c

        mp = pytest.MonkeyPatch()
        mp.setattr(c, "HF_HUB_OFFLINE", False)
        mp.setattr(c, "HF_HUB_DISABLE_XET", True)
        try:
            HfApi(endpoint=url).create_repo("team/crashy")
        finally:
            mp.undo()
    git_dir = root / "models" / "team" / "crashy" / ".git"
    (git_dir / "hub-spool-deadbeef").mkdir()
    (git_dir / "hub-spool-deadbeef" / "blob").write_bytes(b"x" * 100)
    (git_dir / "lfs" / "tmp").mkdir(parents=True, exist_ok=True)
    (git_dir / "lfs" / "tmp" / "0123456789abcdef-x.part").write_bytes(b"partial")
    (git_dir / "hf-hub.json.cafe.tmp").write_text("{")
    head = (git_dir / "HEAD").read_text()
    with serve_in_thread(root, no_auth=True):
        pass
    assert not (git_dir / "hub-spool-deadbeef").exists()
    assert not list((git_dir / "lfs" / "tmp").glob("*.part"))
    assert not list(git_dir.glob("hf-hub.json.*.tmp"))
    assert (git_dir / "HEAD").read_text() == head  # the repo itself is untouched


def test_commits_racing_delete_repo_never_get_500(api, hub):
    """Commits in flight while the repo is deleted end in 200 or 404, never in a server error."""
    from huggingface_hub.errors import HfHubHTTPError

    statuses, errors = [], []
    api.create_repo("team/racing")

    def commit_loop(i):
        for j in range(8):
            try:
                api.upload_file(path_or_fileobj=f"{i}-{j}".encode(), path_in_repo=f"f{i}-{j}.txt",
                                repo_id="team/racing")
                statuses.append(200)
            except HfHubHTTPError as e:
                code = e.response.status_code if e.response is not None else None
                statuses.append(code)
                if code is None or code >= 500:
                    errors.append(str(e)[:200])

    threads = [threading.Thread(target=commit_loop, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    api.delete_repo("team/racing")
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert set(statuses) <= {200, 404}


# -- more of the Hub's API ------------------------------------------------------------------

def test_pull_requests_are_refs_pr_n_and_leave_the_branch_alone(api, hub):
    api.create_repo("team/with-prs")
    main_before = head_of(hub[1], "team/with-prs")
    first = api.upload_file(path_or_fileobj=os.urandom(40_000), path_in_repo="w.safetensors",
                            repo_id="team/with-prs", create_pr=True, commit_message="proposal")
    assert first.pr_url.endswith("/team/with-prs/discussions/1") and first.pr_revision == "refs/pr/1"
    assert head_of(hub[1], "team/with-prs") == main_before  # main did not move
    assert head_of(hub[1], "team/with-prs", "refs/pr/1") == first.oid
    more = api.upload_file(path_or_fileobj=b"notes", path_in_repo="notes.txt", repo_id="team/with-prs",
                           revision="refs/pr/1")
    assert head_of(hub[1], "team/with-prs", "refs/pr/1") == more.oid
    second = api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="team/with-prs", create_pr=True)
    assert second.pr_revision == "refs/pr/2"
    refs = api.list_repo_refs("team/with-prs", include_pull_requests=True)
    assert sorted(r.ref for r in refs.pull_requests) == ["refs/pr/1", "refs/pr/2"]
    assert set(api.list_repo_files("team/with-prs", revision="refs/pr/1")) >= {"w.safetensors", "notes.txt"}
    assert "w.safetensors" not in api.list_repo_files("team/with-prs")


def test_copying_an_lfs_file_reuses_its_object(api, hub):
    from huggingface_hub import CommitOperationCopy

    api.create_repo("team/copies")
    data = os.urandom(60_000)
    api.upload_file(path_or_fileobj=data, path_in_repo="a.safetensors", repo_id="team/copies")
    api.create_commit("team/copies", operations=[CommitOperationCopy("a.safetensors", "b/a.safetensors")],
                      commit_message="copy")
    tree = {f.path: f for f in api.list_repo_tree("team/copies", recursive=True) if hasattr(f, "lfs")}
    assert tree["b/a.safetensors"].lfs.sha256 == tree["a.safetensors"].lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert tree["b/a.safetensors"].size == len(data)
    path = api.hf_hub_download("team/copies", "b/a.safetensors", cache_dir=hub[1].parent / "copy-cache")
    assert Path(path).read_bytes() == data


def test_repo_names_are_case_insensitive_and_ascii(api, hub):
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo("Team/CaseRepo")
    with pytest.raises(HfHubHTTPError, match="already created") as e:
        api.create_repo("team/caserepo")
    assert e.value.response.status_code == 409
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="x.txt", repo_id="team/CASEREPO")
    assert api.model_info("TEAM/caserepo").id == "Team/CaseRepo"  # answered under its own name
    assert "x.txt" in api.list_repo_files("team/caserepo")
    url, _ = hub
    status, headers, _ = raw_request(url, "GET", "/api/models/t%D0%B5am/caserepo")  # Cyrillic "е"
    assert status == 400 and "Invalid repo id" in headers["X-Error-Message"]


def test_list_models_by_author_and_search(api, hub, versioned):
    from huggingface_hub import HfApi

    api.create_repo("listing/alpha-tv")
    api.create_repo("listing/beta-tv")
    api.create_repo("listing/secret-tv", private=True)
    ids = sorted(m.id for m in api.list_models(author="listing"))
    assert ids == ["listing/alpha-tv", "listing/beta-tv", "listing/secret-tv"]
    assert [m.id for m in api.list_models(author="LISTING", search="ALPHA")] == ["listing/alpha-tv"]
    assert len(list(api.list_models(author="listing", limit=2))) == 2
    assert "team/model" in {m.id for m in api.list_models(search="team/")}
    with serve_in_thread(hub[1], token=TOKEN, public_read=True) as url2:  # anonymous readers: no private repos
        anonymous = sorted(m.id for m in HfApi(endpoint=url2, token=False).list_models(author="listing"))
    assert anonymous == ["listing/alpha-tv", "listing/beta-tv"]


def test_git_clone_over_http_and_lfs_downloads(hub, versioned, tmp_path):
    url, root = hub
    c1, c2 = versioned
    u = urlsplit(url)
    clone = tmp_path / "http-clone"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_LFS_SKIP_SMUDGE": "1"}
    authed = f"http://user:{TOKEN}@{u.netloc}/team/model"
    subprocess.run(["git", "clone", "-q", authed, str(clone)], check=True, env=env, capture_output=True, timeout=60)
    log = subprocess.run(["git", "-C", str(clone), "log", "--format=%H"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert log[:2] == [c2, c1]
    assert {"v1", "v2"} <= set(subprocess.run(["git", "-C", str(clone), "tag"], capture_output=True,
                                              text=True).stdout.split())
    # without the token: refused (git gets a Basic challenge and gives up without a prompt)
    anonymous = subprocess.run(["git", "clone", "-q", f"{url}/team/model.git", str(tmp_path / "anon")],
                               env=env, capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0 and "Username" in anonymous.stderr  # challenged for credentials
    assert not (tmp_path / "anon" / ".git").exists()
    # pushing over git is refused
    status, _, _ = raw_request(url, "GET", "/team/model.git/info/refs?service=git-receive-pack")
    assert status == 403
    # the LFS objects the clone points at, as git-lfs fetches them
    pointer = (clone / "model.safetensors").read_text().split()
    oid, size = pointer[pointer.index("size") - 1].split(":")[1], int(pointer[-1])
    body = json.dumps({"operation": "download", "transfers": ["basic"],
                       "objects": [{"oid": oid, "size": size}, {"oid": "0" * 64, "size": 3}]}).encode()
    status, _, out = raw_request(url, "POST", "/team/model.git/info/lfs/objects/batch", body,
                                 {"Content-Type": "application/vnd.git-lfs+json"})
    assert status == 200
    found, missing = json.loads(out)["objects"]
    assert missing["error"]["code"] == 404
    href = urlsplit(found["actions"]["download"]["href"])
    status, _, data = raw_request(url, "GET", href.path)
    assert status == 200 and data == SAFETENSORS_V2 and hashlib.sha256(data).hexdigest() == oid


def test_files_that_must_be_lfs_cannot_be_sent_inline(api, hub):
    url, root = hub
    api.create_repo("team/enforced")
    before = head_of(root, "team/enforced")

    def inline_commit(path: str, content: bytes) -> tuple[int, Any]:
        lines = [{"key": "header", "value": {"summary": "sneaky"}},
                 {"key": "file", "value": {"path": path, "encoding": "base64",
                                           "content": base64.b64encode(content).decode()}}]
        body = "\n".join(json.dumps(line) for line in lines).encode()
        status, headers, _ = raw_request(url, "POST", "/api/models/team/enforced/commit/main", body,
                                         {"Content-Type": "application/x-ndjson"})
        return status, headers

    status, headers = inline_commit("task_vector.safetensors", b"plain text, not weights")
    assert status == 400 and "must be uploaded through LFS" in headers["X-Error-Message"]
    status, headers = inline_commit("data.dat", bytes(range(256)) * 4)  # binary content
    assert status == 400 and "must be uploaded through LFS" in headers["X-Error-Message"]
    assert head_of(root, "team/enforced") == before
    assert inline_commit("notes.txt", b"plain text is fine")[0] == 200
