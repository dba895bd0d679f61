"""The registry of merge methods: name -> :class:`MergeMethod`.

A method is a pure function that turns the deltas of one tensor (one per input model,
float32, all the base's shape) into one merged delta, plus a declaration of the parameters
it accepts. Methods defined on whole weights (``on_weights``: slerp, model_stock,
passthrough) turn the inputs' weights into merged weights instead. New methods are a new
small module that calls :func:`register_merge_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MergeConfigError, UnknownMethodError
from .schedule import evaluate, has_schedule, is_schedule, map_values


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    Attributes:
        name: key in YAML ``parameters`` / keyword argument.
        default: default value, or :data:`REQUIRED`.
        per_model: True if each input model has its own value (weight, density, ...).
        kind: ``float``, ``int``, ``bool`` or ``str`` (one of ``choices``).
        low, high, low_open: allowed range (``low`` exclusive when ``low_open``).
        choices: the allowed values of a ``str`` parameter.
        help: one line shown by ``hf-taskarith methods``.
    """

    name: str
    default: Any
    per_model: bool = False
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()

    def check(self, value: Any, where: str) -> Any:
        if value is None and self.default is None:  # optional parameter left unset
            return None
        if self.kind is str:
            if value not in self.choices:
                raise MergeConfigError(f"{where}: {self.name} must be one of {list(self.choices)}, got {value!r}.")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeConfigError(f"{where}: {self.name} must be true or false, got {value!r}.")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeConfigError(
                f"{where}: {self.name} must be a number, got {value!r} ({type(value).__name__})."
            )
        if self.kind is int and value != int(value):
            raise MergeConfigError(f"{where}: {self.name} must be a whole number, got {value!r}.")
        value = self.kind(value)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            lo = "(" if self.low_open else "["
            raise MergeConfigError(f"{where}: {self.name}={value} is outside {lo}{self.low}, {self.high}].")
        return value

    def check_setting(self, value: Any, where: str) -> Any:
        """:meth:`check` for a value that may vary by tensor: every value a
        :class:`~.schedule.Gradient` or :class:`~.schedule.Conditional` holds is checked (and
        converted); interpolated numbers lie between checked ones, so they are in range too.

        Raises:
            MergeConfigError: a value of the wrong type or out of range; a plain list or mapping
                (in Python, a gradient is an explicit ``Gradient([...])``).
        """
        if is_schedule(value):
            return map_values(value, lambda v: self.check(v, where))
        if isinstance(value, (list, tuple, dict)):
            raise MergeConfigError(
                f"{where}: {self.name} takes one value here, got {value!r}. For values that vary over the layers "
                "pass a Gradient([0.0, 0.5, 1.0]); by tensor name, a Conditional(Case('self_attn', 0.3), "
                "default=0.5) (both from hf_taskarith.merging).")
        return self.check(value, where)


if TYPE_CHECKING:
    import torch

