"""TIES-merging (Yadav et al., 2023): trim by magnitude, elect sign, disjoint mean.

``trim_scope: tensor`` (default, mergekit's) trims each tensor to its top ``density``
entries; ``trim_scope: global`` (the paper's) trims each whole task vector, its cut found by
a pre-pass over every tensor (:mod:`hf_taskarith.merging.global_trim`).
"""

from ..registry import register_merge_method
from .pipeline import Pipeline, make_method

register_merge_method(make_method(
    "ties", Pipeline("magnitude", "sum", default_normalize=True, default_rescale=False),
    description="Keeps the top-density entries of each task vector by magnitude, elects a sign per "
                "entry, and averages the agreeing entries.",
    reference="https://arxiv.org/abs/2306.01708",
))
