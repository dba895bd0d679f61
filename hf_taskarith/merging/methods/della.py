"""DELLA (Deep et al., 2024): magnitude-ranked random pruning (MagPrune), with or without consensus."""

from ..registry import register_merge_method
from .pipeline import Pipeline, make_method

register_merge_method(make_method(
    "della", Pipeline("della_magprune", "sum", default_normalize=True, default_rescale=True),
    description="Drops entries with probabilities that fall with magnitude rank, rescales, "
                "elects signs and averages.",
    reference="https://arxiv.org/abs/2406.11617",
))
register_merge_method(make_method(
    "della_linear", Pipeline("della_magprune", None, default_normalize=False, default_rescale=True),
    description="DELLA MagPrune sparsification, then a weighted sum.",
    reference="https://arxiv.org/abs/2406.11617",
))
