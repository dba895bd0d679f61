"""A thin wrapper over the ``git`` command line, isolated from the user's configuration.

Only plumbing commands are used (``hash-object``, ``update-index`` on a temporary index,
``write-tree``, ``commit-tree``, ``update-ref`` with the expected old value, ``cat-file``,
``ls-tree``, ``for-each-ref``, ``log``), so the repositories stay ordinary git repositories that
``git clone`` and read-only mirrors such as olah can read.

Note:
    The user's and the system's git configuration are ignored (``GIT_CONFIG_GLOBAL=/dev/null``,
    ``GIT_CONFIG_NOSYSTEM=1``) so that e.g. ``commit.gpgSign`` cannot make a commit hang, and
    inherited ``GIT_*`` variables (``GIT_DIR``, ``GIT_INDEX_FILE`` ...) cannot redirect a command.
    Each call is one subprocess (about a millisecond or two).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import HubHTTPError

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


class GitError(RuntimeError):
    """A git command failed (its stderr is in the message)."""


@functools.lru_cache(maxsize=1)
def git_executable() -> str:
    exe = shutil.which("git")
    if exe is None:
        raise RuntimeError("the embedded Hub stores repos as git repositories and needs the `git` command; "
                           "install git (e.g. `apt-get install git`)")
    return exe


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
                "LC_ALL": "C", "LANG": "C"})
    return env


def init_repository(path: Path) -> None:
    """``git init -b main <path>`` (a non-bare repository: its git directory is ``path/.git``)."""
    proc = subprocess.run([git_executable(), "init", "-q", "-b", "main", str(path)], capture_output=True,
                          cwd=Path(path).parent, env=base_env())
    if proc.returncode:
        raise GitError(f"git init {path} failed: {proc.stderr.decode(errors='replace').strip()}")


class Git:
    """Runs git commands against one repository's git directory."""

    def __init__(self, git_dir: Path) -> None:
        self.git_dir = Path(git_dir)
        self._exe = git_executable()
        self._env = base_env()

    def _cmd(self, args: Sequence[str]) -> list[str]:
        return [self._exe, f"--git-dir={self.git_dir}", *args]

    def run(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            ok_codes: tuple[int, ...] = (0,)) -> bytes:
        """Run ``git <args>``; return stdout.

        Raises:
            GitError: the exit code is not in ``ok_codes``.
        """
        proc = subprocess.run(self._cmd(args), input=input, capture_output=True, cwd=self.git_dir,
                              env={**self._env, **(env or {})})
        if proc.returncode not in ok_codes:
            raise GitError(f"git {' '.join(args[:3])} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout

    def try_run(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None) -> bytes | None:
        """Like :meth:`run`, but ``None`` instead of an error on a non-zero exit."""
        proc = subprocess.run(self._cmd(args), input=input, capture_output=True, cwd=self.git_dir,
                              env={**self._env, **(env or {})})
        return proc.stdout if proc.returncode == 0 else None

    def stream_blob(self, sha: str, *, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield a blob's bytes ``[start, start+length)`` without holding it in memory."""
        proc = subprocess.Popen(self._cmd(["cat-file", "blob", sha]), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=self.git_dir, env=self._env)
        if proc.stdout is None:  # cannot happen with stdout=PIPE; a clear error rather than an assert
            raise RuntimeError(f"git cat-file gave no output pipe for blob {sha}")
        try:
            to_skip, remaining = start, length
            while True:
                data = proc.stdout.read(1024 * 1024)
                if not data:
                    break
                if to_skip:
                    cut = min(to_skip, len(data))
                    data, to_skip = data[cut:], to_skip - cut
                if remaining is not None:
                    data = data[:remaining]
                    remaining -= len(data)
                if data:
                    yield data
                if remaining == 0:
                    break
        finally:
            proc.kill()
            proc.wait()

    def cat_file_batch(self, shas: Sequence[str]) -> dict[str, bytes]:
        """Contents of several blobs in one process (``git cat-file --batch``)."""
        if not shas:
            return {}
        out = self.run("cat-file", "--batch", input="".join(f"{s}\n" for s in shas).encode())
        result: dict[str, bytes] = {}
        pos = 0
        for sha in shas:
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            if len(header) < 3 or header[1] == b"missing":
                raise HubHTTPError(500, f"git object {sha} is missing from the repository (corrupt repo?)")
            size = int(header[2])
            result[sha] = out[end + 1:end + 1 + size]
            pos = end + 1 + size + 1
        return result
