"""Make the checkpoints the YAML files in this folder merge (offline, seconds).

Writes under ``models/`` (next to this file):

- ``base/``: a tiny BERT built from a config (2 layers, hidden 32) with a word-level tokenizer,
  or the real all-MiniLM-L6-v2 with ``--minilm``;
- ``ft_a/``, ``ft_b/``: the base fine-tuned on task A and task B (synthetic word tasks, or
  SMS spam and movie sentiment with ``--minilm``), the task's head kept frozen, with
  ``LinearizedTrainer`` in ordinary mode (``mode="nonlinear"``) on a ``datasets.Dataset``;
- ``tv_b/``: task B's task vector, saved with ``TaskVector.save_pretrained``;
- ``heads/`` and ``tasks.json``: the frozen heads and test data, for ``score.py``.

    python examples/merge_yaml/prepare_models.py [--minilm]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import torch

from hf_taskarith import TaskVector
from hf_taskarith.training.encoders import (
    load_encoder,
    load_tokenizer,
    quiet_transformers,
)
from hf_taskarith.training.frozen_head import train_encoder
from hf_taskarith.training.heads import save_heads, task_heads
from hf_taskarith.training.tasks import RawTask, load_task, split_task

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
WORDS = {"a": (("great", "lovely", "superb"), ("awful", "boring", "dreadful")),
         "b": (("goal", "match", "team"), ("pasta", "bread", "soup"))}
FILLER = ("the", "a", "it", "was", "and", "this", "so", "really")


def tiny_base(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for p, n in WORDS.values() for w in p + n)]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    with quiet_transformers():
        BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)


def tiny_tasks():
    tasks = []
    for seed, (name, (pos, neg)) in enumerate(WORDS.items()):
        rng = random.Random(seed)
        texts = [" ".join(rng.sample(FILLER, 4) + [rng.choice((neg, pos)[i % 2])]) for i in range(200)]
        tasks.append(split_task(name, RawTask(texts, [i % 2 for i in range(200)], ("neg", "pos")),
                                train_size=120, val_size=20, test_size=60))
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", action="store_true", help="real MiniLM and real data (about a minute)")
    args = parser.parse_args()
    MODELS.mkdir(exist_ok=True)
    if args.minilm:
        from hf_taskarith.training.assets import minilm_path

        source = minilm_path()
        tasks = [load_task(n, train_size=384, val_size=32, test_size=200) for n in ("sms_spam", "movie_sentiment")]
        train_kw, head_kind = dict(steps=20, learning_rate=5e-5, batch_size=32), "probe"
    else:
        source = MODELS / "tiny-bert"
        tiny_base(source)
        tasks, train_kw, head_kind = tiny_tasks(), dict(steps=30, learning_rate=1e-3, batch_size=16), "random"

    base, tok = load_encoder(source), load_tokenizer(source)
    with quiet_transformers():  # base/ without MiniLM's unused pooler, so every checkpoint has the same keys
        base.save_pretrained(MODELS / "base")
    tok.save_pretrained(MODELS / "base")
    heads = task_heads(head_kind, base, tok, tasks, generator=torch.Generator().manual_seed(0))
    save_heads(heads, {t.name: t.label_names for t in tasks}, MODELS / "heads")
    for i, (t, slot) in enumerate(zip(tasks, ("a", "b"))):
        ft = copy.deepcopy(base)
        train_encoder(ft, heads[t.name], tok, t.dataset("train"), mode="nonlinear", seed=i, progress=False, **train_kw)
        with quiet_transformers():
            ft.save_pretrained(MODELS / f"ft_{slot}")
        tok.save_pretrained(MODELS / f"ft_{slot}")
        if slot == "b":
            TaskVector.from_models(base, ft, base_model="models/base").save_pretrained(MODELS / "tv_b", overwrite=True)
    (MODELS / "tasks.json").write_text(json.dumps(
        {t.name: {"texts": list(t.test.texts), "labels": list(t.test.labels)} for t in tasks}))
    print(f"wrote {', '.join(sorted(p.name for p in MODELS.iterdir()))} under {MODELS}")


if __name__ == "__main__":
    main()
