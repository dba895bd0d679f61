"""Merging LLM-sized checkpoints: hf_taskarith vs mergekit, side by side, in one invocation.

Generates once (cached under ``benchmarks/_work/``) a Llama-architecture base and three
fine-tunes: hidden 1024, 16 layers, vocab 32000, bf16, 321M parameters (643 MB each), in the
standard transformers layout (``config.json``, ``model-0000x-of-0000y.safetensors`` sharded at
500 MB, ``model.safetensors.index.json``), written with the ``safetensors`` package itself.
A fine-tune is the base plus small dense noise of its own.

Then, for each method (:data:`CASES`: task_arithmetic with weights 0.3; ties with weight 1.0,
density 0.2; and the weight-space and newer methods, slerp, nuslerp, multislerp, karcher,
model_stock, nearswap, sce, arcee_fusion, each with the inputs its contract takes),
both tools run the same mergekit-format YAML, each merge in its own process, interleaved
(ours, mergekit, mergekit, ours, ...). For task_arithmetic, ``hf-taskarith merge`` takes its
torch-free path (numpy; ``hf_taskarith.merging.lite``); the same CLI with ``--no-fast-path``
(the torch engine) runs interleaved too, as a third row. Reported: median wall time and peak RSS (``ru_maxrss``
of the merging process, from ``os.wait4`` in a small launcher process), ratios
ours / mergekit, and baselines from the same run: reading the four checkpoints from the page
cache, writing one, and starting Python with ``import torch`` (resp. mergekit's CLI imports),
the fixed cost every run pays before merging anything. Outputs are compared tensor by tensor
on a sample of tensors, so the timings are of real, equal work.

Usage:
    .venv/bin/python benchmarks/merge_llm.py [--methods task_arithmetic ties] [--repeats 2]
                                             [--no-mergekit] [--regenerate] [--json PATH]
    # the newer methods, into their own results file:
    .venv/bin/python benchmarks/merge_llm.py --methods slerp nuslerp multislerp karcher model_stock \\
        nearswap sce arcee_fusion --repeats 1 --json benchmarks/results/merge_llm_methods.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SHARD_BYTES = 500 * 10**6
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
    "intermediate_size": 3840, "num_hidden_layers": 16, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
#: bumped when the generated checkpoints change, so stale caches are rebuilt
DATA_VERSION = "2"

@dataclass(frozen=True)
class Case:
    """One benchmarked method: the fine-tunes it merges, its per-model and shared parameters, and its
    targets (time as a ratio of mergekit's; peak RSS in bytes, or ``None``: at most mergekit's)."""

    models: tuple[str, ...] = ("ft1", "ft2", "ft3")
    per_model: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    time_ratio: float = 0.5
    peak_rss_bytes: float | None = None


#: task_arithmetic and ties keep their tighter targets; the weight-space and newer methods
#: must take at most half mergekit's time at no more than its peak memory
CASES = {
    "task_arithmetic": Case(per_model={"weight": 0.3}, time_ratio=0.25, peak_rss_bytes=1.2e9),
    "ties": Case(per_model={"weight": 1.0, "density": 0.2}, time_ratio=0.25, peak_rss_bytes=1.2e9),
    "slerp": Case(models=("ft1",), shared={"t": 0.3}),
    "nuslerp": Case(models=("ft1", "ft2"), per_model={"weight": 0.5}),
    "multislerp": Case(per_model={"weight": 1.0}),
    "karcher": Case(),
    "model_stock": Case(),
    "nearswap": Case(models=("ft1",), shared={"t": 0.001}),
    "sce": Case(shared={"select_topk": 0.2}),
    "arcee_fusion": Case(models=("ft1",)),
}
PARAMS = {m: {**c.per_model, **c.shared} for m, c in CASES.items()}
TOOL_FLAGS = {
    # both write 500 MB shards, as the inputs are, and show no progress bars
    "hf_taskarith": ["--no-progress", "--max-shard-size", "500MB"],
    # the same CLI forced onto the torch engine (task_arithmetic otherwise runs torch-free)
    "hf_taskarith_torch": ["--no-progress", "--max-shard-size", "500MB", "--no-fast-path"],
    # --lazy-unpickle only changes how pickled .bin inputs load (a no-op for safetensors);
    # --out-shard-size also stops mergekit from holding a 5B-byte output shard in memory
    "mergekit": ["--no-copy-tokenizer", "--quiet", "--lazy-unpickle", "--out-shard-size", "500M"],
}
SPOT_CHECK = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.7.mlp.up_proj.weight", "model.layers.15.mlp.down_proj.weight",
              "model.layers.15.input_layernorm.weight", "model.norm.weight", "lm_head.weight"]


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


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Standard transformers layout, written with the safetensors package (not the library under test)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))


def generate(work: Path, *, regenerate: bool = False) -> dict[str, Path]:
    """The base and three fine-tunes, generated once and reused while ``DATA_VERSION`` matches."""
    folders = {name: work / name for name in ("base", "ft1", "ft2", "ft3")}
    stamp = work / "DATA_VERSION"
    if not regenerate and stamp.is_file() and stamp.read_text() == DATA_VERSION and all(
            (f / "model.safetensors.index.json").is_file() for f in folders.values()):
        return folders
    stamp.unlink(missing_ok=True)
    shapes = llama_shapes(CONFIG)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"generating base + 3 fine-tunes ({n / 1e6:.1f}M params, {2 * n / 1e6:.0f} MB each) in {work}",
          flush=True)
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
                ).to(torch.bfloat16) for k, s in shapes.items()}
    for name, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if name == "base":
            tensors = base
        else:  # a "fine-tune": a small dense update of its own
            tensors = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16)
                       for k, v in base.items()}
        _save_sharded(tensors, folder)
        del tensors
    stamp.write_text(DATA_VERSION)
    return folders


def write_config(path: Path, method: str, folders: dict[str, Path]) -> Path:
    """One mergekit-format YAML, run unchanged by both tools."""
    case = CASES[method]
    params = ", ".join(f"{k}: {v}" for k, v in case.per_model.items())
    lines = [f"merge_method: {method}", f"base_model: {folders['base']}", "models:"]
    for name in case.models:
        lines += [f"  - model: {folders[name]}"] + ([f"    parameters: {{{params}}}"] if params else [])
    if case.shared:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in case.shared.items()]
    path.write_text("\n".join(lines + ["dtype: bfloat16", ""]))
    return path


#: Runs one command and prints "<wall seconds> <peak RSS KiB>" of it. A small process of its
#: own starts the merge because Linux carries the exec'ing process's high-water RSS into the
#: new program's ``ru_maxrss``: spawned straight from this (torch-importing) process, every
#: merge would report at least this process's peak.
LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(time.perf_counter() - t0, usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run one merge in its own process: (wall seconds, peak RSS bytes of that process)."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, env=env, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    wall, kib = proc.stdout.split()
    return float(wall), int(kib) * 1024


def read_baseline(folders: dict[str, Path]) -> float:
    """Seconds to read every weight file of the four checkpoints (from the page cache once
    warm), as ``cat`` does: into one small reused buffer."""
    buf = memoryview(bytearray(1 << 20))
    t0 = time.perf_counter()
    for f in folders.values():
        for p in sorted(f.glob("*.safetensors")):
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t0


def write_baseline(src: Path, dst: Path) -> tuple[float, float]:
    """Seconds to write one checkpoint's bytes: into the page cache, and including fsync."""
    data = [p.read_bytes() for p in sorted(src.glob("*.safetensors"))]
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    files = []
    for j, blob in enumerate(data):
        fh = open(dst / f"part{j}.safetensors", "wb", buffering=0)
        fh.write(blob)
        files.append(fh)
    cached = time.perf_counter() - t0
    for fh in files:
        os.fsync(fh.fileno())
        fh.close()
    synced = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    return cached, synced


