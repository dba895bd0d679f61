"""Task arithmetic (Ilharco et al., 2023): base + lambda * sum_i w_i * tau_i.

Negative weights negate a task ("forgetting via negation").
"""

from ..registry import register_merge_method
from .pipeline import Pipeline, make_method

register_merge_method(make_method(
    "task_arithmetic", Pipeline(None, None, default_normalize=False, default_rescale=False),
    description="Adds weighted task vectors to the base; negative weights negate a task.",
    reference="https://arxiv.org/abs/2212.04089",
))
