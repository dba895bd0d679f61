"""Training-step time of L-LoRA against peft's standard LoRA of the same rank.

Variants (each a full step: forward, loss, backward, AdamW step, zero_grad), same model, same
batch, same rank and targets:

* ``lora``: ``peft.LoraConfig`` (the baseline).
* ``llora_model``: ``LinearizedLoraConfig(linearization="model")``, the paper's partial
  linearization (tangent carried through the network by forward-mode AD).
* ``llora_layer``: ``LinearizedLoraConfig(linearization="layer")``, only the LoRA branch
  linearized (closed form, plain matmuls).

Times are medians over interleaved rounds (``lora, llora_model, llora_layer, ...``, the order
reversed every other round) in one process, so load from other processes hits all alike. Prints
one line per variant, the ratios to LoRA (target for L-LoRA: <= 1.3x), trainable parameters and
adapter file sizes, then a JSON summary.

Usage::

    python benchmarks/llora_step.py                       # BERT-ish, hidden 192, 6 layers, batch 16 x 64
    python benchmarks/llora_step.py --rounds 21 --clock cpu --threads 1   # noisy shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

VARIANTS = ("lora", "llora_model", "llora_layer")


def build_model(attn: str):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768,
                     vocab_size=30522, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation=attn)
    return BertForSequenceClassification(cfg).eval()


def make_model(variant: str, args):
    import peft

    from hf_taskarith.adapters import LinearizedLoraConfig

    targets = args.targets.split(",")
    if variant == "lora":
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, lora_dropout=0.0)
    else:
        config = LinearizedLoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                                      linearization=variant.split("_")[1], init_seed=0)
    return peft.get_peft_model(build_model(args.attn), config)


def make_step(model, lr: float = 1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def make_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 4, (batch,), generator=g)}


def adapter_file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batch = make_batch(args.batch, args.seq)
    models = {v: make_model(v, args) for v in VARIANTS}
    steps = {v: make_step(m) for v, m in models.items()}
    for v in VARIANTS:
        steps[v](batch)  # warm-up
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in (VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))):
            t0 = clock()
            steps[v](batch)
            times[v].append(clock() - t0)

    med = {v: statistics.median(t) for v, t in times.items()}
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()}
    sizes = {v: adapter_file_bytes(m) for v, m in models.items()}
    print(f"BERT hidden 192 x 6 layers, batch {args.batch} x {args.seq}, rank {args.rank} on {args.targets}, "
          f"attn={args.attn}, threads={args.threads}, {args.rounds} interleaved rounds, {args.clock} clock")
    for v in VARIANTS:
        print(f"  {v:12s} median {med[v] * 1000:8.1f} ms/step   trainable {trainable[v]:>8,}   "
              f"adapter file {sizes[v] / 1024:8.1f} KiB")
    ratios = {v: med[v] / med["lora"] for v in VARIANTS if v != "lora"}
    for v, ratio in ratios.items():
        verdict = "meets" if ratio <= 1.3 else "misses"
        print(f"  {v} / lora step time: {ratio:.2f}x ({verdict} the <= 1.3x target)")
    print(json.dumps({"median_s": med, "ratio_to_lora": ratios, "trainable_params": trainable,
                      "adapter_file_bytes": sizes, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
