"""Task vectors, start to finish: extract, do algebra, save/load, apply, and measure.

Runs offline in seconds on a tiny BERT built from a config and two synthetic tasks, or in
about two minutes on the real all-MiniLM-L6-v2 with real data (``--minilm``; needs the
assets from ``scripts/setup.sh``).

    python examples/task_vectors/task_vectors.py            # tiny BERT, synthetic tasks
    python examples/task_vectors/task_vectors.py --minilm   # real MiniLM, SMS spam + movie sentiment
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/task_vectors/task_vectors.py

Fine-tuning runs ``LinearizedTrainer`` in ordinary mode (``mode="nonlinear"``) on each task's
``datasets.Dataset``; accuracies come from the ``evaluate`` accuracy module shipped with the
package. Under ``accelerate launch`` (above: two CPU processes, gloo; on GPUs drop
``ACCELERATE_USE_CPU=1``; note that ``accelerate launch --cpu`` always starts one process) every
process trains (gradients are averaged, so the
global batch is the per-process batch times the number of processes); the main process
writes the files and prints.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from hf_taskarith import TaskVector, merge
from hf_taskarith.evaluation.task_accuracy import evaluate_tasks
from hf_taskarith.training.encoders import (
    load_encoder,
    load_tokenizer,
    quiet_transformers,
)
from hf_taskarith.training.frozen_head import train_encoder
from hf_taskarith.training.heads import task_heads
from hf_taskarith.training.tasks import RawTask, load_task, split_task

WORDS = {"mood": (("great", "lovely", "superb"), ("awful", "boring", "dreadful")),
         "topic": (("goal", "match", "team"), ("pasta", "bread", "soup"))}
FILLER = ("the", "a", "it", "was", "and", "this", "so", "really")


def tiny_setup(folder: Path, *, write: bool = True):
    """A 2-layer BERT (hidden 32) saved with a word-level tokenizer (when ``write``), and two synthetic tasks."""
    from transformers import BertConfig, BertModel, BertTokenizer

    if write:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for p, n in WORDS.values() for w in p + n)]
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
        with quiet_transformers():
            BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    tasks = []
    for seed, (name, (pos, neg)) in enumerate(WORDS.items()):
        rng = random.Random(seed)
        texts = [" ".join(rng.sample(FILLER, 4) + [rng.choice((neg, pos)[i % 2])]) for i in range(200)]
        raw = RawTask(texts, [i % 2 for i in range(200)], ("a", "b"), "synthetic")
        tasks.append(split_task(name, raw, train_size=120, val_size=20, test_size=60))
    return tasks, dict(steps=30, learning_rate=1e-3, batch_size=16), "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", action="store_true", help="real all-MiniLM-L6-v2 and real data")
    parser.add_argument("--workdir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    # one process, or one per process under `accelerate launch` (gloo on CPU with ACCELERATE_USE_CPU=1)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    print = state.print  # noqa: A001  (the main process prints)
    work = [args.workdir or (tempfile.mkdtemp(prefix="tv-example-") if state.is_main_process else None)]
    work = Path(broadcast_object_list(work)[0] if state.num_processes > 1 else work[0])

    if args.minilm:
        from hf_taskarith.training.assets import minilm_path

        base_dir = minilm_path()
        tasks = [load_task(n, train_size=480, val_size=32, test_size=200) for n in ("sms_spam", "movie_sentiment")]
        train_kw, head_kind = dict(steps=25, learning_rate=5e-5, batch_size=32), "probe"
    else:
        base_dir = work / "tiny-bert"
        with state.main_process_first():  # the main process writes the tiny model, the others read it
            tasks, train_kw, head_kind = tiny_setup(base_dir, write=state.is_main_process)

    base, tok = load_encoder(base_dir), load_tokenizer(base_dir)
    # the encoder as a checkpoint folder, exactly as loaded (MiniLM's folder also holds an unused
    # pooler, so its weight fingerprint differs from the encoder's): streamed edits start from it
    if state.is_main_process:
        with quiet_transformers():
            base.save_pretrained(work / "base")
        tok.save_pretrained(work / "base")
    # closed-vocabulary setting: each task has a fixed head, only the encoder is fine-tuned
    heads = task_heads(head_kind, base, tok, tasks, generator=torch.Generator().manual_seed(0))

    def accuracies(model) -> str:
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in evaluate_tasks(model, heads, tok, tasks).items())

    print(f"pre-trained:            {accuracies(base)}")

    # 1. extract: fine-tune a copy per task (LinearizedTrainer, mode="nonlinear", on a
    #    datasets.Dataset), then  tv = fine-tuned - pre-trained
    tvs = {}
    for i, t in enumerate(tasks):
        ft = copy.deepcopy(base)
        fit = train_encoder(ft, heads[t.name], tok, t.dataset("train"), mode="nonlinear", seed=i, progress=False,
                            **train_kw)
        world = fit.task_vector.metadata.extra["training"]["world_size"]
        tvs[t.name] = TaskVector.from_models(base, ft, base_model=str(base_dir))
        print(f"fine-tuned on {t.name:9s} {accuracies(ft)}   (|tv| = {tvs[t.name].norm():.3f}, "
              f"{world} process{'es' if world > 1 else ''})")
    a, b = (tvs[t.name] for t in tasks)

    # 2. algebra: +, -, unary -, scalar *, sum(); norms and cosine similarity
    both = 0.8 * (a + b)
    print(f"cosine(a, b) = {a.cosine_similarity(b):+.3f};  |a + b| = {(a + b).norm():.3f};  "
          f"|a - b| = {(a - b).norm():.3f};  "
          f"sum([a, b]) == a + b: {torch.equal(sum([a, b])[next(iter(a))], (a + b)[next(iter(a))])}")

    # 3. save / load: safetensors + a JSON config that pins the base (id and weight fingerprint)
    if state.is_main_process:
        both.save_pretrained(work / "tv-both", overwrite=True)
    state.wait_for_everyone()
    loaded = TaskVector.from_pretrained(work / "tv-both")  # lazy: tensors are read on access
    print(f"saved and reloaded: {loaded}  (fingerprint {loaded.metadata.base_fingerprint})")

    # 4. apply: to a module (a new model; inplace=True edits base itself) or to a checkpoint folder
    multi = loaded.apply_to(base)
    print(f"base + 0.8 (a + b):     {accuracies(multi)}")
    forget = a.apply_to(base, scaling=-1.0)
    print(f"base - a (negation):    {accuracies(forget)}")

    # the same edit on checkpoints, through the streaming merge engine (folders in, folder out)
    if state.is_main_process:
        out = merge(work / "base", [work / "tv-both"], method="task_arithmetic", weights=[1.0],
                    output_dir=work / "edited", overwrite=True, progress=False)
        print(f"checkpoint edit -> {out}: {accuracies(load_encoder(out))}")

    # a task vector refuses a base with another fingerprint (strict by default)
    other = copy.deepcopy(base)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    try:
        a.apply_to(other)
    except ValueError as e:  # IncompatibleBaseError is also a ValueError
        print(f"refused a different base: {type(e).__name__}")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
