"""Partial linearization: which parameters are linearized, and what happens to the rest.

:class:`~hf_taskarith.linearize.LinearizedModel` takes ``linearize=`` (which trainable
parameters get a tangent-space ``delta``) and ``rest=`` (what the other trainable parameters
do). Linearizing only part of a network is cheaper (the tangent pass starts at the first
linearized parameter, and no ``delta`` is held for the rest) and is how the paper's
"linearize only the attention" or "only the last blocks" variants are written.

Selectors:

* ``None``: every trainable parameter (the default, full linearization).
* a regular expression, or a list of them: a parameter is selected when any pattern matches
  (``re.search``) its name, or one of its names for tied weights. ``r"attention"`` selects
  BERT's attention blocks, ``r"\\.layer\\.(10|11)\\."`` its last two layers.
* a callable ``(name, tensor) -> bool``, called once per trainable parameter.

Strict by default: a pattern that does not compile, or matches no trainable parameter
(usually a typo), raises ``ValueError`` naming it and a few available names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

from ..errors import format_names

ParameterSelector = str | Sequence[str] | Callable[[str, torch.Tensor], bool]
"""``None`` (all), a regex, a list of regexes, or ``(name, tensor) -> bool``."""

Rest = Literal["frozen", "train"]
RESTS: tuple[str, ...] = ("frozen", "train")


def select_parameters(names: Mapping[str, Sequence[str]], tensors: Mapping[str, torch.Tensor],
                      selector: ParameterSelector | None) -> list[str]:
    """The canonical names ``selector`` picks among trainable parameters, in the given order.

    Args:
        names: canonical name -> its other names (tied weights), for every trainable parameter.
        tensors: canonical name -> tensor (passed to a callable selector).
        selector: see the module docstring.

    Returns:
        The selected canonical names (never empty).

    Raises:
        ValueError: a pattern does not compile or matches nothing, or nothing is selected.
        TypeError: ``selector`` is none of the accepted kinds.
    """
    if selector is None:
        return list(names)
    if callable(selector) and not isinstance(selector, str):
        chosen = [n for n in names if selector(n, tensors[n])]
        if not chosen:
            raise ValueError(f"the linearize= callable selected none of the {len(names)} trainable parameters "
                             f"({format_names(list(names), 8)}); it must return True for at least one.")
        return chosen
    patterns = _compile(selector)
    chosen, used = [], set()
    for name, aliases in names.items():
        hits = {p.pattern for p in patterns if any(p.search(n) for n in (name, *aliases))}
        if hits:
            chosen.append(name)
            used |= hits
    unused = [p.pattern for p in patterns if p.pattern not in used]
    if unused:
        raise ValueError(f"linearize= pattern(s) {unused} match no trainable parameter. Patterns are regular "
                         f"expressions searched in parameter names, e.g. {format_names(list(names), 8)}.")
    return chosen


def selector_record(selector: ParameterSelector | None, chosen: Sequence[str]) -> list[str] | None:
    """A JSON-able record of the selection that :func:`select_parameters` reproduces.

    ``None`` for full linearization, the patterns as given, or (for a callable) one anchored
    pattern per selected name.
    """
    if selector is None:
        return None
    if callable(selector) and not isinstance(selector, str):
        return [f"^{re.escape(n)}$" for n in chosen]
    return [p.pattern for p in _compile(selector)]


def _compile(selector: str | Sequence[str]) -> list[re.Pattern]:
    items = [selector] if isinstance(selector, str) else list(selector)
    if not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"linearize= takes None, a regex string, a non-empty list of regex strings or a callable "
                        f"(name, tensor) -> bool; got {selector!r}.")
    compiled = []
    for p in items:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"linearize= pattern {p!r} is not a valid regular expression: {e}.") from None
    return compiled
