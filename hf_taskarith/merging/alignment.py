"""Matching the attention heads of two models: pure tensor functions.

Permuting the heads of an attention layer, the same way in the rows of ``q_proj``, ``k_proj``
and ``v_proj`` (and their biases) and in the columns of ``o_proj``, leaves the layer's function
unchanged; so two models can hold the same heads in different orders, and averaging them
head ``h`` with head ``h`` mixes unrelated heads. Aligning a model to a reference (the base)
finds the permutation ``pi`` that maximizes the summed similarity of the reference's head
``a`` with the model's head ``pi(a)``.

Similarity is the Frobenius inner product of a head's weights (its ``head_dim`` rows of
``q_proj``, or columns of ``o_proj``, ...), summed over the layer's projections: maximizing
``sum_a <A_a, B_pi(a)>`` is minimizing ``sum_a ||A_a - B_pi(a)||^2``, the distance between
the reference and the permuted model (weight matching, Ainsworth et al., "Git Re-Basin", 2023).

Optimal transport: between two uniform distributions over ``n`` heads with cost
``-similarity``, some optimal transport plan is a permutation matrix (the plans form the
Birkhoff polytope, whose vertices are permutations), and the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`) finds it exactly. We use that hard plan: an
entropic (Sinkhorn) plan would blend heads, which no longer computes the same function.

Grouped-query attention (``num_key_value_heads < num_attention_heads``): query head ``h`` reads
key/value head ``h // group``, ``group = heads / kv_heads``. A function-preserving permutation
moves whole groups (key/value head ``b`` to place ``a``, its query heads to the query places of
group ``a``) and may reorder the query heads inside a group. :func:`match_heads` is
hierarchical: for every pair of groups, the best matching of their query heads (an
assignment of size ``group``); then the best matching of groups (size ``kv_heads``) under
those scores plus the key/value heads' own.

Note:
    Cost per layer and model, ``H`` query heads, ``KV`` key/value heads of ``head_dim`` ``d``,
    hidden size ``D``: the similarities are matrix products of ``2 H^2 d D + 2 KV^2 d D``
    multiply-adds (q, o, k, v), the assignments ``KV^2`` of size ``H / KV`` and one of size
    ``KV``, each ``O(n^3)``. Measured (``benchmarks/hierarchical_cost.py``, 2 shared CPU
    cores, H = 32, KV = 8, d = 128, D = 4096): 30 to 120 ms for the similarities (1.1 G
    multiply-adds), 0.6 ms for all the assignments (0.02 ms with KV = 32): the assignment
    itself is negligible next to reading the weights.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.0, 5.0], [4.0, 1.0]])  # scores[a, b]: reference head a, model head b
    >>> match_heads(scores, scores)[0]  # reference head 0 <- model head 1, 1 <- 0
    tensor([1, 0])
"""

from __future__ import annotations

import torch

#: entries per slab of rows when heads lie along dimension 1 (``o_proj``)
CHUNK = 1 << 20


def head_scores(reference: torch.Tensor, model: torch.Tensor, *, heads: int, dim: int) -> torch.Tensor:
    """Similarity of every head of ``reference`` with every head of ``model``.

    Args:
        reference, model: float tensors of the same shape whose dimension ``dim`` is ``heads``
            consecutive blocks, one per head (``q_proj.weight``: dim 0; ``o_proj.weight``: dim
            1; a bias: dim 0).
        heads: the number of heads along ``dim``.
        dim: the head dimension, 0 or 1.

    Returns:
        ``(heads, heads)`` float64: entry ``[a, b]`` is the inner product of the reference's
        head ``a`` with the model's head ``b``.

    Raises:
        ValueError: the shapes differ, or ``dim``'s size is not a multiple of ``heads``.
    """
    if reference.shape != model.shape:
        raise ValueError(f"head_scores: shapes differ, {list(reference.shape)} and {list(model.shape)}.")
    if reference.shape[dim] % heads:
        raise ValueError(f"head_scores: dimension {dim} of size {reference.shape[dim]} does not split into "
                         f"{heads} heads.")
    if dim == 0:  # (heads * d, ...) -> (heads, d * ...): one row per head, no copy
        a, b = reference.reshape(heads, -1), model.reshape(heads, -1)
        return (a @ b.T).double()
    rows, cols = reference.shape[0], reference[0].numel()  # (rows, heads * d): sum over rows and d
    step = max(1, CHUNK // max(cols, 1))
    total = torch.zeros(heads, heads, dtype=torch.float64)
    for start in range(0, rows, step):  # a cache-sized slab of rows at a time, heads first (a small copy)
        a = reference[start:start + step].reshape(-1, heads, cols // heads).transpose(0, 1).reshape(heads, -1)
        b = model[start:start + step].reshape(-1, heads, cols // heads).transpose(0, 1).reshape(heads, -1)
        total += (a @ b.T).double()
    return total


def _assign(scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation ``p`` maximizing ``sum_a scores[a, p[a]]``, and that sum."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)
    return perm, float(scores[torch.as_tensor(rows), perm].sum())


def match_heads(query_scores: torch.Tensor, kv_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The function-preserving head permutation of a model that best matches a reference.

    Args:
        query_scores: ``(H, H)``: similarity of the reference's query head ``a`` with the
            model's query head ``b`` (its ``q_proj`` rows and ``o_proj`` columns).
        kv_scores: ``(KV, KV)``: the same for key/value heads (``k_proj`` and ``v_proj``
            rows); ``KV`` divides ``H``. ``KV = H`` is plain multi-head attention.

    Returns:
        ``(query_perm, kv_perm)``: at reference place ``a`` goes the model's query head
        ``query_perm[a]`` (key/value head ``kv_perm[a]``). Query head ``a`` of group
        ``a // G`` is taken from group ``kv_perm[a // G]``, so the permuted model computes
        what the model computes.

    Raises:
        ValueError: the matrices are not square, or ``KV`` does not divide ``H``.
    """
    heads, kv_heads = query_scores.shape[0], kv_scores.shape[0]
    if query_scores.shape != (heads, heads) or kv_scores.shape != (kv_heads, kv_heads):
        raise ValueError(f"match_heads: score matrices must be square, got {list(query_scores.shape)} and "
                         f"{list(kv_scores.shape)}.")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"match_heads: {kv_heads} key/value heads do not divide {heads} query heads.")
    group = heads // kv_heads
    if group == 1:  # multi-head attention: one matching of heads, query and key/value together
        perm, _ = _assign(query_scores + kv_scores)
        return perm, perm.clone()
    blocks = query_scores.reshape(kv_heads, group, kv_heads, group).permute(0, 2, 1, 3)  # [a, b, i, j]
    inner = [[_assign(blocks[a, b]) for b in range(kv_heads)] for a in range(kv_heads)]
    group_scores = kv_scores + torch.tensor([[score for _, score in row] for row in inner], dtype=kv_scores.dtype)
    kv_perm, _ = _assign(group_scores)
    query_perm = torch.cat([int(b) * group + inner[a][int(b)][0] for a, b in enumerate(kv_perm)])
    return query_perm, kv_perm


def head_index(perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A head permutation as an index of the ``len(perm) * head_dim`` entries it moves:
    ``x.index_select(dim, head_index(perm, d))`` puts head ``perm[a]`` at place ``a``.

    Example:
        >>> head_index(torch.tensor([1, 0]), 2)
        tensor([2, 3, 0, 1])
    """
    return (perm.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def is_identity(perm: torch.Tensor) -> bool:
    """Whether ``perm`` leaves every place as it is."""
    return bool((perm == torch.arange(len(perm))).all())
