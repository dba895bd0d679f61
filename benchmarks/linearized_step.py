"""Training-step time and peak memory of LinearizedModel against two baselines.

Variants (each a full step: forward, loss, backward, AdamW step, zero_grad):

* ``ordinary``: ordinary fine-tuning of the same model (the speed we compare against).
* ``naive``: the usual tangent-space wrapper (Ortiz-Jimenez et al. 2023): trainable ``theta``
  and frozen ``theta0``; each step forms ``theta - theta0`` and calls ``torch.func.jvp`` over
  ``functional_call``, with attention on SDPA's math backend.
* ``ours``: :class:`hf_taskarith.linearize.LinearizedModel` (``engine="dual"``).
* ``ours_jvp``: ``LinearizedModel(engine="jvp")``, torch.func.jvp with our parameterization
  (shown for reference).
* with ``--compiled``: ``ordinary_compiled``, ``naive_compiled`` and ``ours_compiled``, the same
  under ``torch.compile`` (inductor, default options; compilation is in the warm-up, not timed).

Times are medians over interleaved rounds (variants alternate within each round, so load
from other processes hits all of them alike). On a busy shared machine use
``--threads 1 --clock cpu``: process CPU time is far less sensitive to other processes. Peak
memory is each variant's peak resident set size in a fresh subprocess, minus the size after imports.

Usage::

    python benchmarks/linearized_step.py                 # small ViT, batch 16, image 64, patch 8
    python benchmarks/linearized_step.py --dtype bf16    # bf16 autocast over float32 weights
    python benchmarks/linearized_step.py --device cuda --dtype bf16 --model vit-b16 --compiled
    python benchmarks/linearized_step.py --compiled --threads 4 # CPU: compiled rows too
    python benchmarks/linearized_step.py --device cuda --dtype bf16 --model llama   # seq 2048, GQA, RoPE
    python benchmarks/linearized_step.py --model bert    # MiniLM-sized BERT, batch 16 x 64
    python benchmarks/linearized_step.py --rounds 9 --batch 32 --seq 64 --attn sdpa
    python benchmarks/linearized_step.py --threads 1 --clock cpu   # shared / noisy machine

Prints one line per variant and the ratios against the baselines
(ours/naive time, ours/ordinary time, ours/ordinary peak memory), the forward and backward
times of ordinary and ours measured separately (where the step ratio comes from: three
matmuls per linear layer in a linearized forward against one, two in either backward), then
a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("ordinary", "naive", "ours", "ours_jvp")


def build_bert(attn: str):
    """MiniLM-sized BERT classifier (6 layers, hidden 384, vocab 30,522)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     vocab_size=30522, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation=attn)
    return BertForSequenceClassification(cfg).eval()


def _vit(attn: str, *, hidden: int, layers: int, heads: int, image: int, patch: int, labels: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * hidden, image_size=image, patch_size=patch, num_labels=labels,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return ViTForImageClassification(cfg).eval()


def build_vit(attn: str):
    """A small ViT classifier: hidden 192, 6 layers, 3 heads, image 64, patch 8."""
    return _vit(attn, hidden=192, layers=6, heads=3, image=64, patch=8, labels=4)


def bert_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 4, (batch,), generator=g)}


def vit_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=g),
            "labels": torch.randint(0, 4, (batch,), generator=g)}


def build_vit_b16(attn: str):
    """ViT-B/16-sized: hidden 768, 12 layers, 12 heads, 224 px, patch 16 (GPU sizes)."""
    return _vit(attn, hidden=768, layers=12, heads=12, image=224, patch=16, labels=10)


def vit_b16_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=g),
            "labels": torch.randint(0, 10, (batch,), generator=g)}


