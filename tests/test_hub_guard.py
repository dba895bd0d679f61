"""The embedded Hub against a web page on the user's machine: CSRF and DNS rebinding."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from hf_taskarith.hub.server import serve_in_thread


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # the stock client, online, against loopback only
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    with serve_in_thread(tmp_path / "hub", no_auth=True) as url:  # the open mode: the browser checks alone
        yield url


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    hdrs = dict(headers or {})
    if "Host" in hdrs:
        conn.putrequest(method, path, skip_host=True)
    else:
        conn.putrequest(method, path)
    for k, v in hdrs.items():
        conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _create_body(name="team/tv"):
    org, repo = name.split("/")
    return json.dumps({"name": repo, "organization": org, "type": "model"}).encode()


def test_cross_origin_text_plain_post_is_refused(hub):
    status, _ = _request(hub, "POST", "/api/repos/create", _create_body(),
                         {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403
    status, data = _request(hub, "POST", "/api/repos/create", _create_body(), {"Content-Type": "text/plain"})
    assert status == 415 and b"JSON" in data  # no Origin (a form from a sandboxed page, curl): still not JSON
    status, _ = _request(hub, "POST", "/api/repos/create", _create_body(), {"Origin": "null",
                                                                          "Content-Type": "application/json"})
    assert status == 403
    from huggingface_hub import HfApi

    assert not HfApi(endpoint=hub).repo_exists("team/tv")  # nothing was created


def test_foreign_host_header_is_refused_even_for_reads(hub):
    port = urlsplit(hub).port
    status, data = _request(hub, "GET", "/api/whoami-v2", headers={"Host": f"evil.example:{port}"})
    assert status == 403 and b"DNS rebinding" in data
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, _ = _request(hub, "GET", "/api/whoami-v2", headers={"Host": host})
        assert status == 200, host


def test_same_origin_and_stock_client_writes_work(hub):
    from huggingface_hub import HfApi

    status, _ = _request(hub, "POST", "/api/repos/create", _create_body("team/ok"),
                         {"Content-Type": "application/json", "Origin": hub})
    assert status == 200
    api = HfApi(endpoint=hub)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="team/ok")
    assert "a.txt" in api.list_repo_files("team/ok")


def test_allow_host_serves_another_name(tmp_path):
    with serve_in_thread(tmp_path / "hub", no_auth=True, allow_hosts=("hub.internal",)) as url:
        port = urlsplit(url).port
        status, _ = _request(url, "GET", "/api/whoami-v2", headers={"Host": f"hub.internal:{port}"})
        assert status == 200
    with pytest.raises(ValueError, match="allow_hosts"):
        with serve_in_thread(tmp_path / "hub2", no_auth=True, allow_hosts="hub.internal"):
            pass


@pytest.mark.parametrize("body,expected", [
    ({"name": "tv", "organization": "team", "private": "false"}, "'private' must be true/false"),
    ({"name": ["tv"], "organization": "team"}, None),  # a one-element list is a form field: accepted
    ({"name": 5, "organization": "team"}, "'name' must be a string"),
    ({"name": "tv", "organization": {"a": 1}}, "'organization' must be a string"),
])
def test_wrong_json_types_are_400_not_500(hub, body, expected):
    status, data = _request(hub, "POST", "/api/repos/create", json.dumps(body).encode(),
                            {"Content-Type": "application/json"})
    if expected is None:
        assert status == 200
    else:
        assert status == 400 and expected in data.decode(), data


def test_deeply_nested_json_is_400(hub):
    body = b"[" * 100_000 + b"]" * 100_000
    status, data = _request(hub, "POST", "/api/repos/create", body, {"Content-Type": "application/json"})
    assert status == 400 and b"nested" in data
