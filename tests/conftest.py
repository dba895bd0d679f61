"""Shared fixtures: tiny models built from configs (no downloads), saved once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer trains (``requires_grad``): a LinearizedModel's delta, not theta0."""
    return [p for p in module.parameters() if p.requires_grad]


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.01) -> torch.nn.Module:
    """A copy of ``model`` with Gaussian noise added to every float parameter (a fake fine-tune)."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.fixture(scope="session")
def llama_models():
    """(base, [ft1, ft2, ft3]) tiny Llama models with untied embeddings."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    return base, [perturbed(base, s) for s in (1, 2, 3)]


@pytest.fixture(scope="session")
def llama_checkpoints(tmp_path_factory, llama_models):
    """Folders: base (single file), ft1, ft2, ft3 (ft3 sharded), all float32."""
    root = tmp_path_factory.mktemp("ckpts")
    base, fts = llama_models
    base.save_pretrained(root / "base")
    fts[0].save_pretrained(root / "ft1")
    fts[1].save_pretrained(root / "ft2")
    fts[2].save_pretrained(root / "ft3", max_shard_size="30KB")
    return root


@pytest.fixture(scope="session")
def llama_dtype_checkpoints(tmp_path_factory, llama_models):
    """``float32/`` and ``bfloat16/`` folders, each with base, ft1, ft2, ft3 of the session's
    tiny Llamas saved in that dtype (single files)."""
    import copy

    root = tmp_path_factory.mktemp("dtype_ckpts")
    base, fts = llama_models
    for dtype in (torch.float32, torch.bfloat16):
        for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
            copy.deepcopy(model).to(dtype).save_pretrained(root / str(dtype).split(".")[1] / name)
    return root



@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("regime_map")``: the module of ``benchmarks/<name>.py`` (scripts, not a
    package), loaded once per session."""
    loaded = {}

    def load(name: str):
        if name not in loaded:
            path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load
