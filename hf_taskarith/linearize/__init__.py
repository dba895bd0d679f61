"""Tangent-space (linearized) models: ``f(x; theta0) + J f(x; theta0) . delta``.

* :class:`LinearizedModel`: wraps any model; ``delta`` (plus, with partial linearization and
  ``rest="train"``, the ``nonlinear`` parameters) is what trains; ``from_task_vector``,
  ``save_pretrained`` and ``from_pretrained`` use and store task vectors.
* :func:`linearized_call`: the stateless forward (primal + JVP in one pass).
* :func:`make_attention_jvp_safe`: attention that forward-mode AD can run.
* :func:`register_tangent_rule`, :func:`register_linearized_loss`: extension points.
"""

from .attention import make_attention_jvp_safe
from .functional import ENGINES, add_tangent, linearized_call, swapped_parameters
from .losses import get_linearized_loss, list_linearized_losses, register_linearized_loss
from .model import LinearizedModel, LinearizedOutput
from .selection import ParameterSelector, Rest
from .tangent_rules import register_tangent_rule

__all__ = [
    "LinearizedModel", "LinearizedOutput", "linearized_call", "add_tangent", "swapped_parameters",
    "make_attention_jvp_safe", "register_tangent_rule", "register_linearized_loss",
    "get_linearized_loss", "list_linearized_losses", "ENGINES", "ParameterSelector", "Rest",
]
