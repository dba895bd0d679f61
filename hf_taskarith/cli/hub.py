"""``hf-taskarith hub serve``: run the embedded Hub-compatible server on a folder of git repos."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

TOKEN_ENV = "HF_TASKARITH_HUB_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hub", help="embedded Hub server (for air-gapped teams, the demo and tests)",
                       description="Embedded, Hub-compatible HTTP server storing each repo as a git repository.")
    hub_sub = p.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    s = hub_sub.add_parser(
        "serve", help="serve a folder of repos over HTTP",
        description="Serve DIR/models/<org>/<name> (git repositories) to the huggingface_hub client. Clients: "
                    "export HF_ENDPOINT=http://HOST:PORT HF_HUB_DISABLE_XET=1 HF_TOKEN=<token>. Without --token, "
                    "a random token is generated, printed, and written to DIR/.hub-token (readable by you only); "
                    "--no-auth serves without one (loopback only: any web page you open could write).")
    s.add_argument("--root", required=True, help="folder holding the repos (created if missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only; "
                                                       "other addresses refuse --no-auth)")
    s.add_argument("--port", type=int, default=8090, help="TCP port (default: %(default)s; 0 picks a free one)")
    s.add_argument("--token", help=f"require this bearer token (default: ${TOKEN_ENV}; prefer the variable or "
                                   "--token-file, a command-line token is visible to other local users)")
    s.add_argument("--token-file", help="read the required token from this file")
    s.add_argument("--no-auth", action="store_true",
                   help="no token at all: every local caller may read and write (tests; loopback only)")
    s.add_argument("--public-read", action="store_true",
                   help="with a token: let clients without a token read public repos")
    s.add_argument("--user", default="local", help="account name (whoami, default namespace, commit author)")
    s.add_argument("--max-request-size", default="64MiB", help="largest JSON/commit body (default: %(default)s)")
    s.add_argument("--max-upload-size", default="5GiB", help="largest LFS file (default: %(default)s)")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header names NAME (repeatable; loopback names and the "
                        "bound address are always served; '*' serves any, disabling DNS-rebinding protection)")
    s.set_defaults(func=run_serve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def build_config(args: argparse.Namespace):
    """The :class:`HubServerConfig` for parsed ``hub serve`` arguments.

    Raises:
        ValueError: conflicting or invalid options (message says which).
    """
    from ..hub.server import HubServerConfig
    from ..hub.server.limits import parse_size

    if args.token and args.token_file:
        raise ValueError("give either --token or --token-file, not both")
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    token = token or os.environ.get(TOKEN_ENV) or None
    if args.no_auth and token:
        raise ValueError(f"--no-auth and a token (--token, --token-file or ${TOKEN_ENV}) contradict each other")
    return HubServerConfig(root=Path(args.root), host=args.host, port=args.port, token=token, no_auth=args.no_auth,
                           public_read=args.public_read, user=args.user,
                           max_request_bytes=parse_size(args.max_request_size),
                           max_upload_bytes=parse_size(args.max_upload_size),
                           allow_hosts=tuple(args.allow_host))


def run_serve(args: argparse.Namespace) -> int:
    from ..hub.server import HubServer

    try:
        config = build_config(args)
        server = HubServer(config)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("hf_taskarith.hub.server").setLevel(logging.INFO)
    if server.token_file is not None:
        auth = f"token generated for this run, in {server.token_file} (readable by you only)"
        client_token = f" HF_TOKEN={server.token}"
    elif server.token is not None:
        auth, client_token = "token required", " HF_TOKEN=<token>"
    else:
        auth, client_token = "--no-auth: every local caller, web pages included, may write", ""
    page = f"{server.url}/?token={server.token}" if server.token_file is not None else f"{server.url}/"
    print(f"Serving the Hub at {server.url} from {config.root.resolve()} ({auth}).\n"
          f"Clients: export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1{client_token}\n"
          f"In a browser: {page}" + ("?token=<token>" if server.token_file is None and server.token else ""),
          flush=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (docker stop, systemd) stops cleanly too
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
