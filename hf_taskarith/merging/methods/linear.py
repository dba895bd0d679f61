"""Linear merging (model soups, Wortsman et al., 2022): a weighted average of whole models.

Computed as ``ref + sum_i w_i (theta_i - ref) / sum_i w_i``, which equals
``sum_i w_i theta_i / sum_i w_i`` for any reference ``ref`` (the base model when given,
otherwise the first model).
"""

from ..registry import register_merge_method
from .generalized import Pipeline, make_method

register_merge_method(make_method(
    "linear", Pipeline(None, None, default_normalize=True, default_rescale=False),
    description="Weighted average of the models' weights (normalized by the sum of weights).",
    reference="https://arxiv.org/abs/2203.05482", needs_base=False,
))
