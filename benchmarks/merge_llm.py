"""Streaming merge of LLM-sized checkpoints: hf_taskarith vs mergekit, side by side.

Generates (once, cached under benchmarks/_work/) a Llama-architecture base and three
fine-tunes: hidden 1024, 16 layers, vocab 32000, bf16, ~321M parameters (~643 MB each),
sharded at 500 MB in the standard transformers layout. Then runs each merge as its own
process, interleaving the tools (ours, mergekit, ours, mergekit, ...), and reports median
wall time, peak RSS of the merging process, and ratios ours / mergekit. Baselines in the
same run: reading the four checkpoints from the page cache, and writing one.

Usage:
    python benchmarks/merge_llm.py [--methods task_arithmetic ties] [--repeats 3] [--no-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=3840,
              num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
PARAMS = {"task_arithmetic": {"weight": 0.3}, "ties": {"weight": 1.0, "density": 0.2}}


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def generate(work: Path) -> dict[str, Path]:
    from hf_taskarith.io.writer import atomic_output_dir, save_tensors

    shapes = llama_shapes(CONFIG)
    folders = {name: work / name for name in ("base", "ft1", "ft2", "ft3")}
    if all((f / "model.safetensors.index.json").is_file() for f in folders.values()):
        return folders
    print(f"generating checkpoints ({sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.1f}M params each)",
          flush=True)
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for k in base:
        if k.endswith("norm.weight"):
            base[k] = torch.ones_like(base[k])
    for idx, (name, folder) in enumerate(folders.items()):
        if idx == 0:
            tensors = base
        else:  # a "fine-tune": a small dense update of its own
            tensors = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16)
                       for k, v in base.items()}
        with atomic_output_dir(folder, overwrite=True) as tmp:
            save_tensors(tensors, tmp, max_shard_size="500MB", metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
        del tensors
    return folders


def write_config(path: Path, method: str, folders: dict[str, Path]) -> Path:
    lines = [f"merge_method: {method}", f"base_model: {folders['base']}", "models:"]
    params = ", ".join(f"{k}: {v}" for k, v in PARAMS[method].items())
    for name in ("ft1", "ft2", "ft3"):
        lines += [f"  - model: {folders[name]}", f"    parameters: {{{params}}}"]
    lines += ["dtype: bfloat16", ""]
    path.write_text("\n".join(lines))
    return path


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS MB of that process tree's largest member)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def read_baseline(folders: dict[str, Path]) -> float:
    t0 = time.perf_counter()
    for f in folders.values():
        for p in f.glob("*.safetensors"):
            with open(p, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def write_baseline(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    shutil.copytree(src, dst)
    os.sync()
    return time.perf_counter() - t0


def compare(ours: Path, theirs: Path, names: list[str]) -> float:
    """Largest |ours - theirs| over some tensors, in units of the largest |value| (bf16 ulps ~ 0.0078)."""
    from hf_taskarith.io.checkpoints import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    worst = 0.0
    for n in names:
        x, y = a.get_tensor(n).float(), b.get_tensor(n).float()
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=sorted(PARAMS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--work", type=Path, default=ROOT / "_work")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "merge_llm.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = generate(args.work)
    mergekit = shutil.which("mergekit-yaml", path=str(BIN)) or shutil.which("mergekit-yaml")
    if args.no_mergekit:
        mergekit = None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    read_baseline(folders)  # warm the page cache
    baseline = {"read_4_checkpoints_s": statistics.median(read_baseline(folders) for _ in range(3)),
                "write_1_checkpoint_s": write_baseline(folders["base"], args.work / "copy")}
    results: dict[str, dict[str, list]] = {}
    for r in range(args.repeats):
        for method in args.methods:
            cfg = write_config(args.work / f"{method}.yml", method, folders)
            tools = {"hf_taskarith": [str(BIN / "hf-taskarith"), "merge", str(cfg), str(args.work / f"out_ours_{method}"),
                                      "--overwrite", "--no-progress"]}
            if mergekit:
                # the invocation the issue measured: defaults + --no-copy-tokenizer
                tools["mergekit"] = [mergekit, str(cfg), str(args.work / f"out_mk_{method}"), "--no-copy-tokenizer"]
            for tool, cmd in tools.items():
                if tool == "mergekit":
                    shutil.rmtree(args.work / f"out_mk_{method}", ignore_errors=True)
                wall, rss = run_measured(cmd, env)
                results.setdefault(method, {}).setdefault(tool, []).append((wall, rss))
                print(f"round {r + 1} {method:16s} {tool:13s} {wall:7.2f} s  {rss:7.0f} MB", flush=True)
    summary = {"baseline": baseline, "methods": {}}
    print(f"\nbaseline: read 4 checkpoints from page cache {baseline['read_4_checkpoints_s']:.2f} s, "
          f"write 1 checkpoint {baseline['write_1_checkpoint_s']:.2f} s")
    print(f"{'method':16s} {'ours s':>8s} {'ours MB':>8s} {'mk s':>8s} {'mk MB':>8s} {'time ratio':>10s} {'RSS ratio':>9s}")
    for method, tools in results.items():
        ours = tools["hf_taskarith"]
        row = {"ours_wall_s": statistics.median(w for w, _ in ours), "ours_peak_rss_mb": max(m for _, m in ours)}
        if "mergekit" in tools:
            mk = tools["mergekit"]
            row.update(mergekit_wall_s=statistics.median(w for w, _ in mk), mergekit_peak_rss_mb=max(m for _, m in mk))
            row["time_ratio"] = row["ours_wall_s"] / row["mergekit_wall_s"]
            row["rss_ratio"] = row["ours_peak_rss_mb"] / row["mergekit_peak_rss_mb"]
            names = ["model.embed_tokens.weight", "model.layers.7.mlp.up_proj.weight", "model.norm.weight"]
            row["max_rel_diff_vs_mergekit"] = compare(args.work / f"out_ours_{method}", args.work / f"out_mk_{method}", names)
        summary["methods"][method] = row
        print(f"{method:16s} {row['ours_wall_s']:8.2f} {row['ours_peak_rss_mb']:8.0f} "
              f"{row.get('mergekit_wall_s', float('nan')):8.2f} {row.get('mergekit_peak_rss_mb', float('nan')):8.0f} "
              f"{row.get('time_ratio', float('nan')):10.3f} {row.get('rss_ratio', float('nan')):9.3f}"
              + (f"   max rel diff vs mergekit {row['max_rel_diff_vs_mergekit']:.4f}" if "max_rel_diff_vs_mergekit" in row else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
