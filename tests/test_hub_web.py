"""The embedded Hub's web page, loaded in a real headless browser (Chromium from Debian's
``chromium`` package; skipped where it is not installed) and over plain HTTP."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
from urllib.parse import urljoin, urlsplit

import pytest

from hf_taskarith.hub.server import serve_in_thread

TOKEN = "web-token-123"
CARD = (b"---\nlicense: mit\nbase_model: org/base\n---\n# Sentiment task vector\n\n"
        b"Trained *gently*. <script>alert(1)</script>\n")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def client_env():
    import huggingface_hub.constants as c

    mp = pytest.MonkeyPatch()
    mp.setattr(c, "HF_HUB_OFFLINE", False)
    mp.setattr(c, "HF_HUB_DISABLE_XET", True)
    yield
    mp.undo()


def _populate(url: str, token: str | None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=token or False)
    api.create_repo("team/sentiment-tv")
    api.upload_file(path_or_fileobj=CARD, path_in_repo="README.md", repo_id="team/sentiment-tv",
                    commit_message="first version")
    api.create_tag("team/sentiment-tv", tag="v1")
    api.upload_file(path_or_fileobj=b"\x00weights", path_in_repo="task_vector.safetensors",
                    repo_id="team/sentiment-tv", commit_message="weights")
    api.create_tag("team/sentiment-tv", tag="v2")
    api.create_branch("team/sentiment-tv", branch="exp/lr")
    api.create_repo("team/hidden", private=True)


def _get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict, str]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _browse(url: str, tmp_path) -> str:
    """The DOM Chromium builds for ``url`` (headless, a fresh profile)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_a_browser_lists_repos_follows_one_and_sees_its_versions(tmp_path, client_env):
    with serve_in_thread(tmp_path / "hub", no_auth=True) as url:
        _populate(url, None)
        index = _browse(url + "/", tmp_path)
        links = re.findall(r'<a class="repo" href="([^"]+)">([^<]+)</a>', index)
        assert ("/team/sentiment-tv", "team/sentiment-tv") in links
        page = _browse(urljoin(url, dict((name, href) for href, name in links)["team/sentiment-tv"]), tmp_path)
        versions = re.findall(r'<a class="version" href="[^"]+">([^<]+)</a>', page)
        assert {"v1", "v2", "main", "exp/lr"} <= set(versions)
        assert "<h1>Sentiment task vector</h1>" in page and "<em>gently</em>" in page
        assert "<script>" not in page.split('id="card"')[1]  # raw HTML in a card is shown as text
        assert "task_vector.safetensors" in page and "first version" in page
        at_v1 = _browse(url + "/team/sentiment-tv?rev=v1", tmp_path)
        assert "task_vector.safetensors" not in at_v1  # the files of that version


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_a_browser_signs_in_with_the_token_url(tmp_path, client_env):
    with serve_in_thread(tmp_path / "hub", token=TOKEN) as url:
        _populate(url, TOKEN)
        assert "team/sentiment-tv" not in _browse(url + "/", tmp_path)  # 401 without the token
        index = _browse(f"{url}/?token={TOKEN}", tmp_path)  # cookie set, redirected to /
        assert "team/sentiment-tv" in index and "team/hidden" in index


def test_pages_over_http_and_the_cookie_only_reads(tmp_path, client_env):
    with serve_in_thread(tmp_path / "hub", token=TOKEN) as url:
        _populate(url, TOKEN)
        assert _get(url, "/")[0] == 401
        status, headers, _ = _get(url, f"/?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        status, headers, html = _get(url, "/team/sentiment-tv", {"Cookie": cookie})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert _get(url, "/team/sentiment-tv", {"Cookie": "hf_taskarith_hub_token=wrong-token-1"})[0] == 401
        assert _get(url, "/api/models/team/sentiment-tv", {"Cookie": cookie})[0] == 200  # reads: yes
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("POST", "/api/repos/create", body=b'{"name": "by-cookie", "organization": "team"}',
                     headers={"Cookie": cookie, "Content-Type": "application/json"})
        assert conn.getresponse().status == 401  # writes: never with the cookie
        conn.close()
        assert _get(url, "/team/hidden")[0] == 401
        assert _get(url, "/team/no-such-repo", {"Cookie": cookie})[0] == 404
