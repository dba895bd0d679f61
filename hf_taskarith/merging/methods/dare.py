"""DARE (Yu et al., 2024): drop entries at random, rescale the rest; linear or with TIES consensus."""

from ..registry import register_merge_method
from .pipeline import Pipeline, make_method

register_merge_method(make_method(
    "dare_linear", Pipeline("random", None, default_normalize=False, default_rescale=True),
    description="Randomly drops 1 - density of each task vector's entries, rescales, and adds.",
    reference="https://arxiv.org/abs/2311.03099",
))
register_merge_method(make_method(
    "dare_ties", Pipeline("random", "sum", default_normalize=False, default_rescale=True),
    description="DARE dropping followed by TIES sign consensus.",
    reference="https://arxiv.org/abs/2311.03099",
))
