"""Sharing task vectors through a Hub, offline: push versions, list them, pull by tag, check, apply.

Everything runs on this machine in a few seconds: a tiny BERT built from a config, two
versions of one task vector, and the embedded Hub server (``embedded_hub``), which the stock
``huggingface_hub`` client talks to over HTTP on 127.0.0.1, exactly as it would talk to
huggingface.co.

    python examples/hub_sharing/hub_sharing.py                  # work in a temporary folder
    python examples/hub_sharing/hub_sharing.py --workdir DIR    # keep base/, tv_v1/, tv_v2/ for the CLI walkthrough

The "fine-tuning" here is a stand-in: each version adds a rank-2 update to every weight
matrix (and small noise to the other tensors), so the script needs no data and no training.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from pathlib import Path

import torch
from huggingface_hub.utils import disable_progress_bars
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from hf_taskarith import (
    ConcurrentPushError,
    HubError,
    IncompatibleBaseError,
    TaskVector,
    check_compatibility,
    list_task_vector_versions,
    pull_task_vector,
    push_task_vector,
)
from hf_taskarith.hub.server import embedded_hub

REPO = "team/tiny-bert-sentiment"
BASE_ID = "example/tiny-bert"  # recorded in the vectors' metadata and in the model card


def tiny_bert(seed: int, intermediate_size: int = 37) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=intermediate_size, vocab_size=100)
    return BertModel(cfg).eval()


@torch.no_grad()
def fake_finetune(model: BertModel, seed: int, scale: float = 0.02) -> BertModel:
    """A copy of ``model`` with a rank-2 update on every matrix and small noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for p in out.parameters():
        if p.dim() == 2 and min(p.shape) > 2:
            u, v = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
            p.add_(scale * (u @ v) / 2)
        else:
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max()) for k, v in a.state_dict().items()
               if v.is_floating_point())


