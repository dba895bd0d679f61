"""Hierarchical merge: attention heads aligned by optimal transport, then cosine-weighted
interpolation (Timilsina et al., "A Novel Hierarchical Integration Method for Efficient Model
Merging in Medical LLMs", 2025, arXiv:2511.13373, "Hierarchical Cosine-OT-LERP").

The paper describes the method in outline only: selective optimal-transport alignment of the
attention layers, to undo head permutations, followed by cosine-similarity-weighted linear
interpolation; the other layers are interpolated by cosine weights. The choices below are ours
and each has a test (``tests/test_hierarchical_merge.py``).

1. Alignment (``alignment: attention``, the default). Before merging, a pre-pass reads each
   layer's ``self_attn.{q,k,v,o}_proj`` weights (and biases) of the base and every input and
   finds, per input and layer, the function-preserving permutation of its heads closest to the
   base's (:mod:`hf_taskarith.merging.alignment`: similarity = inner product of head weights;
   the transport plan between uniform head distributions is a permutation, found exactly by the
   Hungarian algorithm; grouped-query attention moves whole key/value groups and reorders query
   heads inside them). Each input's q/k/v rows and o columns are then permuted alike. MLP
   neurons are not aligned (the paper aligns attention only); norms and embeddings are shared
   by all heads and stay as they are.
2. Interpolation, every tensor. With the base ``w_0``, the aligned inputs ``w_i``, their task
   vectors ``tau_i = w_i - w_0`` and prior weights ``p_i >= 0`` (``weight``, default 1)::

       consensus = sum_i p_i tau_i / sum_i p_i
       c_i       = cos(tau_i, consensus)               (0 where a norm is 0)
       a_i       = p_i max(c_i, 0) / sum_j p_j max(c_j, 0)
       merged    = w_0 + sum_i a_i tau_i = sum_i a_i w_i

   a convex combination (LERP) of the aligned models in which models that agree with the
   consensus direction weigh more. Where no ``c_i`` is positive (every task vector zero, or
   none agrees with the consensus) ``a_i = p_i / sum_j p_j``. One model gives that model
   (aligned): ``a_1 = 1``.

Head counts come from the base's ``config.json`` (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``; a ``text_config`` block for multimodal models), or from
the parameters of the same names, which take precedence (needed for a base given as a module
or state dict).

Supported: Llama-style attention, tensors named ``...layers.N.self_attn.{q,k,v,o}_proj.weight``
(optional ``.bias``): Llama, Mistral, Mixtral's attention, Qwen2/2.5/3, Gemma. Other layouts
(fused ``qkv_proj`` as in Phi-3, GPT-2's ``c_attn``, BERT's ``attention.self.query``) are
refused with a :class:`MergeConfigError`; ``alignment: none`` merges them with the
interpolation alone.

Note:
    Cost: the pre-pass reads every attention tensor of the base and of each input once more
    (about a third of a Llama decoder layer's weights) and computes, per layer and input,
    ``2 H^2 d D + 2 KV^2 d D`` multiply-adds of head similarities plus ``KV^2 + 1`` small
    assignments. Measured with ``benchmarks/hierarchical_cost.py`` (H = 32 heads, KV = 8,
    head_dim d = 128, hidden D = 4096, float32; 2 shared CPU cores, medians of 9, three
    runs), per layer and input: similarities 30 to 120 ms, all assignments 0.6 ms (MHA,
    KV = 32: 0.02 ms), applying a permutation to q/k/v/o 60 to 190 ms (skipped where it is
    the identity). Mistral-7B (32 layers): a few seconds per input, besides reading its
    attention weights (2.7 GB in bfloat16) once more. Memory: one tensor per input at a
    time and ``H^2 + KV^2`` scores per layer and input. The
    interpolation costs ``N (N + 1) / 2`` dot products per tensor and ``N + 1`` float32
    tensors of its size. Head alignment assumes a base; inputs that are task vectors are
    added to the base first.

Example:
    >>> import torch
    >>> w0 = torch.zeros(2)
    >>> cosine_lerp([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])], base=w0, prior=[1.0, 1.0])
    tensor([1., 1.])
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import MergeConfigError
from ..alignment import head_index, head_scores, is_identity, match_heads
from ..prepass import ModelPrepass
from ..registry import MergeMethod, ParamSpec, register_merge_method

logger = logging.getLogger(__name__)

#: Llama-style attention tensors: group 1 the layer's prefix, 2 the projection, 3 weight or bias
ATTENTION = re.compile(r"^(.*\blayers\.\d+\.self_attn\.)([qkvo])_proj\.(weight|bias)$")
#: attention layouts we know and do not align (fused projections, other naming schemes)
UNSUPPORTED_ATTENTION = re.compile(r"(qkv_proj|query_key_value|c_attn|Wqkv|attention\.self\.query|in_proj_weight)")
#: a norm at or below this makes a cosine 0
EPS = 1e-12


def cosine_weights(taus: Sequence[torch.Tensor], prior: Sequence[float]) -> list[float]:
    """The interpolation weights ``a_i`` of the module docstring.

    Args:
        taus: the task vectors (any equal shapes), float32.
        prior: ``p_i >= 0``, not all 0.

    Returns:
        ``a_i >= 0`` summing to 1.
    """
    n = len(taus)
    flat = [t.reshape(-1) for t in taus]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = float(torch.dot(flat[i], flat[j]))
    p = torch.tensor(list(prior), dtype=torch.float64)
    p = p / p.sum()
    dots = gram @ p                        # <tau_i, consensus>
    consensus_norm = float(p @ gram @ p) ** 0.5 if float(p @ gram @ p) > 0 else 0.0
    norms = gram.diagonal().clamp(min=0).sqrt()
    scale = norms * consensus_norm
    cos = torch.where(scale > EPS, dots / torch.where(scale > EPS, scale, 1), 0).clamp(-1, 1)
    raw = p * cos.clamp(min=0)
    total = float(raw.sum())
    return (raw / total if total > 0 else p).tolist()


def cosine_lerp(weights: list[torch.Tensor], *, base: torch.Tensor, prior: Sequence[float]) -> torch.Tensor:
    """``w_0 + sum_i a_i (w_i - w_0)`` with the cosine weights :func:`cosine_weights`.

    Args:
        weights: the (aligned) float32 weights of each model, the base's shape; consumed
            (overwritten).
        base: the base's float32 weights.
        prior: ``p_i >= 0`` per model, not all 0.

    Returns:
        The merged weights (a new tensor or one of ``weights``).
    """
    taus = [w.sub_(base) for w in weights]
    coef = cosine_weights(taus, prior)
    merged = taus[0].mul_(coef[0])
    for tau, a in zip(taus[1:], coef[1:]):
        merged.add_(tau, alpha=a)
    return merged.add_(base)


class HeadAlignment(ModelPrepass):
    """Per input and layer, the head permutation closest to the base (see the module docstring).

    Args:
        heads, kv_heads, head_dim: override the base's ``config.json`` (``None``: read it).

    Raises (from :meth:`begin`, :meth:`collect_weights`, :meth:`end_pass`):
        MergeConfigError: no head counts; no Llama-style attention tensors, or another
            attention layout; a layer missing one of q/k/v/o; shapes that do not fit the counts.
    """

    description = "attention head alignment"
    reads = "weights"

    def __init__(self, *, heads: int | None = None, kv_heads: int | None = None, head_dim: int | None = None):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self._done = False
        self._scores: dict[tuple[str, int], list[torch.Tensor]] = {}  # (layer, input) -> [query, kv] scores
        self._index: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    # -- set-up ------------------------------------------------------------------------
    def begin(self, base: Any) -> None:
        names = base.names()
        layers: dict[str, set[str]] = {}
        for m in filter(None, map(ATTENTION.match, names)):
            projections = layers.setdefault(m.group(1), set())
            if m.group(3) == "weight":
                projections.add(m.group(2))
        odd = sorted(n for n in names if UNSUPPORTED_ATTENTION.search(n))
        if odd or not layers:
            found = f"it has {odd[:3]}" if odd else "it has none"
            raise MergeConfigError(
                f"hierarchical: head alignment needs Llama-style attention tensors "
                f"(model.layers.N.self_attn.{{q,k,v,o}}_proj.weight) but {found} in {base.label}. Supported: "
                "Llama, Mistral, Qwen2/3, Gemma; set parameters: {alignment: none} to merge by cosine "
                "interpolation only.")
        for layer, projections in sorted(layers.items()):
            missing = sorted(set("qkvo") - projections)
            if missing:
                raise MergeConfigError(
                    f"hierarchical: attention layer {layer!r} of {base.label} lacks "
                    f"{[f'{p}_proj.weight' for p in missing]}; head alignment needs all four projections. Set "
                    "parameters: {alignment: none} to merge without alignment.")
        config = _read_config(base)
        heads = self.heads or config.get("num_attention_heads")
        if not heads:
            raise MergeConfigError(
                f"hierarchical: the number of attention heads of {base.label} is unknown (no config.json with "
                "num_attention_heads); give parameters num_attention_heads (and num_key_value_heads, head_dim "
                "where they differ from the defaults).")
        self.heads = int(heads)
        self.kv_heads = int(self.kv_heads or config.get("num_key_value_heads") or self.heads)
        self.head_dim = self.head_dim or config.get("head_dim")
        if self.heads % self.kv_heads:
            raise MergeConfigError(f"hierarchical: num_key_value_heads={self.kv_heads} does not divide "
                                   f"num_attention_heads={self.heads}.")

    def selects(self, name: str) -> bool:
        return ATTENTION.match(name) is not None

    def needs_pass(self) -> bool:
        return not self._done

    # -- the pass ------------------------------------------------------------------------
    def collect_weights(self, name: str, inputs: list[int], base: torch.Tensor, weights: list[torch.Tensor]) -> None:
        layer, proj, kind = ATTENTION.match(name).groups()
        dim = 1 if (proj == "o" and kind == "weight") else 0
        if proj == "o" and kind == "bias":  # o's bias lives in the residual stream: not per head
            return
        heads = self.heads if proj in "qo" else self.kv_heads
        self.head_dim = self._check_shape(name, base.shape, dim, heads)
        slot = 0 if proj in "qo" else 1
        for i, w in zip(inputs, weights):
            scores = self._scores.setdefault((layer, i), [torch.zeros(self.heads, self.heads, dtype=torch.float64),
                                                           torch.zeros(self.kv_heads, self.kv_heads,
                                                                       dtype=torch.float64)])
            scores[slot] += head_scores(base, w, heads=heads, dim=dim)

    def end_pass(self) -> None:
        for (layer, i), (query, kv) in self._scores.items():
            query_perm, kv_perm = match_heads(query, kv)
            self._index[(layer, i)] = None if is_identity(query_perm) else (
                head_index(query_perm, self.head_dim), head_index(kv_perm, self.head_dim))
        moved = sorted({i for (_, i), v in self._index.items() if v is not None})
        if moved:
            logger.info("hierarchical: permuted attention heads of input(s) %s to match the base", moved)
        self._scores.clear()
        self._done = True

    def tensor_params(self, name: str, inputs: list[int]) -> dict[str, Any]:
        m = ATTENTION.match(name)
        if m is None or (m.group(2) == "o" and m.group(3) == "bias"):
            return {"head_index": [None] * len(inputs), "head_axis": 0}
        layer, proj, kind = m.groups()
        slot = 0 if proj in "qo" else 1
        found = [self._index.get((layer, i)) for i in inputs]
        return {"head_index": [None if f is None else f[slot] for f in found],
                "head_axis": 1 if (proj == "o" and kind == "weight") else 0}

    def _check_shape(self, name: str, shape: torch.Size, dim: int, heads: int) -> int:
        size = shape[dim] if len(shape) > dim else 0
        d = self.head_dim or (size // heads if heads else 0)
        if len(shape) != (1 if name.endswith("bias") else 2) or not d or size != heads * d:
            raise MergeConfigError(
                f"hierarchical: {name} has shape {list(shape)}, which does not split into {heads} heads of "
                f"head_dim {d} along dimension {dim}. Check num_attention_heads={self.heads}, "
                f"num_key_value_heads={self.kv_heads}, head_dim={self.head_dim} (config.json or parameters).")
        return d


def _read_config(base: Any) -> dict[str, Any]:
    """The base's ``config.json`` (its ``text_config`` when the top level has no heads), or ``{}``."""
    folder = getattr(base, "folder", None)
    path = folder / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MergeConfigError(f"hierarchical: cannot read {path}: {e}") from None
    if "num_attention_heads" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    return config


