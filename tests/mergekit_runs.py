"""Running one YAML config through mergekit and through us, for the parity tests.

Shared by ``tests/test_parity_mergekit*.py``, ``test_slices.py`` and ``test_tokenizer_union.py``;
mergekit is imported only when :func:`run_mergekit` runs (those modules skip without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith import merge_from_config


def mergekit_options(**overrides: Any) -> Any:
    """mergekit's options for a quiet run without a tokenizer copy or a card (``overrides`` win)."""
    from mergekit.options import MergeOptions

    return MergeOptions(**{"copy_tokenizer": False, "lazy_unpickle": True, "quiet": True,
                           "write_model_card": False, **overrides})


def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_mergekit(text: str, out: Path, options: Any = None) -> dict[str, torch.Tensor]:
    """mergekit's ``run_merge`` on YAML ``text`` into ``out``; its tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=options if options is not None else mergekit_options())
    return state_dict(out)


def run_ours(text: str, tmp_path: Path, out: Path) -> dict[str, torch.Tensor]:
    """``merge_from_config`` on YAML ``text`` (written next to ``out``) into ``out``; its tensors."""
    cfg_file = tmp_path / f"{out.name}.yml"
    cfg_file.write_text(text)
    return state_dict(merge_from_config(cfg_file, out, progress=False))


def run_both(text: str, tmp_path: Path) -> tuple[dict, dict]:
    """Ours and mergekit's results on the same YAML, checked to hold the same names and dtypes."""
    ours, theirs = run_ours(text, tmp_path, tmp_path / "ours"), run_mergekit(text, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
    return ours, theirs


#: how far the engine's block path may be from mergekit for the methods it evaluates from Gram
#: matrices (:mod:`hf_taskarith.merging.span`): float32 ulps of each tensor's largest entry
ULPS = 16


def run_ours_whole_tensors(text: str, tmp_path: Path, out: Path) -> dict[str, torch.Tensor]:
    """:func:`run_ours` with every tensor on the engine's whole-tensor path (the functions that
    repeat mergekit's float32 arithmetic step by step)."""
    import pytest

    import hf_taskarith.merging.engine as engine

    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "kernel_for", lambda method, params, context: None)
        return run_ours(text, tmp_path, out)


def assert_close_to(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], ulps: float = ULPS) -> None:
    """Same names and dtypes, and every tensor within ``ulps`` float32 ulps of its largest entry."""
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        scale = float(theirs[k].float().abs().max()) or 1.0
        off = float((ours[k].float() - theirs[k].float()).abs().max()) / (scale * 2 ** -23)
        assert off <= ulps, (k, off)


def corrupted_copy(source: Path, folder: Path, *, value: float, min_numel: int, index: int) -> str:
    """Copy the checkpoint ``source`` to ``folder`` with ``value`` (NaN, inf) written at flat
    ``index`` of its first tensor of more than ``min_numel`` elements; returns that tensor's name."""
    from safetensors.torch import save_file

    folder.mkdir()
    sd = state_dict(source)
    name = next(k for k in sd if sd[k].numel() > min_numel)
    sd[name].view(-1)[index] = value
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    for f in source.glob("*.json"):
        (folder / f.name).write_bytes(f.read_bytes())
    return name
