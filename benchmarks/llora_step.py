"""Training-step time of L-LoRA against peft's standard LoRA of the same rank.

Variants (each a full step: forward, loss, backward, AdamW step, zero_grad), same model, same
batch, same rank and targets:

* ``lora``: ``peft.LoraConfig`` (the baseline).
* ``llora_model``: ``LinearizedLoraConfig(linearization="model")``, the paper's partial
  linearization (tangent carried through the network by forward-mode AD).
* ``llora_layer``: ``LinearizedLoraConfig(linearization="layer")``, only the LoRA branch
  linearized (closed form, plain matmuls).

The models, batches, devices and dtypes are those of ``benchmarks/linearized_step.py``
(``--model vit|bert|vit-b16|bert-base|llama``; GPT-2's Conv1D layers are not adapted by L-LoRA;
bf16/fp16 are autocast over float32 weights, as ``TrainingArguments(bf16=True)`` does). The
matmul floor of ``llora_model`` is 1.5x a LoRA step: the frozen layers run a primal and a
tangent product in the forward.

Times are medians over interleaved rounds (``lora, llora_model, llora_layer, ...``, the order
reversed every other round) in one process, so load from other processes hits all alike. Prints
one line per variant, the ratios to LoRA, trainable parameters, adapter file sizes and (on CUDA)
the peak memory of a step, then a JSON summary.

Usage::

    python benchmarks/llora_step.py                       # MiniLM-sized BERT, batch 16 x 64
    python benchmarks/llora_step.py --model llama --batch 1 --seq 256
    python benchmarks/llora_step.py --device cuda --dtype bf16 --model bert-base
    python benchmarks/llora_step.py --rounds 21 --clock cpu --threads 1   # noisy shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linearized_step as shared  # noqa: E402  (the model builders, batches, device and dtype)

VARIANTS = ("lora", "llora_model", "llora_layer")
#: --model -> LoRA target modules (attention query and value projections)
#: (GPT-2 is absent: its attention is transformers' Conv1D, which L-LoRA does not adapt yet.)
TARGETS = {"vit": "query,value", "vit-b16": "query,value", "bert": "query,value", "bert-base": "query,value",
           "llama": "q_proj,v_proj"}


def make_model(variant: str, args):
    import peft

    from hf_taskarith.adapters import LinearizedLoraConfig

    targets = args.targets.split(",")
    if variant == "lora":
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, lora_dropout=0.0)
    else:
        config = LinearizedLoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                                      linearization=variant.split("_")[1], init_seed=0)
    return peft.get_peft_model(shared.build_model(args.attn), config)


def make_step(model, lr: float = 1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(batch):
        with shared.autocast():
            out = model(**shared.model_inputs(batch))
            loss = shared.loss_of(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def adapter_file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))


def timed_rounds(steps, batch, rounds: int, clock) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleaved step times per variant, and each variant's peak CUDA memory over its steps (MiB)."""
    times: dict[str, list[float]] = {v: [] for v in steps}
    peaks: dict[str, float] = {}
    cuda = shared.DEVICE.type == "cuda"
    for r in range(rounds):
        for v in (tuple(steps) if r % 2 == 0 else tuple(reversed(steps))):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            shared.sync()
            t0 = clock()
            steps[v](batch)
            shared.sync()
            times[v].append(clock() - t0)
            if cuda:
                peaks[v] = max(peaks.get(v, 0.0), (torch.cuda.max_memory_allocated() - resident) / 2**20)
    return times, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(TARGETS), default="bert",
                        help="as in benchmarks/linearized_step.py (bert: MiniLM-sized; vit-b16, bert-base, "
                             "llama: GPU sizes)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=None, help="default: the model's")
    parser.add_argument("--seq", type=int, default=None, help="default: the model's")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=None, help="comma-separated module names (default: the "
                                                        "model's attention query and value projections)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="bf16/fp16: autocast over float32 weights")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    shared.MODEL = args.model
    shared.DEVICE = torch.device(args.device)
    shared.AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    args.batch = args.batch or shared.MODELS[args.model][2]
    args.seq = args.seq or shared.MODELS[args.model][3]
    args.targets = args.targets or TARGETS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    batch = shared.make_batch(args.batch, args.seq)
    models = {v: make_model(v, args) for v in VARIANTS}
    steps = {v: make_step(m) for v, m in models.items()}
    for v in VARIANTS:
        steps[v](batch)  # warm-up
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times, peaks = timed_rounds(steps, batch, args.rounds, clock)

    med = {v: statistics.median(t) for v, t in times.items()}
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()}
    sizes = {v: adapter_file_bytes(m) for v, m in models.items()}
    print(f"{args.model} on {args.device} ({args.dtype}), batch {args.batch} x {args.seq}, rank {args.rank} on "
          f"{args.targets}, attn={args.attn}, threads={torch.get_num_threads()}, {args.rounds} interleaved "
          f"rounds, {args.clock} clock")
    for v in VARIANTS:
        peak = f"   peak {peaks[v]:8.1f} MiB" if v in peaks else ""
        print(f"  {v:12s} median {med[v] * 1000:8.1f} ms/step   trainable {trainable[v]:>9,}   "
              f"adapter file {sizes[v] / 1024:8.1f} KiB{peak}")
    ratios = {f"{v}/lora time": med[v] / med["lora"] for v in VARIANTS if v != "lora"}
    if peaks:
        ratios |= {f"{v}/lora peak memory": peaks[v] / peaks["lora"] for v in VARIANTS if v != "lora"}
    for k, ratio in ratios.items():
        print(f"  {k:28s} {ratio:.2f}x")
    print(json.dumps({"median_s": med, "ratios": ratios, "peak_mib": peaks, "trainable_params": trainable,
                      "adapter_file_bytes": sizes, "args": vars(args)}))


if __name__ == "__main__":
    main()
