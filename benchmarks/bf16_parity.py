"""Why bfloat16 TIES / breadcrumbs merges differ from mergekit's, judged against float64.

mergekit 0.1.5 merges bfloat16 checkpoints in bfloat16 (``dtype: bfloat16``): the weights
(0.3 becomes 0.30078125), the deltas ``ft - base``, the weighted deltas, the sums and the
final ``base + delta`` are each rounded to bfloat16. We compute in float32 and round once.
This script merges the same bfloat16 checkpoints with both (mergekit through its Python API,
``run_merge``; ours through ``merge_from_config``) and with a float64 reference, and explains
every entry where the two outputs differ by more than one bfloat16 ulp.

**Checkpoints.** A Llama base built from a config (``LlamaForCausalLM``'s own init: weights
``N(0, 0.02)``, norms 1), rounded to bfloat16, and three fine-tunes ``bf16(base + shared +
own_i)`` with Gaussian deltas of total std ``--delta-std`` (half of the variance shared by the
three, as fine-tunes of one base are correlated). Realistic fine-tune deltas are a few bfloat16
ulps of the weights (ulp of 0.02 is 2^-13 = 1.2e-4), so ``|delta|`` takes few distinct values
and the density cut-off falls inside a large group of *equal* magnitudes.

**float64 reference.** The method's formula in float64 on the bfloat16 inputs, with the exact
YAML weights (0.3, not 0.30078125). Sparsification keeps the ``k`` largest ``|delta|``; when
the k-th largest magnitude is shared by more entries than are still needed, the formula does
not say which to keep, so any choice is a correct float64 result. The reference of each tool
is therefore the float64 formula *with that tool's own kept set* (sign election and the rest
then follow in float64): a tool's error is what its arithmetic adds, not its tie-breaking.
Entries whose kept sets differ are counted separately (cause a).

**Causes**, for the entries differing by more than 1 ulp, first match wins:

- (a) selection: some model keeps the entry in one tool and not in the other. ``a_tied``: the
  entry's ``|delta|`` equals a cut-off magnitude (order among equal magnitudes: mergekit's
  argsort vs our lowest index first); ``a_other``: anything else (e.g. a delta mergekit rounded).
- (b) sign election: same kept sets, but the set of models agreeing with the elected sign differs
  (mergekit votes with bfloat16-rounded weighted deltas; a sum near 0 can flip).
- (c) rounding: same kept sets and same agreeing models; only arithmetic rounding differs.

ulps are bfloat16 units in the last place of the larger magnitude of the two values compared
(the output's own spacing): ``2^(floor(log2 m) - 7)``. The test suite's looser scale (the
largest input or output magnitude at the entry) is reported too (``*_input_scale``).

Usage:
    .venv/bin/python benchmarks/bf16_parity.py           # hidden 384, 2 layers, vocab 4096 (6.4M params)
    .venv/bin/python benchmarks/bf16_parity.py --delta-std 5e-4 --cases ties breadcrumbs
    .venv/bin/python benchmarks/bf16_parity.py --hidden 256 --layers 2 --vocab 2048 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "bf16_parity"
DATA_VERSION = "2"


@dataclass(frozen=True)
class Case:
    """One merge: a mergekit method and its per-model (ft1, ft2, ft3) and shared parameters."""

    method: str
    weight: tuple[float, ...]
    density: tuple[float, ...] | None = None
    gamma: tuple[float, ...] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def per_model(self, i: int) -> dict[str, float]:
        out = {"weight": self.weight[i]}
        if self.density is not None:
            out["density"] = self.density[i]
        if self.gamma is not None:
            out["gamma"] = self.gamma[i]
        return out

    @property
    def consensus(self) -> bool:
        return self.method in ("ties", "breadcrumbs_ties", "dare_ties", "della")

    @property
    def normalize(self) -> bool:
        return bool(self.shared.get("normalize", self.method == "ties"))


WEIGHTS = (0.5, 0.3, 0.2)
CASES: dict[str, Case] = {
    "task_arithmetic": Case("task_arithmetic", WEIGHTS),
    "ties": Case("ties", WEIGHTS, density=(0.5, 0.5, 0.5)),
    "ties_density_0.2": Case("ties", WEIGHTS, density=(0.2, 0.2, 0.2)),
    "breadcrumbs": Case("breadcrumbs", WEIGHTS, density=(0.9, 0.9, 0.9), gamma=(0.01, 0.01, 0.01)),
}


# -- checkpoints ----------------------------------------------------------------------
def make_checkpoints(root: Path, *, hidden: int, layers: int, vocab: int, delta_std: float,
                     seed: int = 0) -> list[Path]:
    """``root/{base,ft1,ft2,ft3}``: a bfloat16 Llama base and three fine-tunes (cached).

    Returns:
        The four folders, base first.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    names = ["base", "ft1", "ft2", "ft3"]
    folders = [root / n for n in names]
    stamp = root / "done.json"
    meta = {"version": DATA_VERSION, "hidden": hidden, "layers": layers, "vocab": vocab,
            "delta_std": delta_std, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return folders
    config = LlamaConfig(hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.02,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    base = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    del model
    g = torch.Generator().manual_seed(seed + 1)
    half = delta_std / 2 ** 0.5  # shared and own parts, half of the variance each
    shared = {k: torch.randn(v.shape, generator=g) * half for k, v in base.items()}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
    save_file(base, str(folders[0] / "model.safetensors"), metadata={"format": "pt"})
    for folder in folders[1:]:
        ft = {k: (v.float() + shared[k] + torch.randn(v.shape, generator=g) * half).to(torch.bfloat16)
              for k, v in base.items()}
        save_file(ft, str(folder / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(meta))
    return folders


def merge_yaml(case: Case, folders: list[Path]) -> str:
    cfg: dict[str, Any] = {"merge_method": case.method, "base_model": str(folders[0]),
                           "models": [{"model": str(f), "parameters": case.per_model(i)}
                                      for i, f in enumerate(folders[1:])],
                           "dtype": "bfloat16"}
    if case.shared:
        cfg["parameters"] = dict(case.shared)
    return yaml.safe_dump(cfg, sort_keys=False)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_both(case: Case, folders: list[Path], work: Path) -> tuple[dict, dict, dict[str, float]]:
    """(ours, mergekit's) merged state dicts, and each tool's wall time in seconds."""
    from hf_taskarith import merge_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

    text = merge_yaml(case, folders)
    work.mkdir(parents=True, exist_ok=True)
    (work / "merge.yml").write_text(text)
    t0 = time.perf_counter()
    merge_from_config(work / "merge.yml", work / "ours", progress=False, overwrite=True)
    t1 = time.perf_counter()
    options = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(work / "mergekit"), options=options)
    t2 = time.perf_counter()
    return _state_dict(work / "ours"), _state_dict(work / "mergekit"), {"ours_s": t1 - t0, "mergekit_s": t2 - t1}


# -- analysis -------------------------------------------------------------------------
def bf16_ulp(*values: torch.Tensor) -> torch.Tensor:
    """bfloat16 spacing at the largest magnitude among ``values`` (elementwise, float64)."""
    mag = torch.stack([v.abs().double() for v in values]).amax(0).clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def _our_keep(case: Case, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    from hf_taskarith.merging import sparsify

    if case.density is None:
        return [d != 0 for d in deltas]
    out = []
    for i, d in enumerate(deltas):
        if case.method == "ties":
            kept = sparsify.magnitude(d.clone(), case.density[i])
        else:
            kept = sparsify.magnitude_outliers(d.clone(), case.density[i], gamma=case.gamma[i])
        out.append(kept != 0)
    return out


def _mergekit_intermediates(case: Case, base: torch.Tensor, fts: list[torch.Tensor]
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """mergekit's bfloat16 deltas, kept sets and agreement masks, from mergekit's own functions
    (its ``sparsify`` and ``get_mask``) on the tensors ``merge_group`` would form."""
    from mergekit import sparsify as mk_sparsify
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    deltas = [ft - base for ft in fts]  # bfloat16 arithmetic, as mergekit with dtype: bfloat16
    if case.density is None:
        kept = deltas
    else:
        method = mk_sparsify.SparsificationMethod("magnitude" if case.method == "ties" else "magnitude_outliers")
        kept = [mk_sparsify.sparsify(d, density=case.density[i], method=method,
                                     gamma=case.gamma[i] if case.gamma else 0) for i, d in enumerate(deltas)]
    agree = None
    if case.consensus:
        weights = torch.tensor(case.weight, dtype=base.dtype).reshape((-1,) + (1,) * base.dim())
        agree = get_mask(torch.stack(kept) * weights, method="sum", mask_dtype=base.dtype)
    return deltas, [k != 0 for k in kept], agree


def exact_weight_multiples(weights: tuple[float, ...]) -> torch.Tensor:
    """The weights as written in the YAML (decimal: 0.3 is 3/10) times their common
    denominator: small integers in the same ratios, so ``sum_i m_i d_i`` has the sign of the exact
    weighted vote. Falls back to the float64 weights if the integers get large."""
    exact = [Fraction(repr(float(x))) for x in weights]
    den = math.lcm(*(f.denominator for f in exact))
    multiples = [f * den for f in exact]
    if max(abs(m) for m in multiples) > 2 ** 20:
        return torch.tensor(weights, dtype=torch.float64)
    return torch.tensor([float(m) for m in multiples], dtype=torch.float64)


def reference64(case: Case, base: torch.Tensor, deltas: list[torch.Tensor], keep: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 result of ``case`` on exact deltas with the given kept sets, and the float64
    agreement mask (``None`` without sign election). Independent of both tools' code."""
    w = torch.tensor(case.weight, dtype=torch.float64).reshape((-1,) + (1,) * base.dim())
    kept = torch.stack([d * k for d, k in zip(deltas, keep)])
    weighted = kept * w
    agree = None
    if case.consensus:
        # the vote with the weights as written (0.3 is 3/10): integer multiples of the
        # deltas, exact in float64, so a vote that is exactly 0 elects + as the rule says
        votes = (kept * exact_weight_multiples(case.weight).reshape(w.shape)).sum(0)
        elected = torch.where(votes >= 0, 1.0, -1.0).to(torch.float64)
        agree = (weighted.sign() == elected) & (weighted != 0)
        merged = (weighted * agree).sum(0)
        if case.normalize:
            divisor = (w * agree).sum(0)
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
    else:
        merged = weighted.sum(0)
        if case.normalize:
            merged = merged / float(sum(case.weight))
    lam = float(case.shared.get("lambda", 1.0))
    return base + lam * merged, agree


def _cutoff_values(case: Case, d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The magnitudes at which ``case``'s selection cuts ``|d|`` (where ties are broken)."""
    from hf_taskarith.merging.sparsify import kept_count

    order = d.abs().reshape(-1).sort().values
    n, k = order.numel(), kept_count(d.numel(), density)
    if case.method == "ties":
        return order[n - k:n - k + 1]
    n_top = min(int(gamma * n), n - k)
    return torch.stack([order[n - n_top - k], order[max(n - n_top - 1, 0)]] + ([order[n - n_top]] if n_top else []))


#: half an ulp, with room for float64's own rounding of decimal weights at exact halfway cases
HALF = 0.5 + 1e-6

_SPLIT = ("exact_both", "exact_ours_only", "exact_mergekit_only", "neither_ours_closer",
          "neither_mergekit_closer", "neither_equal")
COUNT_KEYS = (("entries", "differ", "differ_gt1", "differ_gt1_input_scale", "mk_delta_inexact",
               "a_tied", "a_other", "b_mergekit_vote_wrong", "b_ours_vote_wrong", "b_both", "c_rounding")
              + tuple(f"{tag}{k}" for tag in ("", "a_", "b_", "c_") for k in _SPLIT)
              + ("all_ours_at_least_as_close", "mergekit_at_least_as_close", "ours_err_gt_half",
                 "mergekit_err_gt_half", "mergekit_err_gt1", "zero_vote", "ours_err_gt_half_zero_vote",
                 "mergekit_err_gt_half_zero_vote", "ours_err_gt_half_cancellation", "mergekit_group_mismatch"))


def analyse_tensor(case: Case, base_bf: torch.Tensor, fts_bf: list[torch.Tensor], ours_bf: torch.Tensor,
                   mk_bf: torch.Tensor, *, check_group: bool = False) -> dict[str, float]:
    """Counts (see :data:`COUNT_KEYS`) and worst errors for one tensor."""
    c = dict.fromkeys(COUNT_KEYS, 0)
    base = base_bf.double()
    deltas = [ft.double() - base for ft in fts_bf]  # exact
    our_keep = _our_keep(case, [ft.float() - base_bf.float() for ft in fts_bf])
    mk_deltas, mk_keep, mk_agree = _mergekit_intermediates(case, base_bf, fts_bf)
    ref_ours, agree_ours = reference64(case, base, deltas, our_keep)
    ref_mk, agree_ref_mk = reference64(case, base, deltas, mk_keep)
    ours, mk = ours_bf.double(), mk_bf.double()

    diff_ulps = (ours - mk).abs() / bf16_ulp(ours, mk)
    wide = bf16_ulp(ours, mk, base, *(f.double() for f in fts_bf))
    err_ours = (ours - ref_ours).abs() / bf16_ulp(ours, ref_ours)
    err_mk = (mk - ref_mk).abs() / bf16_ulp(mk, ref_mk)
    gt1 = diff_ulps > 1
    c["entries"] = ours.numel()
    c["differ"] = int((ours != mk).sum())
    c["differ_gt1"] = int(gt1.sum())
    c["differ_gt1_input_scale"] = int(((ours - mk).abs() / wide > 1).sum())
    c["mk_delta_inexact"] = sum(int((m.double() != d).sum()) for m, d in zip(mk_deltas, deltas))

    sel = torch.zeros_like(gt1)
    sel_tied = torch.zeros_like(gt1)
    for i, (o, m, d) in enumerate(zip(our_keep, mk_keep, deltas)):
        differs = (o != m) & (d != 0)  # a kept zero contributes nothing
        sel |= differs
        if case.density is not None:
            cuts = _cutoff_values(case, d, case.density[i], case.gamma[i] if case.gamma else 0.0)
            sel_tied |= differs & torch.isin(d.abs(), cuts)
    a = gt1 & sel
    c["a_tied"] = int((a & sel_tied).sum())
    c["a_other"] = int((a & ~sel_tied).sum())
    b = gt1 & ~sel
    if case.consensus:
        ours_w = torch.stack([(f.float() - base_bf.float()) * k * w
                              for f, k, w in zip(fts_bf, our_keep, case.weight)])
        from hf_taskarith.merging.consensus import agreement

        our_agree = agreement(ours_w, "sum") != 0
        vote = (our_agree != mk_agree).any(0)
        b = b & vote
        mk_wrong = (mk_agree != agree_ref_mk).any(0)
        ours_wrong = (our_agree != agree_ours).any(0)
        c["b_mergekit_vote_wrong"] = int((b & mk_wrong & ~ours_wrong).sum())
        c["b_ours_vote_wrong"] = int((b & ours_wrong & ~mk_wrong).sum())
        c["b_both"] = int((b & (ours_wrong == mk_wrong)).sum())
    else:
        b = torch.zeros_like(gt1)
    rest = gt1 & ~sel & ~b
    c["c_rounding"] = int(rest.sum())
    ours_ok, mk_ok = err_ours <= HALF, err_mk <= HALF  # correctly rounded for its kept set
    for tag, region in (("", gt1), ("a_", a), ("b_", b), ("c_", rest)):
        c[f"{tag}exact_both"] = int((region & ours_ok & mk_ok).sum())
        c[f"{tag}exact_ours_only"] = int((region & ours_ok & ~mk_ok).sum())
        c[f"{tag}exact_mergekit_only"] = int((region & mk_ok & ~ours_ok).sum())
        neither = region & ~ours_ok & ~mk_ok
        c[f"{tag}neither_ours_closer"] = int((neither & (err_ours < err_mk)).sum())
        c[f"{tag}neither_mergekit_closer"] = int((neither & (err_mk < err_ours)).sum())
        c[f"{tag}neither_equal"] = int((neither & (err_mk == err_ours)).sum())
    c["all_ours_at_least_as_close"] = int((ours_ok | (err_ours <= err_mk)).sum())
    c["mergekit_at_least_as_close"] = int((mk_ok | (err_mk <= err_ours)).sum())
    c["ours_err_gt_half"] = int((err_ours > HALF).sum())
    # where ours is off by more than rounding: a vote that is exactly 0 (float32 weights
    # 0.3f + 0.2f > 0.5 decide it), or an output that cancels to far below the inputs
    off = err_ours > HALF
    if case.consensus:
        m = exact_weight_multiples(case.weight).reshape((-1,) + (1,) * base.dim())
        kept = torch.stack([d * k for d, k in zip(deltas, our_keep)])
        zero_vote = ((kept * m).sum(0) == 0) & (kept != 0).any(0)
        c["zero_vote"] = int(zero_vote.sum())
        c["ours_err_gt_half_zero_vote"] = int((off & zero_vote).sum())
        c["mergekit_err_gt_half_zero_vote"] = int((err_mk > HALF).logical_and(zero_vote).sum())
        off &= ~zero_vote
    scale = torch.stack([base.abs()] + [f.double().abs() for f in fts_bf]).amax(0)
    c["ours_err_gt_half_cancellation"] = int((off & (ref_ours.abs() < scale * 2.0 ** -8)).sum())
    c["mergekit_err_gt_half"] = int((err_mk > HALF).sum())
    c["mergekit_err_gt1"] = int((err_mk > 1).sum())
    c["max_err_ours"] = float(err_ours.max())
    c["max_err_mergekit"] = float(err_mk.max())
    if check_group:  # the intermediates above come from the same calls run_merge makes
        c["mergekit_group_mismatch"] = int((_mergekit_group(case, base_bf, fts_bf) != mk_bf).sum())
    return c


def _mergekit_group(case: Case, base: torch.Tensor, fts: list[torch.Tensor]) -> torch.Tensor:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    mk = registry.get(case.method)
    params = {p.name: p.default for p in mk.spec.parameters}
    params.update(case.shared)
    per = [case.per_model(i) for i in range(len(fts))]
    for key in per[0]:
        params[key] = {i + 1: p[key] for i, p in enumerate(per)}
    return mk.merge_group(TensorGroup.from_tensors([base] + list(fts), base_index=0), **params)


def analyse(case: Case, folders: list[Path], ours: dict, mk: dict, *, check_group: bool = False) -> dict[str, Any]:
    """Sum :func:`analyse_tensor` over every floating tensor; fractions added."""
    inputs = [_state_dict(f) for f in folders]
    total: dict[str, float] = dict.fromkeys(COUNT_KEYS, 0)
    total.update(max_err_ours=0.0, max_err_mergekit=0.0)
    for name in sorted(ours):
        if not ours[name].dtype.is_floating_point:
            continue
        c = analyse_tensor(case, inputs[0][name], [sd[name] for sd in inputs[1:]], ours[name], mk[name],
                           check_group=check_group)
        for k, v in c.items():
            total[k] = max(total[k], v) if k.startswith("max_") else total[k] + v
    n, g = total["entries"], total["differ_gt1"]
    out: dict[str, Any] = dict(total)
    out["frac_differ_gt1"] = g / n
    out["frac_differ_gt1_input_scale"] = total["differ_gt1_input_scale"] / n
    out["frac_ours_at_least_as_close"] = total["all_ours_at_least_as_close"] / n
    out["frac_mergekit_at_least_as_close"] = total["mergekit_at_least_as_close"] / n
    out["frac_ours_correctly_rounded"] = 1 - total["ours_err_gt_half"] / n
    out["frac_mergekit_correctly_rounded"] = 1 - total["mergekit_err_gt_half"] / n
    out["frac_mergekit_err_gt1"] = total["mergekit_err_gt1"] / n
    out["frac_ours_err_gt_half"] = total["ours_err_gt_half"] / n
    for k in ("a_tied", "a_other", "b_mergekit_vote_wrong", "b_ours_vote_wrong", "b_both", "c_rounding"):
        out[f"frac_{k}"] = total[k] / n
    return out


# -- driver ---------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'delta std':>9} {'case':<17} {'>1 ulp':>8} {'(a) tied':>8} {'(a) oth':>8} {'(b) vote':>8} "
            f"{'(c) round':>9} | {'only ours':>9} {'only mk':>7} {'both':>6} {'neither':>7} | "
            f"{'ours ok':>8} {'mk ok':>8} {'ours>=mk':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        g = max(r["differ_gt1"], 1)
        b = r["frac_b_mergekit_vote_wrong"] + r["frac_b_ours_vote_wrong"] + r["frac_b_both"]
        neither = r["neither_ours_closer"] + r["neither_mergekit_closer"] + r["neither_equal"]
        print(f"{r['delta_std']:>9.0e} {r['case']:<17} {_pct(r['frac_differ_gt1']):>8} {_pct(r['frac_a_tied']):>8} "
              f"{_pct(r['frac_a_other']):>8} {_pct(b):>8} {_pct(r['frac_c_rounding']):>9} | "
              f"{100 * r['exact_ours_only'] / g:>8.1f}% {100 * r['exact_mergekit_only'] / g:>6.1f}% "
              f"{100 * r['exact_both'] / g:>5.1f}% {100 * neither / g:>6.1f}% | "
              f"{_pct(r['frac_ours_correctly_rounded']):>8} {_pct(r['frac_mergekit_correctly_rounded']):>8} "
              f"{_pct(r['frac_ours_at_least_as_close']):>8}")
    print("(a)-(c): fractions of all entries differing by > 1 ulp, by cause. Middle block: of those entries, which "
          "tool is correctly rounded (within 1/2 ulp of the float64 reference with its own kept set). Right block, "
          "over all entries: ours / mergekit correctly rounded; ours correctly rounded or at least as close as "
          "mergekit.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--delta-std", type=float, nargs="+", default=[2e-4, 2e-3, 1e-2],
                    help="std of each fine-tune's delta (weights have std 0.02)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=sorted(CASES))
    ap.add_argument("--check-group", action="store_true",
                    help="also re-run mergekit's merge_group per tensor and count mismatches with run_merge")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bf16_parity.json")
    args = ap.parse_args()
    torch.set_num_threads(2)

    rows = []
    for std in args.delta_std:
        tag = f"h{args.hidden}_l{args.layers}_v{args.vocab}_d{std:g}"
        folders = make_checkpoints(WORK / tag, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                                   delta_std=std)
        for name in args.cases:
            case = CASES[name]
            ours, mk, times = run_both(case, folders, WORK / tag / name)
            t0 = time.perf_counter()
            row = {"delta_std": std, "case": name, "method": case.method, "yaml": merge_yaml(case, folders),
                   **times, **analyse(case, folders, ours, mk, check_group=args.check_group)}
            row["analysis_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"  {tag} {name}: >1 ulp {_pct(row['frac_differ_gt1'])} "
                  f"(merge {times['ours_s']:.1f}s ours, {times['mergekit_s']:.1f}s mergekit; "
                  f"analysis {row['analysis_s']:.1f}s)", flush=True)
    print()
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "weights_std": 0.02,
             "params": rows[0]["entries"] if rows else 0}
    args.out.write_text(json.dumps({"model": model, "torch": torch.__version__, "platform": platform.platform(),
                                    "rows": rows}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