#: signature of a merge function: (deltas, params, generator) -> merged delta
MergeFn = Callable[[list["torch.Tensor"], dict[str, Any], "torch.Generator | None"], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry key (``merge_method`` in YAML).
        fn: ``fn(deltas, params, generator) -> merged_delta``. ``deltas`` is a list of float32
            tensors (one per model, the base's shape); per-model params arrive as lists.
        params: the parameters it accepts.
        description, reference: shown in docs and model cards.
        randomized: uses the generator (then results depend on ``seed``).
        needs_base: False for methods that average whole models (``linear``): without a
            base model, the first model is the reference point.
        elementwise: True if each output entry depends only on the same entry of the inputs.
        takes_base: the function also receives the reference tensor as ``base=`` (float32).
        block_kernel: for methods that are not elementwise but can be evaluated block by
            block after looking at each whole tensor (TIES trimming; the spherical methods,
            whose result lies in the span of the base and the deltas, :mod:`.span`):
            ``block_kernel(params, context)`` (a :class:`~hf_taskarith.merging.blockwise.KernelContext`)
            returns a :class:`~hf_taskarith.merging.blockwise.BlockKernel` that must agree
            with ``fn`` (exactly, or to float rounding where its docstring says so), or ``None``
            where it does not apply. Elementwise methods need none: their ``fn`` is run on blocks.
        check: ``check(resolved_params)`` raises :class:`MergeConfigError` for combinations
            of parameters the per-parameter checks cannot see (``linear``: weights summing to 0).
        on_weights: the method is defined on whole weights, not task vectors (``slerp``,
            ``model_stock``, ``passthrough``): ``fn`` receives each input's float32 *weights*
            (a task vector is added to the base first) and the base's as ``base=``, and returns
            the merged *weights*. No delta round trip, so the result is exactly what the
            formula gives on the weights. Elementwise ones (``nearswap``) run on blocks of
            weights; others on whole tensors unless they have a ``block_kernel``.
        min_models, max_models: how many models the method takes besides the base (mergekit's
            input contract); ``max_models=None`` is no limit.
        prepass: for methods that need figures of each whole input before merging any tensor
            (TIES with ``trim_scope: global``): ``prepass(resolved_params)`` returns a
            :class:`~hf_taskarith.merging.prepass.ModelPrepass` that the engine streams every
            tensor through first, and whose per-tensor parameters it adds to those ``fn`` and
            the block kernel receive; or ``None`` where these parameters need none.
    """

    name: str
    fn: MergeFn
    params: tuple[ParamSpec, ...]
    description: str
    reference: str = ""
    randomized: bool = False
    needs_base: bool = True
    elementwise: bool = False
    takes_base: bool = False
    block_kernel: Callable[[dict[str, Any], Any], Any] | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    on_weights: bool = False
    min_models: int = 1
    max_models: int | None = None
    prepass: Callable[[dict[str, Any]], Any] | None = None
    param_index: dict[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})

    def resolve_params(self, n_models: int, given: dict[str, Any]) -> dict[str, Any]:
        """Validate the number of models and the user parameters, and fill defaults; per-model
        ones become lists.

        Raises:
            MergeConfigError: too few or too many models, an unknown or missing parameter, a
                value of the wrong type or outside its range.
        """
        self.check_model_count(n_models)
        unknown = sorted(set(given) - set(self.param_index))
        if unknown:
            raise MergeConfigError(
                f"merge method {self.name!r} does not take parameter(s) {unknown}; valid: "
                f"{sorted(self.param_index)}."
            )
        out: dict[str, Any] = {}
        for spec in self.params:
            value = given.get(spec.name, spec.default)
            if value is REQUIRED:
                raise MergeConfigError(f"merge method {self.name!r} needs parameter {spec.name!r}.")
            if spec.per_model:
                values = value if isinstance(value, (list, tuple)) else [value] * n_models
                if len(values) != n_models:
                    raise MergeConfigError(
                        f"{self.name}: got {len(values)} values for {spec.name!r} but {n_models} models; "
                        "give one value per model, or a single value for all."
                    )
                out[spec.name] = [spec.check_setting(v, f"{self.name} model {i}") for i, v in enumerate(values)]
            else:
                out[spec.name] = spec.check_setting(value, self.name)
        if self.check is not None and not has_schedule(out):  # else per tensor: tensor_params
            self.check(out)
        return out

    def tensor_params(self, params: dict[str, Any], *, tensor_name: str, position: float) -> dict[str, Any]:
        """The resolved parameters of one tensor: every :class:`~.schedule.Gradient` and
        :class:`~.schedule.Conditional` evaluated (mergekit's precedence: a conditional that
        matches nothing gives the default), then the method's ``check`` on the result.

        Args:
            params: from :meth:`resolve_params`.
            tensor_name: the tensor's name (filters are substrings of it).
            position: its position ``t`` among the layers (:func:`~.schedule.layer_positions`).

        Returns:
            ``params`` itself when nothing varies, else a new dict of plain values.

        Raises:
            MergeConfigError: a required parameter no case of a conditional gives for this
                tensor, an interpolated value the parameter does not accept (a fraction for a
                whole number), or what the method's ``check`` refuses (naming the tensor).

        Note:
            Cost: a few Python operations per parameter and model; nothing when no parameter varies.
        """
        if not has_schedule(params):
            return params
        out: dict[str, Any] = {}
        for name, value in params.items():
            spec = self.param_index[name]
            if spec.per_model:
                out[name] = [self._tensor_value(spec, v, tensor_name, position, f" of model {i}")
                             for i, v in enumerate(value)]
            else:
                out[name] = self._tensor_value(spec, value, tensor_name, position, "")
        if self.check is not None:
            try:
                self.check(out)
            except MergeConfigError as e:
                raise MergeConfigError(f"tensor {tensor_name!r} (layer position {position:g}): {e}") from None
        return out

    def _tensor_value(self, spec: ParamSpec, setting: Any, tensor_name: str, position: float, whose: str) -> Any:
        if not is_schedule(setting):
            return setting
        value = evaluate(setting, tensor_name=tensor_name, position=position)
        if value is None:  # no case of a conditional matches: the default
            if spec.default is REQUIRED:
                raise MergeConfigError(
                    f"merge method {self.name!r}: no filter of {spec.name}{whose} ({setting!r}) matches tensor "
                    f"{tensor_name!r}, and {spec.name!r} has no default; add a case without filter (YAML: a "
                    f"mapping with only value:; Python: default=).")
            return spec.default
        return spec.check(value, f"{self.name}, tensor {tensor_name!r}{whose}")


    def check_model_count(self, n_models: int) -> None:
        """Raise :class:`MergeConfigError` unless ``min_models <= n_models <= max_models``."""
        low, high = self.min_models, self.max_models
        if low <= n_models and (high is None or n_models <= high):
            return
        expected = (f"exactly {low}" if low == high else f"at least {low}" if high is None
                    else f"{low} to {high}")
        besides = " besides the base model" if self.needs_base else ""
        listed = " (a model equal to base_model is the base, not one of them)" if self.needs_base else ""
        raise MergeConfigError(
            f"merge method {self.name!r} takes {expected} model{'s' if (high or low) != 1 else ''}{besides}, got "
            f"{n_models}{listed}; list {expected} under models.")


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry; a duplicate name is an error."""
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered.")
    _METHODS[method.name] = method
    return method


def load_builtin_methods(*names: str) -> None:
    """Import the built-in method modules (all, or those named), which register themselves."""
    from .methods import load

    load(*names)


def get_merge_method(name: str) -> MergeMethod:
    """Look up a method by name; unknown names list the valid ones."""
    if name not in _METHODS:  # a built-in method's own module first (cheap), then all of them
        from .methods import BUILTIN

        if name in BUILTIN:
            load_builtin_methods(name)
        if name not in _METHODS:
            load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; available: {sorted(_METHODS)}."
        ) from None


def list_merge_methods() -> list[MergeMethod]:
    load_builtin_methods()
    return [_METHODS[k] for k in sorted(_METHODS)]


# -- parameters shared by many methods ------------------------------------------------
def weight_param(default: Any = 1.0) -> ParamSpec:
    return ParamSpec("weight", default, per_model=True, help="coefficient of each model's task vector")


def density_param(default: Any = 1.0) -> ParamSpec:
    return ParamSpec("density", default, per_model=True, low=0.0, high=1.0, low_open=True,
                     help="fraction of each task vector's entries kept, in (0, 1]")


def lambda_param() -> ParamSpec:
    return ParamSpec("lambda", 1.0, help="scale applied to the merged task vector")
