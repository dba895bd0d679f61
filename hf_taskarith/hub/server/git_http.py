"""Read-only git over HTTP: ``git clone http://HOST:PORT/<ns>/<name>`` (smart protocol), served by
git's own ``http-backend`` CGI, and LFS downloads through the batch API (what ``git lfs pull``
asks for). Pushing over git (``git-receive-pack``) is refused: writes go through the Hub API,
where commits are checked and compare-and-swapped.

With a token, git sends it as HTTP Basic credentials (any user name, the token as password):
``git clone http://user:TOKEN@127.0.0.1:8090/team/tv``.

Note:
    Each request runs one ``git http-backend`` process; its answer (a pack of the repo's
    history, where LFS files are small pointers) is held in memory before it is sent.
"""

from __future__ import annotations

import subprocess
from urllib.parse import urlencode

from .errors import HubHTTPError
from .git import base_env, git_executable
from .messages import Request, StreamResponse

#: the longest a ``git http-backend`` run may take
BACKEND_TIMEOUT_S = 600


def info_refs(req: Request) -> StreamResponse:
    """``GET /<repo>[.git]/info/refs?service=git-upload-pack``: the refs advertisement."""
    service = (req.query.get("service") or [""])[-1]
    if service != "git-upload-pack":
        raise HubHTTPError(403, f"git over HTTP is read-only here (service {service or 'dumb'!r} refused): clone or "
                                "fetch with a recent git; push through the huggingface_hub client.")
    return _backend(req, "info/refs", b"")


def upload_pack(req: Request) -> StreamResponse:
    """``POST /<repo>[.git]/git-upload-pack``: the pack a clone or fetch asks for."""
    return _backend(req, "git-upload-pack", req.body())


def _backend(req: Request, path: str, body: bytes) -> StreamResponse:
    repo = req.server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    env = base_env() | {
        "GIT_PROJECT_ROOT": str(repo.path), "PATH_INFO": f"/.git/{path}", "GIT_HTTP_EXPORT_ALL": "1",
        "REQUEST_METHOD": req.method, "QUERY_STRING": urlencode({k: v[-1] for k, v in req.query.items()}),
        "CONTENT_TYPE": req.headers.get("Content-Type") or "", "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "127.0.0.1", "GIT_PROTOCOL": req.headers.get("Git-Protocol") or "",
    }
    if req.headers.get("Content-Encoding"):
        env["HTTP_CONTENT_ENCODING"] = req.headers["Content-Encoding"]
    try:
        done = subprocess.run([git_executable(), "http-backend"], input=body, env=env, capture_output=True,
                              timeout=BACKEND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise HubHTTPError(504, f"git http-backend took longer than {BACKEND_TIMEOUT_S} s.") from None
    head, sep, payload = done.stdout.partition(b"\r\n\r\n")
    if not sep or done.returncode != 0 and not head:
        raise RuntimeError(f"git http-backend failed (exit {done.returncode}): {done.stderr[-500:]!r}")
    status, headers = 200, {}
    for line in head.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.split()[0])
        elif key and key.lower() not in ("content-length", "transfer-encoding", "connection"):
            headers[key.strip()] = value.strip()
    return StreamResponse(status, headers, length=len(payload), chunks=[payload])