def max_vector_diff(a: TaskVector, b: TaskVector) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hub-sharing-"))
    work.mkdir(parents=True, exist_ok=True)
    disable_progress_bars()  # huggingface_hub's upload/download bars
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards"
    logging.basicConfig(format="  [log] %(levelname)s %(name)s: %(message)s")

    # 1. A base model and two versions of a task vector -----------------------------------
    base = tiny_bert(seed=0)
    base.save_pretrained(work / "base")  # a checkpoint folder, for the CLI walkthrough
    ft_v1 = fake_finetune(base, seed=1)
    ft_v2 = fake_finetune(ft_v1, seed=2)  # "trained longer": v1's update plus another one
    tv_v1 = TaskVector.from_models(base, ft_v1, base_model=BASE_ID)
    tv_v2 = TaskVector.from_models(base, ft_v2, base_model=BASE_ID)
    for tv, steps in ((tv_v1, 100), (tv_v2, 200)):  # shown in the model card
        tv.metadata.extra.update(training={"steps": steps, "learning_rate": 1e-4},
                                 metrics={"accuracy": 0.81 if steps == 100 else 0.86})
    tv_v1.save_pretrained(work / "tv_v1", overwrite=True)
    tv_v2.save_pretrained(work / "tv_v2", overwrite=True)
    print(f"base: tiny BERT, {sum(p.numel() for p in base.parameters()):,} parameters, "
          f"fingerprint {tv_v1.metadata.base_fingerprint}")
    print(f"task vectors: v1 |tv| = {tv_v1.norm():.3f}, v2 |tv| = {tv_v2.norm():.3f} ({len(tv_v1)} tensors)")

    with embedded_hub(work / "hub") as url:
        print(f"\nembedded Hub at {url} (repos stored as git repositories under {work / 'hub'})")

        # 2. Push: one commit per version, tagged --------------------------------------------
        r1 = push_task_vector(tv_v1, REPO, tag="v1", endpoint=url)
        small = tv_v2.compress("lowrank", rank=4)
        st = small.metadata.extra["compression"]
        print(f"v2 compressed with lowrank rank 4: {st['size_ratio']:.1f}x smaller than float32, "
              f"relative error {st['relative_error']:.2e}")
        r2 = push_task_vector(small, REPO, tag="v2", endpoint=url)
        print(f"pushed {REPO}: v1 -> commit {r1.commit_sha[:12]}, v2 -> commit {r2.commit_sha[:12]} "
              f"(branch {r2.branch})")

        # 3. What the Hub refuses ----------------------------------------------------------------
        try:
            push_task_vector(tv_v2, REPO, tag="v1", endpoint=url)
        except HubError as e:
            print(f"refused, tag exists: {type(e).__name__}: {e}")
        try:  # as if another push (v2) had landed while we were still working from v1
            push_task_vector(tv_v2, REPO, parent_commit=r1.commit_sha, endpoint=url)
        except ConcurrentPushError as e:
            print(f"refused, stale parent: {type(e).__name__}: {str(e)[:110]}...")

        # 4. List versions ---------------------------------------------------------------------
        print("\nversions (newest first):")
        for v in list_task_vector_versions(REPO, endpoint=url):
            print(f"  {v.kind:6s} {v.name:6s} {v.commit_sha[:12]}  {v.title}")

        # 5. Pull by tag; the resolved commit is recorded --------------------------------------
        cache = work / "hf-cache"  # keep the example's downloads out of ~/.cache/huggingface
        got_v1 = pull_task_vector(REPO, revision="v1", endpoint=url, cache_dir=cache)
        got_v2 = pull_task_vector(REPO, revision="v2", endpoint=url, cache_dir=cache)
        print(f"\npulled v1: metadata.extra['hub'] = {got_v1.metadata.extra['hub']}")
        print(f"  identical to what was pushed: {max_vector_diff(got_v1, tv_v1) == 0.0}; "
              f"compressed: {got_v1.compressed}")
        print(f"pulled v2: commit {got_v2.metadata.extra['hub']['commit_sha'][:12]}, compressed: {got_v2.compressed} "
              f"(decoded on access), method {got_v2.metadata.extra['compression']['method']}")
        print(f"  max |pulled v2 - uncompressed v2| = {max_vector_diff(got_v2, tv_v2):.1e}")
        card = next(cache.rglob("README.md")).read_text()
        front = [line for line in card.splitlines()[1:12] if line.startswith(("base_model:", "library_name:"))]
        print("  model card (README.md) front matter: " + ", ".join(front))

    # 6. Compatibility: a different base is refused, unless you opt in ------------------------
    other = tiny_bert(seed=3, intermediate_size=48)  # another init and a wider feed-forward
    report = check_compatibility(got_v2, other)
    print(f"\nother base: compatible = {report.compatible}: fingerprint {report.fingerprint_found} != "
          f"{report.fingerprint_expected}; {len(report.applied)} tensors fit, {len(report.shape_mismatch)} have "
          f"other shapes, e.g. {report.shape_mismatch[0]}")
    try:
        got_v2.apply_to(other)
    except IncompatibleBaseError as e:
        print(f"apply_to(other): refused with {type(e).__name__} (a ValueError)")
    rep = got_v2.apply_to(other, allow_mismatch=True).hf_taskarith_apply_report  # a new model
    print(f"apply_to(other, allow_mismatch=True): applied {len(rep.applied)}, skipped {len(rep.skipped)}: "
          f"{', '.join(rep.skipped[:3])}, ...")

    # 7. Apply to the right base -------------------------------------------------------------
    edited = got_v1.apply_to(base)  # a new model; base is unchanged
    print(f"\nbase + pulled v1: max |weights - fine-tuned v1| = {max_weight_diff(edited, ft_v1):.1e}")
    edited = got_v2.apply_to(base)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, want = edited(input_ids=ids).last_hidden_state, ft_v2(input_ids=ids).last_hidden_state
    print(f"base + pulled v2 (compressed): max |weights - fine-tuned v2| = {max_weight_diff(edited, ft_v2):.1e}, "
          f"max |hidden states - fine-tuned v2's| = {float((out - want).abs().max()):.1e}")
    print(f"\nfiles in {work}: base/, tv_v1/, tv_v2/ (for the CLI walkthrough), hub/, hf-cache/")


if __name__ == "__main__":
    main()
