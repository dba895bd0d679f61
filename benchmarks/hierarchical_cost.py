"""Cost per attention layer of the ``hierarchical`` merge's head alignment.

For one layer and one input model, with random float32 weights of a 7B-class layer
(``--heads 32 --kv-heads 8 --head-dim 128 --hidden 4096``), times separately:

* ``similarities``: the head-similarity matrices of q, k, v and o
  (:func:`hf_taskarith.merging.alignment.head_scores`), ``2 H^2 d D + 2 KV^2 d D`` multiply-adds;
* ``assignment``: the hierarchical Hungarian matching
  (:func:`hf_taskarith.merging.alignment.match_heads`): ``KV^2`` assignments of size ``H / KV``
  and one of size ``KV``;
* ``permute``: applying the permutation to the four weight matrices (``index_select``), as the
  merge does.

Times are medians over ``--repeats`` runs after one warm-up; the reading of the tensors from
disk, which the pre-pass adds on top, is not included. Also checks that the permutation
applied to the input is found back.

Usage::

    python benchmarks/hierarchical_cost.py                      # GQA 32/8, d 128, hidden 4096
    python benchmarks/hierarchical_cost.py --kv-heads 32        # multi-head attention
    python benchmarks/hierarchical_cost.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_taskarith.merging.alignment import head_index, head_scores, match_heads


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, kv, d, hidden = args.heads, args.kv_heads, args.head_dim, args.hidden
    gen = torch.Generator().manual_seed(0)
    ref = {"q": torch.randn(h * d, hidden, generator=gen), "k": torch.randn(kv * d, hidden, generator=gen),
           "v": torch.randn(kv * d, hidden, generator=gen), "o": torch.randn(hidden, h * d, generator=gen)}
    group = h // kv
    kv_perm = torch.randperm(kv, generator=gen)
    q_perm = torch.cat([int(kv_perm[g]) * group + torch.randperm(group, generator=gen) for g in range(kv)])
    qi, ki = head_index(q_perm, d), head_index(kv_perm, d)
    model = {"q": ref["q"][qi], "k": ref["k"][ki], "v": ref["v"][ki], "o": ref["o"][:, qi]}

    def similarities():
        query = head_scores(ref["q"], model["q"], heads=h, dim=0) + head_scores(ref["o"], model["o"], heads=h, dim=1)
        key_value = (head_scores(ref["k"], model["k"], heads=kv, dim=0)
                     + head_scores(ref["v"], model["v"], heads=kv, dim=0))
        return query, key_value

    scores = similarities()
    found = match_heads(*scores)
    assert torch.equal(found[0], torch.argsort(q_perm)) and torch.equal(found[1], torch.argsort(kv_perm))
    fq, fk = head_index(found[0], d), head_index(found[1], d)

    def permute():
        return (model["q"].index_select(0, fq), model["k"].index_select(0, fk), model["v"].index_select(0, fk),
                model["o"].index_select(1, fq))

    result = {
        "heads": h, "kv_heads": kv, "head_dim": d, "hidden": hidden, "threads": torch.get_num_threads(),
        "similarities_s": _median_time(similarities, args.repeats),
        "assignment_s": _median_time(lambda: match_heads(*scores), args.repeats),
        "permute_s": _median_time(permute, args.repeats),
        "gmac_similarities": (2 * h * h + 2 * kv * kv) * d * hidden / 1e9,
        "permutation_recovered": True,
    }
    for key in ("similarities_s", "assignment_s", "permute_s"):
        print(f"{key:>16}: {result[key] * 1e3:9.3f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
