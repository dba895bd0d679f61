"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop both the largest outliers and the
smallest entries of each task vector; linear or with TIES consensus."""

from ..registry import register_merge_method
from .pipeline import Pipeline, make_method

register_merge_method(make_method(
    "breadcrumbs", Pipeline("magnitude_outliers", None, default_normalize=False, default_rescale=False),
    description="Removes the gamma largest (outliers) and the smallest entries, keeping density.",
    reference="https://arxiv.org/abs/2312.06795",
))
register_merge_method(make_method(
    "breadcrumbs_ties", Pipeline("magnitude_outliers", "sum", default_normalize=False, default_rescale=False),
    description="Breadcrumbs sparsification followed by TIES sign consensus.",
    reference="https://arxiv.org/abs/2312.06795",
))