def _load(folder: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(str(folder / file), framework="pt") as f:
        return f.get_tensor(name)


def _ulps(x: torch.Tensor, y: torch.Tensor, *scale: torch.Tensor) -> torch.Tensor:
    """|x - y| in bf16 units in the last place of the largest magnitude among ``scale``."""
    mag = torch.stack([t.abs().float() for t in scale]).amax(dim=0).clamp_min(torch.finfo(torch.bfloat16).tiny)
    return (x.float() - y.float()).abs() / torch.exp2(torch.floor(torch.log2(mag)) - 7)


def compare(method: str, ours: Path, theirs: Path, folders: dict[str, Path]) -> dict[str, float]:
    """Our output against mergekit's on the :data:`SPOT_CHECK` tensors.

    Differences are in bf16 ulps of the largest magnitude among both results and the inputs
    (mergekit rounds its intermediates to bf16, so its error scale is the inputs'), as in
    ``tests/test_parity_mergekit.py``. For task_arithmetic both are also compared, on the same
    scale, with the exact result (float64 maths rounded once to bf16).
    """
    inputs = list(folders.values())
    worst, beyond, equal, total = 0.0, 0, 0, 0
    exact_ulps = {"hf_taskarith": 0.0, "mergekit": 0.0}
    for name in SPOT_CHECK:
        x, y = _load(ours, name), _load(theirs, name)
        ins = [_load(f, name) for f in inputs]
        u = _ulps(x, y, x, y, *ins)
        worst, beyond = max(worst, float(u.max())), beyond + int((u > 3).sum())
        equal, total = equal + int((x == y).sum()), total + x.numel()
        if method == "task_arithmetic":
            base = ins[0].double()
            exact = (base + sum(PARAMS[method]["weight"] * (t.double() - base) for t in ins[1:])).to(torch.bfloat16)
            for tool, out in (("hf_taskarith", x), ("mergekit", y)):
                exact_ulps[tool] = max(exact_ulps[tool], float(_ulps(out, exact, exact, *ins).max()))
    result = {"tensors_checked": len(SPOT_CHECK), "max_diff_bf16_ulps": worst, "fraction_equal": equal / total,
              "fraction_beyond_3_ulps": beyond / total}
    if method == "task_arithmetic":
        result.update({f"{tool}_max_ulps_from_exact": v for tool, v in exact_ulps.items()})
    return result


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=sorted(CASES),
                    help="methods to time (default: task_arithmetic ties)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool and method (median reported)")
    ap.add_argument("--no-mergekit", action="store_true", help="time hf_taskarith only")
    ap.add_argument("--regenerate", action="store_true", help="rebuild the cached checkpoints")
    ap.add_argument("--work", type=Path, default=ROOT / "_work")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "merge_llm.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = generate(args.work, regenerate=args.regenerate)

    tools = {"hf_taskarith": [str(BIN / "hf-taskarith"), "merge"],
             "hf_taskarith_torch": [str(BIN / "hf-taskarith"), "merge"]}
    mergekit = shutil.which("mergekit-yaml", path=str(BIN)) or shutil.which("mergekit-yaml")
    if not args.no_mergekit:
        if mergekit is None:
            sys.exit("mergekit-yaml not found; install mergekit==0.1.5 or pass --no-mergekit")
        tools["mergekit"] = [mergekit]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    load_before = os.getloadavg()

    read_baseline(folders)  # warm the page cache: every run below reads from memory
    baseline = {"read_4_checkpoints_s": _median([read_baseline(folders) for _ in range(3)])}
    baseline["write_1_checkpoint_page_cache_s"], baseline["write_1_checkpoint_fsync_s"] = \
        write_baseline(folders["base"], args.work / "write_baseline")
    # the fixed cost of starting each tool: the interpreter plus its imports
    baseline["import_torch_s"] = _median([run_measured([sys.executable, "-c", "import torch"], env)[0]
                                          for _ in range(3)])
    baseline["import_numpy_s"] = _median([run_measured([sys.executable, "-c", "import numpy"], env)[0]
                                          for _ in range(3)])
    if "mergekit" in tools:
        baseline["import_mergekit_cli_s"] = _median(
            [run_measured([sys.executable, "-c", "import mergekit.scripts.run_yaml"], env)[0] for _ in range(3)])
    mk_import = baseline.get("import_mergekit_cli_s")
    print(f"baseline: read 4 checkpoints (page cache) {baseline['read_4_checkpoints_s']:.2f} s; write 1 checkpoint "
          f"{baseline['write_1_checkpoint_page_cache_s']:.2f} s (page cache), "
          f"{baseline['write_1_checkpoint_fsync_s']:.2f} s (with fsync); start python + import torch "
          f"{baseline['import_torch_s']:.2f} s (numpy: {baseline['import_numpy_s']:.2f} s)"
          + (f", + mergekit's CLI imports {mk_import:.2f} s" if mk_import else ""), flush=True)

    configs = {m: write_config(args.work / f"{m}.yml", m, folders) for m in args.methods}
    # the torch-engine row only where the method has a torch-free path (elsewhere it is the same run)
    tools_for = {m: [t for t in tools if t != "hf_taskarith_torch" or m == "task_arithmetic"] for m in args.methods}
    runs: dict[str, dict[str, list[tuple[float, int]]]] = {m: {t: [] for t in tools_for[m]} for m in args.methods}
    commands: dict[str, dict[str, str]] = {m: {} for m in args.methods}
    for r in range(args.repeats):
        for method in args.methods:
            order = tools_for[method] if r % 2 == 0 else tools_for[method][::-1]  # alternate who goes first
            for tool in order:
                out = args.work / f"out_{tool}_{method}"
                shutil.rmtree(out, ignore_errors=True)  # not timed, for both tools
                cmd = tools[tool] + [str(configs[method]), str(out)] + TOOL_FLAGS[tool]
                commands[method][tool] = " ".join(cmd)
                wall, rss = run_measured(cmd, env)
                runs[method][tool].append((wall, rss))
                print(f"round {r + 1}  {method:16s} {tool:13s} {wall:8.2f} s  {rss / 1e6:7.0f} MB", flush=True)

    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "repeats": args.repeats, "tool_flags": TOOL_FLAGS, "baseline": baseline,
        "methods": {},
    }
    for method, by_tool in runs.items():
        row: dict[str, object] = {"commands": commands[method], "params": PARAMS[method]}
        for tool, key in (("hf_taskarith", "ours"), ("hf_taskarith_torch", "ours_torch_engine"),
                          ("mergekit", "mergekit")):
            if tool in by_tool:
                row[f"{key}_wall_s"] = _median([w for w, _ in by_tool[tool]])
                row[f"{key}_peak_rss_mb"] = _median([m for _, m in by_tool[tool]]) / 1e6
                row[f"{key}_peak_rss_max_mb"] = max(m for _, m in by_tool[tool]) / 1e6
                row[f"{key}_runs"] = [{"wall_s": w, "peak_rss_mb": m / 1e6} for w, m in by_tool[tool]]
        if "mergekit" in by_tool:
            row["time_ratio"] = row["ours_wall_s"] / row["mergekit_wall_s"]
            row["rss_ratio"] = row["ours_peak_rss_mb"] / row["mergekit_peak_rss_mb"]
            if "ours_torch_engine_wall_s" in row:
                row["torch_engine_time_ratio"] = row["ours_torch_engine_wall_s"] / row["mergekit_wall_s"]
            row["vs_mergekit"] = compare(method, args.work / f"out_hf_taskarith_{method}",
                                         args.work / f"out_mergekit_{method}", folders)
        case = CASES[method]
        rss_limit = case.peak_rss_bytes or row.get("mergekit_peak_rss_mb", float("nan")) * 1e6
        row["targets"] = {"time_ratio": case.time_ratio, "ours_peak_rss_bytes": rss_limit}
        row["meets_targets"] = {
            "time_ratio": row.get("time_ratio", float("nan")) <= case.time_ratio,
            "ours_peak_rss": row["ours_peak_rss_max_mb"] * 1e6 <= rss_limit,
        }
        summary["methods"][method] = row

    print(f"\nmedians of {args.repeats} interleaved runs per tool (load average before/after: "
          f"{load_before[0]:.1f} / {summary['machine']['loadavg_after'][0]:.1f} on {os.cpu_count()} CPUs)")
    head = (f"{'method':16s} {'ours s':>8s} {'mergekit s':>10s} {'time ratio':>10s} {'ours MB':>8s} "
            f"{'mergekit MB':>11s} {'RSS ratio':>9s}")
    print(head + "\n" + "-" * len(head))
    nan = float("nan")
    for method, row in summary["methods"].items():
        print(f"{method:16s} {row['ours_wall_s']:8.2f} {row.get('mergekit_wall_s', nan):10.2f} "
              f"{row.get('time_ratio', nan):10.3f} {row['ours_peak_rss_mb']:8.0f} "
              f"{row.get('mergekit_peak_rss_mb', nan):11.0f} {row.get('rss_ratio', nan):9.3f}")
    for method, row in summary["methods"].items():
        if "ours_torch_engine_wall_s" in row:
            print(f"{method}: torch-free path {row['ours_wall_s']:.2f} s; the same CLI on the torch engine "
                  f"(--no-fast-path) {row['ours_torch_engine_wall_s']:.2f} s = "
                  f"{row.get('torch_engine_time_ratio', nan):.3f}x mergekit")
    print("\ntargets: time ratio <= 0.25 and our peak RSS <= 1.2 GB (task_arithmetic, ties); "
          "time ratio <= 0.5 and peak RSS <= mergekit's (the others)")
    for method, row in summary["methods"].items():
        check = row.get("vs_mergekit")
        same = ""
        if check:
            same = (f"; vs mergekit on {check['tensors_checked']} tensors: {100 * check['fraction_equal']:.2f}% of "
                    f"entries equal, max diff {check['max_diff_bf16_ulps']:.1f} bf16 ulp of the inputs' scale "
                    f"({100 * check['fraction_beyond_3_ulps']:.3f}% beyond 3 ulp)")
            if "hf_taskarith_max_ulps_from_exact" in check:
                same += (f"; from the exact result: ours {check['hf_taskarith_max_ulps_from_exact']:.2f} ulp, "
                         f"mergekit {check['mergekit_max_ulps_from_exact']:.2f} ulp")
        print(f"  {method}: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in row["meets_targets"].items())
              + same)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