def hierarchical_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                       base: torch.Tensor) -> torch.Tensor:
    """The registered function: each input's weights, aligned (``head_index`` from the pre-pass,
    absent with ``alignment: none``), then :func:`cosine_lerp` with the base."""
    index = p.get("head_index") or [None] * len(weights)
    axis = p.get("head_axis", 0)
    aligned = [w if i is None else w.index_select(axis, i) for w, i in zip(weights, index)]
    return cosine_lerp(aligned, base=base, prior=p["weight"])


def _check(p: dict[str, Any]) -> None:
    if sum(p["weight"]) <= 0:
        raise MergeConfigError(f"hierarchical: the weights {p['weight']} sum to 0; give at least one positive weight.")


def _prepass(p: dict[str, Any]) -> HeadAlignment | None:
    if p["alignment"] == "none":
        return None
    return HeadAlignment(heads=p["num_attention_heads"], kv_heads=p["num_key_value_heads"], head_dim=p["head_dim"])


register_merge_method(MergeMethod(
    name="hierarchical", fn=hierarchical_merge,
    params=(
        ParamSpec("weight", 1.0, per_model=True, low=0.0,
                  help="prior weight p_i >= 0 of each model in the cosine-weighted interpolation"),
        ParamSpec("alignment", "attention", kind=str, choices=("attention", "none"),
                  help="attention: align each model's attention heads to the base first (Llama-style "
                       "names); none: cosine interpolation only"),
        ParamSpec("num_attention_heads", None, kind=int, low=1,
                  help="query heads per layer (default: the base's config.json)"),
        ParamSpec("num_key_value_heads", None, kind=int, low=1,
                  help="key/value heads per layer (default: config.json, else num_attention_heads)"),
        ParamSpec("head_dim", None, kind=int, low=1,
                  help="size of one head (default: config.json, else q_proj rows / num_attention_heads)"),
    ),
    description="Attention heads aligned to the base by optimal transport (hard assignment), then "
                "cosine-similarity-weighted interpolation of the models.",
    reference="https://arxiv.org/abs/2511.13373", on_weights=True, check=_check, prepass=_prepass,
))