def build_bert_base(attn: str):
    """BERT-base-sized classifier: hidden 768, 12 layers, 12 heads."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return BertForSequenceClassification(cfg).eval()


def build_gpt2(attn: str):
    """GPT-2-small-sized causal LM (tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval()


def build_llama(attn: str):
    """SmolLM2-135M-shaped Llama: RoPE, RMSNorm, SiLU, GQA (9 query / 3 key-value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                      tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def lm_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


#: --model -> (builder, batch maker, default batch, default sequence length)
MODELS = {"vit": (build_vit, vit_batch, 16, 64), "bert": (build_bert, bert_batch, 16, 64),
          "vit-b16": (build_vit_b16, vit_b16_batch, 64, 197), "bert-base": (build_bert_base, bert_batch, 32, 128),
          "gpt2": (build_gpt2, lm_batch, 8, 256), "llama": (build_llama, lm_batch, 1, 2048)}
MODEL = "vit"
DEVICE = torch.device("cpu")
AUTOCAST: torch.dtype | None = None


def build_model(attn: str):
    return MODELS[MODEL][0](attn).to(DEVICE)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; token-level (next-token) for causal LMs."""
    if logits.dim() == 3:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    return F.cross_entropy(logits.float(), labels)


def autocast():
    return torch.autocast(DEVICE.type, dtype=AUTOCAST, enabled=AUTOCAST is not None)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class NaiveLinearized(torch.nn.Module):
    """The common reference wrapper: theta trainable, theta0 frozen, jvp along theta - theta0."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        names = [n for n, _ in model.named_parameters()]
        self.names = names
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(p.detach().clone()) for _, p in model.named_parameters()])
        for i, (_, p) in enumerate(model.named_parameters()):
            self.register_buffer(f"theta0_{i}", p.detach().clone())
        model.requires_grad_(False)

    def forward(self, **inputs):
        from torch.func import functional_call, jvp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        theta0 = tuple(getattr(self, f"theta0_{i}") for i in range(len(self.names)))
        dparams = tuple(p - p0 for p, p0 in zip(self.params, theta0))

        def f(*params):
            return functional_call(self.model, dict(zip(self.names, params)), (), inputs).logits

        with sdpa_kernel(SDPBackend.MATH):
            out, out_t = jvp(f, theta0, dparams)
        return out + out_t


def make_step(variant: str, attn: str):
    """Returns (step_fn, model) for one variant; the step takes a batch dict."""
    model = build_model(attn)
    base = variant.removesuffix("_compiled")
    if base == "ordinary":
        net = model
    elif base == "naive":
        net = NaiveLinearized(model)
    else:
        from hf_taskarith.linearize import LinearizedModel

        net = LinearizedModel(model, engine="dual" if base == "ours" else "jvp", copy_model=False)
        net.train()  # the wrapper's mode; the linearization point stays in eval
    run = torch.compile(net) if variant.endswith("_compiled") else net

    def logits(batch):
        out = run(**model_inputs(batch))
        return out if isinstance(out, torch.Tensor) else out.logits
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def step(batch):
        with autocast():
            loss = loss_of(logits(batch), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, net


def make_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in MODELS[MODEL][1](batch, seq).items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def time_variants(args) -> dict[str, list[float]]:
    batch = make_batch(args.batch, args.seq)
    variants = active_variants(args)
    steps = {}
    for v in variants:
        steps[v] = make_step(v, args.attn)[0]
        for _ in range(3 if v.endswith("_compiled") else 1):
            steps[v](batch)  # warm-up (allocations, first-call overheads, compilation)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for v in order:
            sync()
            t0 = clock()
            steps[v](batch)
            sync()
            times[v].append(clock() - t0)
    return times


COMPILED = ("ordinary_compiled", "naive_compiled", "ours_compiled")


def active_variants(args) -> tuple[str, ...]:
    if args.compiled:
        return VARIANTS + COMPILED
    return VARIANTS + (("naive_compiled",) if args.compiled_naive else ())


def time_phases(args) -> dict[str, dict[str, float]]:
    """Median forward (with the loss) and backward times of ``ordinary`` and ``ours``, interleaved.

    This is where the step ratio comes from: a linearized forward runs three matmuls per
    linear layer (primal ``x W0^T``, tangent ``x_t W0^T + x W_t^T``) against one, while the
    backward runs two (``g W0``, ``g^T x``), as an ordinary backward does.
    """
    batch = make_batch(args.batch, args.seq)
    inputs = model_inputs(batch)
    nets = {v: make_step(v, args.attn)[1] for v in ("ordinary", "ours")}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    out: dict[str, dict[str, list[float]]] = {v: {"forward": [], "backward": []} for v in nets}
    for r in range(args.rounds + 1):
        for v, net in nets.items():
            sync()
            t0 = clock()
            with autocast():
                loss = loss_of(net(**inputs).logits, batch["labels"])
            sync()
            t1 = clock()
            loss.backward()
            sync()
            t2 = clock()
            for prm in net.parameters():
                prm.grad = None
            if r:  # round 0 warms up
                out[v]["forward"].append(t1 - t0)
                out[v]["backward"].append(t2 - t1)
    return {v: {k: statistics.median(ts) for k, ts in d.items()} for v, d in out.items()}


def _status_mib(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak RSS of this process image; unlike ru_maxrss it is not
    inherited across exec) from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def peak_memory_child(variant: str, args) -> None:
    """Runs in a subprocess: prints the peak RSS growth (MiB) over 3 steps of one variant."""
    import transformers  # noqa: F401  (count import memory in the baseline)

    import hf_taskarith.linearize  # noqa: F401

    base = _status_mib("VmRSS")
    batch = make_batch(args.batch, args.seq)
    step, _ = make_step(variant, args.attn)
    for _ in range(3):
        step(batch)
    peak = _status_mib("VmHWM")
    print(json.dumps({"variant": variant, "peak_mib": peak - base}))


def peak_memory(variant: str, args) -> float:
    if DEVICE.type == "cuda":  # CUDA max allocated over 3 steps, in this process
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step, net = make_step(variant, args.attn)
        batch = make_batch(args.batch, args.seq)
        for _ in range(3):
            step(batch)
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del step, net
        return peak
    cmd = [sys.executable, __file__, "--child-memory", variant, "--model", MODEL, "--batch", str(args.batch),
           "--seq", str(args.seq), "--attn", args.attn, "--dtype", args.dtype] + \
        (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="vit",
                   help="vit: small ViT (hidden 192, 6 layers, image 64, patch 8); bert: MiniLM-sized BERT; "
                        "vit-b16, bert-base, gpt2, llama (SmolLM2-135M-shaped, seq 2048): GPU sizes")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=None, help="default: the model's (see MODELS)")
    p.add_argument("--seq", type=int, default=None, help="default: the model's (see MODELS)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16/fp16: autocast over float32 weights, as TrainingArguments(bf16=True) does")
    p.add_argument("--compiled-naive", action="store_true",
                   help="add the naive wrapper under torch.compile (inductor) as a row")
    p.add_argument("--compiled", action="store_true",
                   help="also time ordinary, naive and ours under torch.compile (inductor); ours compiled "
                        "traces the torch.func.jvp formulation in one graph")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, robust on a shared machine (use with --threads 1)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--child-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    global MODEL, DEVICE, AUTOCAST
    MODEL = args.model
    DEVICE = torch.device(args.device)
    AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    args.batch = args.batch or MODELS[MODEL][2]
    args.seq = args.seq or MODELS[MODEL][3]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # AdamW moments of rarely used embedding rows get tiny
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.child_memory:
        peak_memory_child(args.child_memory, args)
        return

    times = time_variants(args)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v in times:
        print(f"{v:9s} step median {med[v] * 1000:8.1f} ms  (rounds: {', '.join(f'{t * 1000:.0f}' for t in times[v])})")
    phases = time_phases(args)
    for v, d in phases.items():
        print(f"{v:9s} forward+loss {d['forward'] * 1000:7.1f} ms, backward {d['backward'] * 1000:7.1f} ms")
    mem = {} if args.no_memory else {v: peak_memory(v, args) for v in ("ordinary", "naive", "ours")}
    what = "peak CUDA allocated" if DEVICE.type == "cuda" else "peak RSS growth"
    for v, m in mem.items():
        print(f"{v:9s} {what} {m:8.1f} MiB")
    ratios = {"ours/naive time": med["ours"] / med["naive"], "ours/ordinary time": med["ours"] / med["ordinary"],
              "ours_jvp/naive time": med["ours_jvp"] / med["naive"],
              "ours/ordinary forward": phases["ours"]["forward"] / phases["ordinary"]["forward"],
              "ours/ordinary backward": phases["ours"]["backward"] / phases["ordinary"]["backward"]}
    if "naive_compiled" in med:
        ratios["ours/naive_compiled time"] = med["ours"] / med["naive_compiled"]
        ratios["naive_compiled/ordinary time"] = med["naive_compiled"] / med["ordinary"]
    if "ours_compiled" in med:
        ratios["ours_compiled/ordinary time"] = med["ours_compiled"] / med["ordinary"]
        ratios["ours_compiled/ordinary_compiled"] = med["ours_compiled"] / med["ordinary_compiled"]
        ratios["ours_compiled/naive_compiled"] = med["ours_compiled"] / med["naive_compiled"]
        ratios["ours_compiled/naive time"] = med["ours_compiled"] / med["naive"]
    if mem:
        ratios["ours/ordinary peak memory"] = mem["ours"] / mem["ordinary"]
        ratios["naive/ordinary peak memory"] = mem["naive"] / mem["ordinary"]
    for k, v in ratios.items():
        print(f"{k:28s} {v:.2f}x")
    print(json.dumps({"config": vars(args) | {"torch_threads": torch.get_num_threads()},
                      "median_s": med, "phases_s": phases, "peak_mib": mem, "ratios": ratios}))


if __name__ == "__main__":
    main()
