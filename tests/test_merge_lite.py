"""The torch-free merge path (hf_taskarith.merging.lite): same bytes as the torch engine, or it steps aside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hf_taskarith.merging.lite as lite
from hf_taskarith import merge_from_config
from hf_taskarith.errors import KeyMismatchError, NonFiniteError, ShapeMismatchError
from hf_taskarith.merging.lite.codecs import decode, encode

SHAPES = {"model.embed_tokens.weight": (64, 48), "model.layers.0.mlp.up_proj.weight": (96, 48),
          "model.layers.0.input_layernorm.weight": (48,), "lm_head.weight": (64, 48)}


def _write(folder: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, config: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = {k: tensors[k] for k in names[i::shards]}
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64,
                                                        "torch_dtype": "bfloat16"}))
        (folder / "tokenizer.json").write_text(json.dumps({"from": folder.name}))
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base (bf16, one int64 buffer), ft1 (bf16), ft2 (float32, sharded), ft3 (float16); plus odd ones."""
    root = tmp_path_factory.mktemp("lite")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}

    def tuned(scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}

    _write(root / "base", {**{k: v.to(torch.bfloat16) for k, v in base.items()},
                           "model.rotary.ids": torch.arange(10, dtype=torch.int64)})
    for name, scale, dtype, shards in [("ft1", 0.02, torch.bfloat16, 1), ("ft2", 0.05, torch.float32, 2),
                                       ("ft3", 0.01, torch.float16, 1)]:
        t = tuned(scale, dtype)
        t["model.rotary.ids"] = torch.arange(10, dtype=torch.int64)
        _write(root / name, t, shards=shards)
    odd = tuned(0.02, torch.bfloat16)
    odd["model.rotary.ids"] = torch.arange(10, dtype=torch.int64)
    _write(root / "nan", {**odd, "lm_head.weight": odd["lm_head.weight"].clone().index_fill_(0, torch.tensor([3]),
                                                                                              float("nan"))})
    _write(root / "short", {k: v for k, v in odd.items() if k != "lm_head.weight"})
    _write(root / "wide", {**odd, "model.layers.0.input_layernorm.weight": torch.ones(50, dtype=torch.bfloat16)})
    return root


def _yaml(root: Path, models: list[tuple[str, float]], extra: str = "", method: str = "task_arithmetic") -> str:
    lines = [f"merge_method: {method}", f"base_model: {root / 'base'}", "models:"]
    lines += [f"  - model: {root / m}\n    parameters: {{weight: {w}}}" for m, w in models]
    return "\n".join(lines) + "\n" + extra


