"""The typed schema of a merge YAML file (pydantic v2), and its JSON schema for editors.

The schema checks *structure and types* only: which keys exist, that ``models`` is a list of
``{model, parameters}``, that a parameter value has one of mergekit's forms, that ``seed`` is
a non-negative integer, ... What a merge method accepts (parameter names, ranges, how many
models) is checked by the method's :class:`~hf_taskarith.merging.registry.ParamSpec` s, not
here. A parameter value may be::

    weight: 0.5                                  # a scalar (number, true/false, string)
    weight: [0.2, 0.5, 0.8]                      # a per-layer gradient (list of scalars)
    weight: {filter: self_attn, value: 0.2}      # a value for tensors whose name contains filter
    weight:                                      # several, first match wins; no filter = the rest
      - {filter: self_attn, value: [0.2, 0.8]}
      - {value: 0.5}

(mergekit's ``ConditionalParameter``). These are passed on *verbatim* (plain lists and dicts).

:func:`validate_config` turns every mistake into one line of one
:class:`~hf_taskarith.errors.MergeConfigError` (where, what was received, what was expected),
without pydantic's tracebacks or links. :func:`json_schema` gives the JSON schema
(``docs/merge_config.schema.json``; ``hf-taskarith merge --print-schema``).

Note:
    Validation is pure Python on the parsed YAML (microseconds per key); the schema imports
    neither torch nor the merge methods.

Example:
    >>> cfg = validate_config({"merge_method": "ties", "base_model": "b",
    ...                        "models": [{"model": "a", "parameters": {"density": 0.5}}]})
    >>> cfg.models[0].model
    'a'
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    model_validator,
)

from ..errors import MergeConfigError

#: JSON schema dialect written into the generated schema
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: output dtype names (the keys of ``hf_taskarith.merging.api.DTYPES``)
DTYPE_NAMES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "float64")
#: mergekit keys we refuse, and why (each a one-line error)
UNSUPPORTED_KEYS = {"tokenizer": "tokenizer blocks are not supported; use tokenizer_source",
                    "modules": "per-module configs are not supported; merge whole models (models:) or layer ranges "
                               "(slices:)"}

Scalar = bool | int | float | str
"""A scalar parameter value (YAML number, true/false, or string)."""


class ConditionalValue(BaseModel):
    """A parameter value for the tensors whose name contains ``filter`` (mergekit's ``ConditionalParameter``)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = Field(None, description="substring of tensor names this value applies to; none or '*': all")
    value: Scalar | list[Scalar] = Field(description="a scalar, or a per-layer gradient (list of scalars)")


#: the forms a parameter value may take (used for the JSON schema; validated by _check_parameter_value)
ParameterForms = Scalar | list[Scalar] | ConditionalValue | list[ConditionalValue]

_SCALAR = (bool, int, float, str)
_PARAM_EXPECTED = ("a number, true/false, a string, a list of those (a per-layer gradient), or "
                   "{filter: ..., value: ...} mappings")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _check_conditional(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{where}got {_describe(item)}; expected a mapping {{filter: ..., value: ...}}")
    extra = sorted(set(item) - {"filter", "value"}, key=str)
    if extra:
        raise ValueError(f"{where}unknown key(s) {extra}; a conditional value has 'filter' (optional) and 'value'")
    if "value" not in item:
        raise ValueError(f"{where}needs a 'value' key, e.g. {{filter: self_attn, value: 0.5}}")
    if item.get("filter") is not None and not isinstance(item["filter"], str):
        raise ValueError(f"{where}filter must be a string (part of tensor names) or absent, got "
                         f"{_describe(item['filter'])}")
    value = item["value"]
    if not (isinstance(value, _SCALAR) or (isinstance(value, list) and value
                                            and all(isinstance(v, _SCALAR) for v in value))):
        raise ValueError(f"{where}value must be a scalar or a non-empty list of scalars, got {_describe(value)}")


#: a number in exponent notation without a decimal point (``1e-3``), which YAML 1.1 (PyYAML)
#: reads as a string but YAML 1.2, JSON and mergekit users read as a number
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(value: Any) -> Any:
    """``"1e-3"`` -> ``0.001`` (see :data:`_EXPONENT_NUMBER`); anything else unchanged."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _numbers(value: Any) -> Any:
    """:func:`_yaml_number` over a scalar, a gradient, or conditional values (a new object)."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: (_numbers(v) if k == "value" else v) for k, v in value.items()}
    return _yaml_number(value)


def _check_parameter_value(value: Any) -> Any:
    """Accept mergekit's parameter forms (numbers written ``1e-3`` become numbers, as in YAML 1.2);
    one clear ValueError otherwise."""
    if isinstance(value, _SCALAR):
        return _yaml_number(value)
    if isinstance(value, dict):
        _check_conditional(value, "")
        return _numbers(value)
    if isinstance(value, list) and value:
        if all(isinstance(v, _SCALAR) for v in value):
            return _numbers(value)
        if all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                _check_conditional(item, f"entry [{i}]: ")
            return _numbers(value)
        raise ValueError(f"got {_describe(value)}, a list mixing scalars and mappings; expected a list of scalars "
                         "(a gradient) or a list of {filter: ..., value: ...} mappings")
    if isinstance(value, list):
        raise ValueError("got an empty list; expected one value, or a non-empty list (a per-layer gradient)")
    raise ValueError(f"got {_describe(value)}; expected {_PARAM_EXPECTED}")


ParameterValue = Annotated[Any, PlainValidator(_check_parameter_value, json_schema_input_type=ParameterForms)]
Parameters = dict[str, ParameterValue]


def _check_model_ref(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"got {_describe(value)}; expected a local path or a Hub id (a non-empty string)")


ModelRef = Annotated[str, PlainValidator(_check_model_ref, json_schema_input_type=str)]


def _check_seed(value: Any) -> int:
    from .config import parse_seed

    try:
        return parse_seed(value)
    except MergeConfigError as e:
        raise ValueError(str(e)) from None


def _check_tokenizer_source(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"got {_describe(value)}; expected 'base', 'union', one of the config's models, or null")


def _check_shard_size(value: Any) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"got {_describe(value)}; expected a size such as 5GB or 500MB, or a number of bytes")


def _check_chat_template(value: str | None) -> str | None:
    if value is not None:
        from .chat_template import check_chat_template

        check_chat_template(value)
    return value


def _check_layer_range(value: Any) -> tuple[int, int]:
    ints = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ints or len(value) != 2:
        raise ValueError(f"got {_describe(value)}; expected two layer indices [start, end]")
    start, end = value
    if start < 0 or end <= start:
        raise ValueError(f"[{start}, {end}] is empty or negative; expected [start, end] with 0 <= start < end "
                         "(end excluded)")
    return start, end


def _bare_model_entry(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


class InputModel(BaseModel):
    """One entry of ``models:``: a model (path or Hub id) and its own parameters."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef = Field(description="local checkpoint folder, saved task vector folder, or Hub id")
    parameters: Parameters | None = Field(None, description="this model's parameters (weight, density, ...)")


class InputSlice(BaseModel):
    """One source of a slice: layers ``[start, end)`` of a model."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef = Field(description="local checkpoint folder or Hub id")
    layer_range: Annotated[tuple[int, int], PlainValidator(_check_layer_range, json_schema_input_type=tuple[
        Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]])] = Field(
        description="[start, end): the layers taken, end excluded")
    parameters: Parameters | None = Field(None, description="this source's parameters")



class OutputSlice(BaseModel):
    """One slice of the output (mergekit frankenmerges): its sources are merged into consecutive layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice] = Field(min_length=1, description="the layer ranges merged into this slice")
    parameters: Parameters | None = Field(None, description="parameters shared by this slice's sources")


class MergeConfigSchema(BaseModel):
    """A merge configuration file (mergekit-compatible YAML)."""

    model_config = ConfigDict(extra="forbid", title="hf_taskarith merge configuration")
    merge_method: str = Field(description="a registered merge method: task_arithmetic, ties, dare_ties, slerp, ... "
                                          "(hf-taskarith methods lists them)")
    base_model: ModelRef | None = Field(None, description="the pre-trained model: local folder or Hub id")
    models: list[Annotated[InputModel, BeforeValidator(
        _bare_model_entry, json_schema_input_type=ModelRef | InputModel)]] | None = Field(
        None, description="the models merged: {model: ..., parameters: {...}} (or a bare path / Hub id)")
    slices: list[OutputSlice] | None = Field(
        None, description="layer ranges to merge and stack (frankenmerges); instead of models")
    parameters: Parameters | None = Field(None, description="parameters shared by every model (normalize, lambda, "
                                                            "t, ...); a model's own ones win")
    dtype: Literal[DTYPE_NAMES] | None = Field(None, description="output dtype (maths always runs in float32)")
    out_dtype: Literal[DTYPE_NAMES] | None = Field(None, description="output dtype; wins over dtype")
    tokenizer_source: Annotated[str | None, PlainValidator(
        _check_tokenizer_source, json_schema_input_type=Literal["base", "union"] | str | None)] = Field(
        "base", description="whose tokenizer (and vocabulary size) the output takes: 'base', one of the models, "
                            "'union', or null")
    chat_template: Annotated[str | None, AfterValidator(_check_chat_template)] = Field(
        None, description="chat template written into the output's tokenizer: 'auto', a built-in name (alpaca, "
                          "chatml, exaone, llama3, mistral) or a Jinja template")
    name: str | None = Field(None, description="the merged model's name (the title of its model card)")
    seed: Annotated[int, PlainValidator(_check_seed, json_schema_input_type=Annotated[int, Field(ge=0)])] = Field(
        0, description="seed of randomized methods (DARE, DELLA); hf_taskarith extension")
    max_shard_size: Annotated[str | int, PlainValidator(_check_shard_size, json_schema_input_type=str | int)] \
        = Field("5GB", description="output shard size (5GB, 500MB, or bytes); hf_taskarith extension")

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfigSchema:
        if self.models is not None and self.slices is not None:
            raise ValueError("config has both models: and slices:; give one: models to merge whole models, "
                             "slices to merge and stack layer ranges")
        if self.slices is None and not self.models:
            raise ValueError("config needs a non-empty models: list of {model: ..., parameters: {...}} "
                             "(or slices: for layer ranges)")
        return self


def validate_config(data: Any) -> MergeConfigSchema:
    """Validate parsed YAML against :class:`MergeConfigSchema`.

    Args:
        data: the parsed YAML (a mapping).

    Returns:
        The validated configuration.

    Raises:
        MergeConfigError: one line per mistake: where (``models[1].parameters.density``), what
            was received, what was expected.
    """
    if not isinstance(data, dict):
        raise MergeConfigError(f"merge config must be a mapping, got {type(data).__name__}.")
    try:
        return MergeConfigSchema.model_validate(data)
    except ValidationError as e:
        lines = error_lines(e, data)
    if len(lines) == 1:
        raise MergeConfigError(lines[0])
    raise MergeConfigError(f"merge config has {len(lines)} mistakes:\n" + "\n".join(f"  - {x}" for x in lines))


def json_schema() -> dict[str, Any]:
    """The JSON schema of a merge YAML file, for editors (``yaml-language-server``) and linters.

    Returns:
        A JSON-serializable dict (draft 2020-12).
    """
    schema = MergeConfigSchema.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


# -- pydantic errors -> one line each ---------------------------------------------------
def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields(loc: tuple[Any, ...]) -> list[str]:
    """The keys valid at ``loc`` (the model that holds the unknown key)."""
    model: type[BaseModel] = MergeConfigSchema
    for part in loc:
        if isinstance(part, int):
            continue
        nested = _NESTED.get(part)
        if nested is None:  # a conditional value's keys are checked by _check_conditional
            return []
        model = nested
    return list(model.model_fields)


_NESTED: dict[str, type[BaseModel]] = {"models": InputModel, "slices": OutputSlice, "sources": InputSlice}


def _unknown_line(loc: tuple[Any, ...], keys: list[str]) -> str:
    valid = _fields(loc)
    hints = [m for k in keys for m in difflib.get_close_matches(str(k), valid, n=1)]
    hint = f" Did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""
    if not loc:
        return f"unknown config key(s) {keys}; valid keys: {sorted(valid)}.{hint}"
    return f"{_where(loc)}: unknown key(s) {keys}; valid: {sorted(valid)}.{hint}"


_EXPECTED = {"string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
             "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
             "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
             "model_attributes_type": "a mapping", "tuple_type": "a list [start, end]"}


def _line(err: dict[str, Any]) -> str:
    loc, kind = tuple(err["loc"]), err["type"]
    where = _where(loc) or "config"
    got = _describe(err.get("input"))
    if kind == "missing":
        if loc == ("merge_method",):
            return "config needs merge_method (e.g. task_arithmetic, ties, dare_ties)."
        return f"{_where(loc[:-1]) or 'config'}: needs a {loc[-1]!r} key."
    if kind == "value_error":
        message = str(err["ctx"]["error"]).rstrip(".") + "."
        if not loc or message.startswith(f"{where} "):  # parse_seed names the key itself
            return message
        return f"{where}: {message}"
    if kind == "literal_error":
        return f"{where}: got {got}; expected one of {err['ctx']['expected']}."
    if kind == "too_short" and loc and loc[-1] == "sources":
        return f"{where}: empty; list at least one {{model: ..., layer_range: [start, end]}}."
    if kind in ("model_type", "model_attributes_type", "dict_type") and len(loc) == 2 and loc[0] == "models":
        return f"{where}: got {got}; expected a path / Hub id, or a mapping {{model: ..., parameters: {{...}}}}."
    if kind in _EXPECTED:
        return f"{where}: got {got}; expected {_EXPECTED[kind]}."
    return f"{where}: {err['msg']} (got {got})."


def error_lines(error: ValidationError, data: Any) -> list[str]:
    """One line per mistake in a pydantic ``ValidationError`` (unknown keys of a mapping grouped)."""
    lines: list[str] = []
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            if len(loc) == 1 and loc[0] in UNSUPPORTED_KEYS:
                lines.append(f"config key {loc[0]!r}: {UNSUPPORTED_KEYS[loc[0]]}.")
                continue
            unknown.setdefault(loc[:-1], []).append(loc[-1])
            continue
        lines.append(_line(err))
    lines[:0] = [_unknown_line(loc, keys) for loc, keys in unknown.items()]
    return list(dict.fromkeys(lines))
