"""The embedded Hub against clients that misbehave: idle and trickling connections, stalled or
slow bodies, no token, and a server killed mid-upload. (Browser attacks: tests/test_hub_guard.py;
sizes, JSON types, delete races and missing LFS objects: tests/test_hub_server.py.)"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from hf_taskarith.hub.server import serve_in_thread
from hf_taskarith.hub.server.app import read_token


def _connect(url: str) -> socket.socket:
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds``; returns what it sent before."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not data:
            return True, received
        received += data
    return False, received


def _get(url: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_idle_connections_cost_no_threads_and_requests_still_answer(tmp_path):
    with serve_in_thread(tmp_path / "hub", no_auth=True) as url:
        assert _get(url, "/api/whoami-v2")[0] == 200
        threads_before = threading.active_count()
        idle = [_connect(url) for _ in range(150)]
        try:
            time.sleep(0.3)
            t0 = time.perf_counter()
            status, _ = _get(url, "/api/whoami-v2")
            latency = time.perf_counter() - t0
            assert status == 200 and latency < 2.0, latency
            assert threading.active_count() - threads_before <= 2  # the old server: one thread per connection
        finally:
            for s in idle:
                s.close()


def test_trickled_request_headers_are_cut_off(tmp_path):
    with serve_in_thread(tmp_path / "hub", no_auth=True, header_timeout_s=1.0) as url:
        sock = _connect(url)
        with sock:
            start = time.monotonic()
            for byte in b"GET /api/whoami-v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ":
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                if time.monotonic() - start > 4:
                    break
                time.sleep(0.1)
            closed, _ = _closed_within(sock, 3.0)
            assert closed and time.monotonic() - start < 6


def test_a_silent_connection_is_closed(tmp_path):
    with serve_in_thread(tmp_path / "hub", no_auth=True, header_timeout_s=1.0) as url:
        with _connect(url) as sock:
            closed, _ = _closed_within(sock, 4.0)
            assert closed


def _put_headers(url: str, length: int) -> bytes:
    u = urlsplit(url)
    return (f"POST /api/repos/create HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_stalled_body_gets_408_and_the_connection_closes(tmp_path):
    with serve_in_thread(tmp_path / "hub", no_auth=True, read_timeout_s=1.0) as url:
        with _connect(url) as sock:
            sock.sendall(_put_headers(url, 100) + b'{"name"')
            closed, answer = _closed_within(sock, 5.0)
            assert closed and answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert not (tmp_path / "hub" / "models").exists() or not any((tmp_path / "hub" / "models").rglob("HEAD"))


def test_a_trickled_body_gets_408(tmp_path):
    with serve_in_thread(tmp_path / "hub", no_auth=True, read_timeout_s=1.0, min_body_rate=1000.0) as url:
        with _connect(url) as sock:
            sock.sendall(_put_headers(url, 1000))
            start = time.monotonic()
            answer = b""
            sock.settimeout(0.05)
            while time.monotonic() - start < 6:
                try:
                    sock.sendall(b" ")
                    answer += sock.recv(65536)
                    if answer:
                        break
                except TimeoutError:
                    pass
                except OSError:
                    break
                time.sleep(0.25)
            closed, rest = _closed_within(sock, 3.0)
            answer += rest
            assert answer.startswith(b"HTTP/1.1 408") and b"bytes/s" in answer, answer[:300]
            assert time.monotonic() - start < 5


def test_a_token_is_generated_by_default_and_kept_private(tmp_path):
    root = tmp_path / "hub"
    with serve_in_thread(root) as url:
        token = read_token(root)
        assert len(token) >= 32
        assert stat.S_IMODE((root / ".hub-token").stat().st_mode) == 0o600
        assert _get(url, "/api/whoami-v2")[0] == 401
        assert _get(url, "/api/whoami-v2", token="wrong-token-123")[0] == 401
        assert _get(url, "/api/whoami-v2", token=token)[0] == 200
    with serve_in_thread(root) as url:  # a new run draws a new token
        assert read_token(root) != token
        assert _get(url, "/api/whoami-v2", token=token)[0] == 401


def test_no_auth_is_refused_off_the_loopback(tmp_path):
    with pytest.raises(ValueError, match="no_auth"):
        with serve_in_thread(tmp_path / "hub", host="0.0.0.0", no_auth=True):
            pass


# -- kill -9 mid-upload ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "hf_taskarith.cli.main", "hub", "serve", "--root", str(root),
                             "--port", str(port), "--no-auth"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if _get(f"http://127.0.0.1:{port}", "/api/whoami-v2")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode()[-2000:])


@pytest.mark.slow
def test_kill_9_mid_upload_loses_nothing_acknowledged(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    from huggingface_hub import HfApi

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    root, port = tmp_path / "hub", _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(root, port)
    try:
        api = HfApi(endpoint=url, token=False)
        api.create_repo("team/durable")
        first = os.urandom(300_000)
        acked = api.upload_file(path_or_fileobj=first, path_in_repo="w.safetensors", repo_id="team/durable")
        # an LFS upload killed half-way
        data = os.urandom(2_000_000)
        oid = hashlib.sha256(data).hexdigest()
        batch = json.dumps({"operation": "upload", "transfers": ["basic"],
                            "objects": [{"oid": oid, "size": len(data)}]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/team/durable.git/info/lfs/objects/batch", body=batch,
                     headers={"Content-Type": "application/vnd.git-lfs+json"})
        href = json.loads(conn.getresponse().read())["objects"][0]["actions"]["upload"]["href"]
        conn.close()
        target = urlsplit(href)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"PUT {target.path}?{target.query} HTTP/1.1\r\nHost: {target.netloc}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:1_000_000])
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        sock.close()
        proc = _start_server(root, port)  # leftovers cleaned at start
        lfs_dir = root / "models" / "team" / "durable" / ".git" / "lfs"
        assert not list((lfs_dir / "tmp").glob("*")) if (lfs_dir / "tmp").exists() else True
        assert not (lfs_dir / "objects" / oid[:2] / oid[2:4] / oid).exists()
        path = api.hf_hub_download("team/durable", "w.safetensors", revision=acked.oid,
                                   cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == first
        git = subprocess.run(["git", f"--git-dir={root / 'models/team/durable/.git'}", "fsck", "--strict"],
                             capture_output=True, text=True)
        assert git.returncode == 0, git.stderr
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_big_concurrent_commits_all_land_whole(tmp_path, monkeypatch):
    """Four clients commit ~8 MiB NDJSON bodies at once (inline text files): all land, none mixes."""
    import base64

    from huggingface_hub import HfApi

    root = tmp_path / "hub"
    with serve_in_thread(root, no_auth=True) as url:
        api = HfApi(endpoint=url, token=False)
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        texts = {i: base64.b64encode(os.urandom(6 * 2**20 // 4 * 3)) for i in range(4)}
        for i in texts:
            api.create_repo(f"team/big{i}")
        statuses: dict[int, int] = {}

        def commit(i: int) -> None:
            lines = [{"key": "header", "value": {"summary": f"big {i}"}},
                     {"key": "file", "value": {"path": "big.txt", "encoding": "base64",
                                               "content": base64.b64encode(texts[i]).decode()}}]
            u = urlsplit(url)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            conn.request("POST", f"/api/models/team/big{i}/commit/main",
                         body="\n".join(json.dumps(x) for x in lines).encode(),
                         headers={"Content-Type": "application/x-ndjson"})
            statuses[i] = conn.getresponse().status
            conn.close()

        threads = [threading.Thread(target=commit, args=(i,)) for i in texts]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert statuses == {i: 200 for i in texts}
        for i, text in texts.items():
            path = api.hf_hub_download(f"team/big{i}", "big.txt", cache_dir=tmp_path / "cache")
            assert Path(path).read_bytes() == text
        assert not list(root.glob("models/team/*/.git/hub-spool-*"))  # spools removed
