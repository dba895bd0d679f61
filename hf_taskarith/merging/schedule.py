"""Per-tensor parameter values: mergekit's gradients and filters.

A merge parameter may vary over the model instead of being one number:

- :class:`Gradient` -- a list of values spread evenly over the layers (YAML ``t: [0, 0.5, 1]``).
  A tensor at position ``t`` in ``[0, 1]`` gets, with ``n`` values ``v``, ``s = t (n - 1)``,
  ``i = floor(s)``, ``f = s - i``::

      (1 - f) * v[i] + f * v[min(i + 1, n - 1)]

  for numbers; booleans and strings are picked, not blended: ``v[floor(t (n - 1))]``.
- :class:`Conditional` -- an ordered list of :class:`Case` s (YAML ``{filter: self_attn, value: 0.3}``
  or a list of such mappings): the first case whose ``filter`` is a substring of the tensor's
  name wins; a case without filter (or ``filter: "*"``) matches every tensor. A case's value is
  a number, a boolean, a string or a :class:`Gradient`. When no case matches, the parameter
  falls back to the next setting down (a model's own value, then the shared ``parameters:``
  value, then the method's default), as in mergekit.

The position ``t`` of a tensor (:func:`layer_positions`) is mergekit's: ``i / (n_layers - 1)`` for
a tensor of layer ``i`` (``1`` when there is one layer), ``0`` for every tensor outside the
layers (embeddings, final norm, LM head).

This module is torch-free: the registry and the torch-free merge path import it.

Note:
    Cost: evaluating a setting is a few Python operations per tensor; :func:`layer_positions`
    is one regular-expression match per tensor name. mergekit's ``evaluate_setting`` is
    followed step by step (same float operations), so the values are bit for bit mergekit's.

Example:
    >>> g = Gradient([0.0, 0.5, 1.0])
    >>> g.value_at(0.25), g.value_at(1.0)
    (0.25, 1.0)
    >>> c = Conditional(Case("self_attn", 0.3), Case("mlp", g), default=0.9)
    >>> c.value_for("model.layers.0.mlp.up_proj.weight", 0.5), c.value_for("lm_head.weight", 0.0)
    (0.5, 0.9)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MergeConfigError

#: a single parameter value
Scalar = bool | int | float | str
_SCALARS = (bool, int, float, str)
#: the module lists whose numbered children are layers (``model.layers.3.``, ``transformer.h.3.``,
#: ``encoder.layer.3.``, ``blocks.3.``)
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")
_LAYER = re.compile(r"(?:^|\.)(?:" + "|".join(LAYER_CONTAINERS) + r")\.(\d+)(?=\.|$)")
#: the filter of a case that matches every tensor (besides no filter at all)
MATCH_ALL = "*"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, init=False)
class Gradient:
    """Values spread evenly over the layers (mergekit's parameter gradient).

    Args:
        values: one or more numbers (interpolated), or booleans / strings (picked).

    Raises:
        MergeConfigError: ``values`` is empty or holds something other than numbers, booleans
            and strings.

    Note:
        Cost: :meth:`value_at` is O(1). Range checks of the values are the parameter's
        (:meth:`~hf_taskarith.merging.registry.ParamSpec.check_setting`): numbers in range at
        every point mean every interpolated value is in range too.

    Example:
        >>> Gradient([0.2, 0.8]).value_at(0.5)
        0.5
    """

    values: tuple[Scalar, ...]

    def __init__(self, values: Sequence[Scalar]):
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise MergeConfigError(f"Gradient takes a list of values, got {values!r} ({type(values).__name__}); "
                                   "write Gradient([0.0, 0.5, 1.0]).")
        vals = tuple(values)
        if not vals:
            raise MergeConfigError("a gradient needs at least one value, got an empty list; write e.g. [0.0, 1.0], "
                                   "or one number for the same value everywhere.")
        bad = [v for v in vals if not isinstance(v, _SCALARS)]
        if bad:
            raise MergeConfigError(f"gradient values must be numbers, booleans or strings, got {bad[0]!r} "
                                   f"({type(bad[0]).__name__}) in {list(vals)!r}; filters cannot be nested in a "
                                   "gradient (put the gradient inside the filter's value instead).")
        object.__setattr__(self, "values", vals)

    def value_at(self, t: float) -> Scalar:
        """The value at position ``t`` in ``[0, 1]`` (0: first layer and non-layer tensors, 1: last layer)."""
        vals, n = self.values, len(self.values)
        if not all(_is_number(v) for v in vals):  # booleans and strings: pick one
            return vals[int(t * (n - 1))]
        scaled = t * (n - 1)
        i0 = int(scaled)
        i1 = min(n - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * vals[i0] + frac * vals[i1]

    def __repr__(self) -> str:
        return f"Gradient({list(self.values)!r})"


@dataclass(frozen=True)
class Case:
    """One case of a :class:`Conditional`: ``value`` for tensors whose name contains ``filter``.

    Args:
        filter: a substring of tensor names (``"self_attn"``, ``"mlp"``, ``"layers.0."``);
            ``None`` or ``"*"`` matches every tensor.
        value: a number, boolean or string, or a :class:`Gradient` (a list is read as one).

    Raises:
        MergeConfigError: ``filter`` is not a string; ``value`` is a mapping or a
            :class:`Conditional` (mergekit does not nest filters).
    """

    filter: str | None
    value: Scalar | Gradient

    def __post_init__(self) -> None:
        if self.filter is not None and not isinstance(self.filter, str):
            raise MergeConfigError(f"a filter must be a string (a substring of tensor names such as 'self_attn'), "
                                   f"got {self.filter!r} ({type(self.filter).__name__}); quote it in YAML.")
        value = self.value
        if isinstance(value, (list, tuple)):
            object.__setattr__(self, "value", Gradient(value))
        elif not isinstance(value, (Gradient, *_SCALARS)):
            raise MergeConfigError(f"the value of filter {self.filter!r} must be a number, boolean, string or "
                                   f"gradient (list), got {value!r} ({type(value).__name__}); filters cannot be "
                                   "nested.")

    def matches(self, tensor_name: str) -> bool:
        """Whether this case applies to ``tensor_name`` (mergekit: substring, ``*`` or no filter)."""
        return self.filter is None or self.filter == MATCH_ALL or bool(tensor_name and self.filter in tensor_name)


@dataclass(frozen=True, init=False)
class Conditional:
    """Values chosen by tensor name: the first matching :class:`Case` wins.

    Args:
        *cases: the cases, in order of precedence.
        default: appended as a last case without filter (matches every tensor).

    Raises:
        MergeConfigError: no case, or a case that is not a :class:`Case`.

    Note:
        Cost: :meth:`value_for` tests each case's filter in turn (a substring search).

    Example:
        >>> Conditional(Case("self_attn", 0.3), default=0.7).value_for("model.layers.1.mlp.up_proj.weight", 1.0)
        0.7
    """

    cases: tuple[Case, ...]

    def __init__(self, *cases: Case, default: Scalar | Gradient | None = None):
        all_cases = list(cases) + ([Case(None, default)] if default is not None else [])
        if not all_cases:
            raise MergeConfigError("a Conditional needs at least one Case (or a default=).")
        bad = [c for c in all_cases if not isinstance(c, Case)]
        if bad:
            raise MergeConfigError(f"Conditional takes Case(filter, value) objects, got {bad[0]!r}; write "
                                   "Conditional(Case('self_attn', 0.3), default=0.5).")
        object.__setattr__(self, "cases", tuple(all_cases))

    def value_for(self, tensor_name: str, t: float) -> Scalar | None:
        """The first matching case's value at position ``t``, or ``None`` if no case matches."""
        for case in self.cases:
            if case.matches(tensor_name):
                return case.value.value_at(t) if isinstance(case.value, Gradient) else case.value
        return None

    def __repr__(self) -> str:
        return f"Conditional({', '.join(f'Case({c.filter!r}, {c.value!r})' for c in self.cases)})"


#: a parameter setting: one value, a gradient, or values by tensor name
Setting = Scalar | Gradient | Conditional


def is_schedule(value: Any) -> bool:
    """True for a :class:`Gradient` or :class:`Conditional` (a value that varies by tensor)."""
    return isinstance(value, (Gradient, Conditional))


def has_schedule(params: Mapping[str, Any]) -> bool:
    """True if any parameter (or any model's value of a per-model one) varies by tensor."""
    return any(is_schedule(v) or (isinstance(v, (list, tuple)) and any(is_schedule(x) for x in v))
               for v in params.values())


def evaluate(setting: Any, *, tensor_name: str, position: float) -> Any:
    """The value of ``setting`` for one tensor; ``None`` where a :class:`Conditional` has no matching case.

    Args:
        setting: a plain value (returned as is), a :class:`Gradient` or a :class:`Conditional`.
        tensor_name: the tensor's name (filters are substrings of it).
        position: its position ``t`` in ``[0, 1]`` (:func:`layer_positions`).
    """
    if isinstance(setting, Gradient):
        return setting.value_at(position)
    if isinstance(setting, Conditional):
        return setting.value_for(tensor_name, position)
    return setting


def map_values(setting: Any, fn: Callable[[Any], Any]) -> Any:
    """``setting`` with ``fn`` applied to every value it holds (each gradient point, each case's
    value); used to check and convert the values against a parameter's type and range."""
    if isinstance(setting, Gradient):
        return Gradient([fn(v) for v in setting.values])
    if isinstance(setting, Conditional):
        return Conditional(*(Case(c.filter, map_values(c.value, fn)) for c in setting.cases))
    return fn(setting)


def with_fallback(setting: Setting | None, fallback: Setting | None) -> Setting | None:
    """A model's own setting over the shared one (mergekit's precedence): where the model's
    :class:`Conditional` matches no tensor, the shared setting applies.

    Example:
        >>> with_fallback(Conditional(Case("mlp", 0.5)), 1.0)
        Conditional(Case('mlp', 0.5), Case(None, 1.0))
    """
    if setting is None:
        return fallback
    if not isinstance(setting, Conditional) or fallback is None:
        return setting
    tail = fallback.cases if isinstance(fallback, Conditional) else (Case(None, fallback),)
    return Conditional(*setting.cases, *tail)


def parse_setting(raw: Any, *, where: str) -> Any:
    """A setting from its YAML form (mergekit's): a scalar, a list of scalars (a gradient), a
    mapping ``{filter, value}`` or a list of such mappings (a conditional).

    Args:
        raw: the YAML value. :class:`Gradient` / :class:`Conditional` objects and ``None`` pass
            through unchanged.
        where: where it was found, for error messages (``"models[0].parameters.weight"``).

    Raises:
        MergeConfigError: an empty list, a list mixing values and mappings, a mapping without
            ``value`` or with keys other than ``filter`` and ``value``, a filter that is not a
            string, a nested filter.

    Example:
        >>> parse_setting([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}], where="t")
        Conditional(Case('mlp', Gradient([0, 1])), Case(None, 0.5))
    """
    if raw is None or isinstance(raw, (Gradient, Conditional, *_SCALARS)):
        return raw
    try:
        if isinstance(raw, Mapping):
            return Conditional(_parse_case(raw, where))
        if isinstance(raw, (list, tuple)):
            if not raw:
                raise MergeConfigError("an empty list is neither a value nor a gradient; give a number, or a list "
                                       "of numbers such as [0.0, 1.0].")
            if all(isinstance(x, Mapping) for x in raw):
                return Conditional(*(_parse_case(x, where) for x in raw))
            if any(isinstance(x, Mapping) for x in raw):
                raise MergeConfigError(f"a list mixes filter mappings and plain values: {raw!r}; use either a "
                                       "gradient (plain values) or a list of {filter, value} mappings, the last "
                                       "one without filter as the default.")
            return Gradient(raw)
    except MergeConfigError as e:
        raise MergeConfigError(f"{where}: {e}") from None
    raise MergeConfigError(f"{where}: expected a number, boolean, string, a list (gradient) or {{filter, value}} "
                           f"mapping(s), got {raw!r} ({type(raw).__name__}).")


def _parse_case(raw: Mapping, where: str) -> Case:
    extra = sorted(map(str, set(raw) - {"filter", "value"}))
    if extra or "value" not in raw:
        what = f"unknown key(s) {extra}" if extra else "no 'value'"
        raise MergeConfigError(f"a filter mapping has {what}: {dict(raw)!r}; write {{filter: self_attn, value: 0.5}} "
                               "(filter optional: without it the mapping is the default).")
    value = raw["value"]
    if isinstance(value, (list, tuple)) and any(isinstance(x, Mapping) for x in value) or isinstance(value, Mapping):
        raise MergeConfigError(f"filters cannot be nested: the value of filter {raw.get('filter')!r} is {value!r}; "
                               "give a number or a gradient (list of numbers).")
    return Case(raw.get("filter"), value)


def to_plain(setting: Any) -> Any:
    """The YAML form of a setting (lists and mappings), for reports and model cards; per-model
    lists are converted element by element."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, Conditional):
        return [{**({"filter": c.filter} if c.filter is not None else {}), "value": to_plain(c.value)}
                for c in setting.cases]
    if isinstance(setting, (list, tuple)):
        return [to_plain(x) for x in setting]
    return setting


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """The position ``t`` of each tensor among the layers, as mergekit computes it.

    A tensor inside a numbered layer (``<prefix>.layers.<i>.``, also ``h``, ``layer``, ``blocks``,
    ``block``) is at ``i / (n - 1)``, with ``n`` the number of layers under the same prefix (their
    highest index + 1; ``t = 1`` when ``n == 1``); every other tensor (embeddings, final norm,
    LM head) is at ``0``. Separate stacks (an encoder's and a decoder's) count separately, as
    mergekit's modules do.

    Note:
        Cost: one regular-expression search per name. Layers are found by name, not by the
        architecture's ``config.json``: a checkpoint whose layers live under another name gets
        ``t = 0`` everywhere (then a gradient takes its first value).

    Example:
        >>> layer_positions(["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.2.mlp.weight"])
        {'model.embed_tokens.weight': 0.0, 'model.layers.0.mlp.weight': 0.0, 'model.layers.2.mlp.weight': 1.0}
    """
    found: dict[str, tuple[str, int] | None] = {}
    top: dict[str, int] = {}
    for name in names:
        m = _LAYER.search(name)
        if m is None:
            found[name] = None
            continue
        prefix, index = name[:m.start(1)], int(m.group(1))
        found[name] = (prefix, index)
        top[prefix] = max(top.get(prefix, 0), index)
    out: dict[str, float] = {}
    for name, where in found.items():
        if where is None:
            out[name] = 0.0
            continue
        n = top[where[0]] + 1
        out[name] = where[1] / (n - 1) if n > 1 else 1.0
    return out
