"""Which files go through LFS: the ``preupload`` decision, made the way the Hub makes it.

A file is uploaded through LFS when ``.gitattributes`` at the target revision marks it
``filter=lfs`` (new repos get the Hub's default list: ``*.safetensors``, ``*.bin``, ``*.pt`` ...),
when it is larger than the regular-file limit (10 MiB by default), or when its first 512 bytes
(the sample the client sends) look binary. Empty files are always regular.

Note:
    Patterns are matched like gitattributes for the common forms (``*.ext``, ``name``,
    ``dir/**``, ``/rooted``, ``*tfevents*``); negations, macros and character-class subtleties
    of git's wildmatch are not implemented.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

UploadMode = Literal["lfs", "regular"]

_DEFAULT_LFS_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
]
#: the ``.gitattributes`` of a new repo (its initial commit), as on the Hub
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _DEFAULT_LFS_PATTERNS)


def lfs_patterns(gitattributes: str) -> list[str]:
    """Patterns that a ``.gitattributes`` text marks ``filter=lfs``."""
    patterns = []
    for line in gitattributes.splitlines():
        parts = line.strip().split()
        if parts and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def matches(path: str, pattern: str) -> bool:
    """Whether ``path`` (relative, POSIX) matches a gitattributes ``pattern`` (common forms)."""
    if pattern.endswith("/**"):
        prefix = pattern[:-3].lstrip("/")
        return path.startswith(prefix + "/")
    if "/" not in pattern.rstrip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    pattern = pattern.lstrip("/")
    if fnmatch.fnmatchcase(path, pattern):
        return True
    return "**/" in pattern and fnmatch.fnmatchcase(path, pattern.replace("**/", ""))


def looks_binary(sample: bytes) -> bool:
    """NUL bytes or invalid UTF-8 in the sample (a character cut at the sample's end is fine)."""
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(sample) - 3
    return False


def choose_upload_mode(path: str, size: int, sample: bytes, patterns: list[str], regular_limit: int) -> UploadMode:
    if size == 0:
        return "regular"
    if size > regular_limit or any(matches(path, p) for p in patterns) or looks_binary(sample):
        return "lfs"
    return "regular"