def _run_both(tmp_path: Path, text: str, monkeypatch, **kw) -> tuple[Path, Path, int]:
    calls = []
    real = lite.run_lite
    monkeypatch.setattr(lite, "run_lite", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    fast = merge_from_config(cfg, tmp_path / "fast", progress=False, **kw)
    slow = merge_from_config(cfg, tmp_path / "slow", progress=False, fast_path=False, **kw)
    return fast, slow, len(calls)


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


@pytest.mark.parametrize("models, extra, kw", [
    ([("ft1", 0.3), ("ft2", 0.3), ("ft3", 0.3)], "dtype: bfloat16\n", {}),
    ([("ft1", 1.0), ("ft2", -0.5)], "parameters: {lambda: 0.7}\n", {}),
    ([("ft1", 0.6), ("ft3", 0.2)], "parameters: {normalize: true}\ndtype: float16\n", {"max_shard_size": "8KB"}),
    ([("ft2", 0.4)], "tokenizer_source: ft2\n", {"dtype": "float32"}),
    ([("ft1", 0.0), ("ft2", 0.0)], "parameters: {normalize: true}\n", {"seed": 3}),
])
def test_same_bytes_as_torch_engine(tmp_path, ckpts, monkeypatch, models, extra, kw):
    extra = extra.replace("tokenizer_source: ft2", f"tokenizer_source: {ckpts / 'ft2'}")
    fast, slow, used = _run_both(tmp_path, _yaml(ckpts, models, extra), monkeypatch, **kw)
    assert used == 1, "the torch-free path did not run"
    _assert_same_files(fast, slow)
    if "tokenizer_source" in extra:
        assert json.loads((fast / "tokenizer.json").read_text()) == {"from": "ft2"}


@pytest.mark.parametrize("with_base, extra", [
    (True, ""),                                   # normalized weighted average
    (True, "parameters: {normalize: false}\n"),  # sum of whole models: adds (sum w - 1) * base
    (False, "dtype: float16\n"),                 # no base: the first model is the reference
])
def test_linear_same_bytes_as_torch_engine(tmp_path, ckpts, monkeypatch, with_base, extra):
    text = _yaml(ckpts, [("ft1", 0.6), ("ft2", 0.3), ("ft3", 0.4)], extra, method="linear")
    if not with_base:
        text = text.replace(f"base_model: {ckpts / 'base'}\n", "")
    fast, slow, used = _run_both(tmp_path, text, monkeypatch)
    assert used == 1, "the torch-free path did not run"
    _assert_same_files(fast, slow)


def test_other_methods_and_inputs_use_the_torch_engine(tmp_path, ckpts, monkeypatch):
    fast, slow, used = _run_both(tmp_path, _yaml(ckpts, [("ft1", 1.0), ("ft2", 1.0)], "parameters: {density: 0.5}\n",
                                                 method="ties"), monkeypatch)
    assert used == 0
    _assert_same_files(fast, slow)


@pytest.mark.parametrize("method, models, extra", [
    ("slerp", ["ft1"], "parameters: {t: 0.3}\n"),
    ("model_stock", ["ft1", "ft2", "ft3"], "dtype: float32\n"),
    ("passthrough", ["ft2"], "parameters: {scale: 0.5}\ndtype: bfloat16\n"),
])
def test_weight_space_methods_use_the_torch_engine(tmp_path, ckpts, monkeypatch, caplog, method, models, extra):
    """slerp, model_stock and passthrough are not weighted sums: this path declines them (saying
    why, at INFO) and the torch engine writes the output."""
    lines = [f"merge_method: {method}"] + ([f"base_model: {ckpts / 'base'}"] if method != "passthrough" else [])
    text = "\n".join(lines + ["models:"] + [f"  - model: {ckpts / m}" for m in models]) + "\n" + extra
    with caplog.at_level("INFO", logger="hf_taskarith.merging.lite"):
        fast, slow, used = _run_both(tmp_path, text, monkeypatch)
    assert used == 0
    assert f"method {method!r} runs on the torch engine only" in caplog.text
    _assert_same_files(fast, slow)


@pytest.mark.parametrize("model, error, match", [
    ("short", KeyMismatchError, "lacks tensor 'lm_head.weight'"),
    ("wide", ShapeMismatchError, "input_layernorm.weight"),
    ("nan", NonFiniteError, "nan.*lm_head.weight.*NaN or inf"),
])
def test_bad_inputs_get_the_torch_engines_errors(tmp_path, ckpts, model, error, match):
    cfg = tmp_path / "m.yml"
    cfg.write_text(_yaml(ckpts, [("ft1", 0.5), (model, 0.5)]))
    with pytest.raises(error, match=match):
        merge_from_config(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_bad_parameters_are_refused_strictly(tmp_path, ckpts):
    from hf_taskarith.errors import MergeConfigError

    cfg = tmp_path / "m.yml"
    cfg.write_text(_yaml(ckpts, [("ft1", 0.5)], "parameters: {densty: 0.5}\n"))
    with pytest.raises(MergeConfigError, match="does not take parameter.*densty"):
        merge_from_config(cfg, tmp_path / "out", progress=False)


def test_cli_merge_imports_no_torch(tmp_path, ckpts):
    cfg = tmp_path / "m.yml"
    cfg.write_text(_yaml(ckpts, [("ft1", 0.3), ("ft2", 0.3)], "dtype: bfloat16\n"))
    code = ("import sys; from hf_taskarith.cli.main import main; "
            f"rc = main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--no-progress']); "
            "print('rc', rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rc 0 False" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("code, dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_codecs_round_like_torch(code, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * s for s in (1e-40, 1e-6, 1.0, 1e4, 1e30)])
    # exact ties between two representable values, to check round-half-to-even (finite
    # patterns only: merges check finiteness before narrowing)
    bits = torch.randint(0, 0x7F80, (2048,), generator=g, dtype=torch.int32) << 16 | 0x8000
    x = torch.cat([x, bits.view(torch.float32)])
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    n = x.numel()
    ours = encode(code, x.numpy(), np.empty(n, np.uint16 if code == "BF16" else np.float16), np.empty(n, np.uint32))
    ref = x.to(dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours.view(np.uint16), ref)
    back = decode(code, ours, np.empty(n, np.float32))
    assert np.array_equal(back, x.to(dtype).to(torch.float32).numpy())


def test_interrupt_leaves_nothing_behind(tmp_path, ckpts, monkeypatch):
    """Ctrl-C in the middle of the torch-free merge: no output folder, no temporary folder."""
    import hf_taskarith.merging.lite.engine as engine

    real, calls = engine.encode, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "encode", interrupted)
    cfg = tmp_path / "m.yml"
    cfg.write_text(_yaml(ckpts, [("ft1", 0.5), ("ft2", 0.5)], "dtype: bfloat16\n"))
    with pytest.raises(KeyboardInterrupt):
        merge_from_config(cfg, tmp_path / "out", progress=False)
    assert len(calls) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]
