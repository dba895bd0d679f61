"""Magnitude pruning without consensus: keep each task vector's largest entries, then add
(peft's ``magnitude_prune`` combination)."""

from ..registry import register_merge_method
from .pipeline import Pipeline, make_method

register_merge_method(make_method(
    "magnitude_prune", Pipeline("magnitude", None, default_normalize=False, default_rescale=False),
    description="Keeps the top-density entries of each task vector by magnitude and adds them.",
    reference="https://arxiv.org/abs/2306.01708",
))
