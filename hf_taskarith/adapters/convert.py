"""Adapters to dense task vectors, and merging several adapters into one model.

:func:`task_vector_from_peft` turns a LoRA, L-LoRA or tangent adapter (a ``PeftModel`` or a
folder written by ``save_pretrained``) into a :class:`~hf_taskarith.TaskVector` over the base
model's own parameter names (``...attention.self.query.weight``), so every merge method,
``apply_to``, compression and the Hub apply:

* LoRA: ``scaling * B @ A`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA;
  ``rank_pattern``/``alpha_pattern`` honoured; transposed for ``fan_in_fan_out`` and
  embeddings), the dense update peft's ``merge_and_unload`` adds.
* L-LoRA: ``scaling * (B0 @ dA + dB @ A0)``, the linearized update (no ``dB @ dA`` term).
* tangent: ``delta`` as stored.
* ``modules_to_save`` (e.g. a trained classifier head): trained minus original weights (needs
  the base weights: a ``PeftModel``, or ``base_model=`` for a folder).

:func:`merge_adapters` merges in **dense delta space**: each adapter becomes its dense task
vector first, then a merge method combines them tensor by tensor. Adding LoRA factors instead
(``sum_i B_i`` times ``sum_i A_i``) would create cross terms ``B_i A_j`` that no adapter
trained; dense deltas have none.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointNotFoundError, IncompatibleBaseError, KeyMismatchError, format_names
from ..io.fingerprint import fingerprint_state_dict
from ..state import float_state_dict
from .config import LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE

if TYPE_CHECKING:
    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SUPPORTED = ("LORA", LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE)
#: key fragments of adapter entries inside a wrapped base model's state dict
_ADAPTER_MARKERS = (".lora_", ".llora_", ".modules_to_save.")


def task_vector_from_peft(model_or_dir: Any, *, adapter_name: str | None = None,
                          base_model: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                          complete: bool = False) -> TaskVector:
    """A LoRA, L-LoRA or tangent adapter as a dense task vector over the base model's names.

    Args:
        model_or_dir: a ``peft.PeftModel`` or a folder written by its ``save_pretrained``.
        adapter_name: which adapter of a ``PeftModel`` (default: the active one).
        base_model: the base weights, needed for ``modules_to_save`` entries of a folder
            (their delta is trained minus original weights) and used for the fingerprint of a
            plain LoRA folder. Ignored for a ``PeftModel``.
        dtype: dtype of the returned deltas.
        complete: also hold zero deltas for every other floating-point tensor of the base
            (needs the base: a ``PeftModel``, or ``base_model=``), the full name set that
            ``LinearizedModel.from_task_vector`` and merges with differently targeted vectors
            expect. Costs a model-sized block of zeros.

    Returns:
        A :class:`~hf_taskarith.TaskVector` holding the changed weights (the others are
        implicitly zero: ``apply_to`` leaves them unchanged), or all of them with ``complete``.
        Its metadata records the base id, revision and fingerprint (from the config for our
        adapters, computed for LoRA), ``created_with="peft:<type>"`` and the adapter config under ``extra["adapter"]``.

    Raises:
        CheckpointNotFoundError: the folder holds no ``adapter_config.json`` or weights.
        ValueError: an unsupported adapter type or variant (DoRA, convolution LoRA read from a
            folder, ...), or ``modules_to_save`` entries without base weights.

    Note:
        Cost: one ``out x in`` matmul per adapted layer; memory: the dense deltas of the adapted
        layers only.

    Example:
        >>> tv = TaskVector.from_peft("out/lora")          # or from a PeftModel
        >>> merged = merge(base, [tv_a, tv_b], method="ties", weights=[1, 1], output_dir="merged")
    """
    from ..metadata import TaskVectorMetadata
    from ..task_vector import TaskVector

    config, weights, base_state = _read_adapter(model_or_dir, adapter_name, base_model)
    peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    if peft_type not in SUPPORTED:
        raise ValueError(f"cannot convert a {peft_type!r} adapter to a task vector; supported: {list(SUPPORTED)}.")
    deltas = _CONVERTERS[peft_type](config, weights)
    deltas.update(_modules_to_save_deltas(weights, base_state))
    deltas = {k: v.to(dtype) for k, v in deltas.items()}
    if complete:
        if base_state is None:
            raise ValueError("complete=True needs the base weights: pass base_model= (or a PeftModel).")
        unknown = [k for k in deltas if k not in base_state]
        if unknown:
            raise KeyMismatchError(f"the adapter changes tensors the base has not: {format_names(unknown)}.")
        deltas = {k: deltas[k] if k in deltas else torch.zeros(v.shape, dtype=dtype) for k, v in base_state.items()}
    fingerprint = config.get("base_model_fingerprint")
    if fingerprint is None and base_state is not None:
        fingerprint = fingerprint_state_dict(base_state)
    meta = TaskVectorMetadata(base_model=config.get("base_model_name_or_path"), base_revision=config.get("revision"),
                              base_fingerprint=fingerprint, created_with=f"peft:{peft_type}",
                              extra={"adapter": _jsonable(config)})
    return TaskVector(deltas, meta)


def merge_adapters(base_model: nn.Module, adapters: Sequence[Any], *, method: str = "task_arithmetic",
                   weights: Sequence[float] | None = None, seed: int | None = None, allow_mismatch: bool = False,
                   copy_model: bool = True, **params: Any) -> nn.Module:
    """Merge several adapters into one plain model, in dense delta space.

    Args:
        base_model: the base the adapters were trained on (a clean model, not a ``PeftModel``).
        adapters: ``PeftModel`` s, adapter folders or task vectors from :func:`task_vector_from_peft`.
        method: any registered merge method (``task_arithmetic``, ``ties``, ``dare_ties``, ...).
        weights: one coefficient per adapter (default 1 each).
        seed: for randomized methods (DARE).
        allow_mismatch: merge even if an adapter records another base fingerprint.
        copy_model: merge into a deep copy (default) instead of ``base_model`` itself.
        **params: the method's other parameters (``density=``, ``lambda``, ...).

    Returns:
        The merged model (same class as ``base_model``).

    Raises:
        IncompatibleBaseError: an adapter was made on another base and ``allow_mismatch`` is False.
        KeyMismatchError: an adapter changes a tensor the base does not have.
        MergeConfigError: bad method parameters.

    Note:
        Dense space is the default and only space: adapter-space sums of LoRA factors create
        cross terms ``B_i A_j``. For L-LoRA adapters that share ``A0``/``B0`` (same
        ``init_seed``) both spaces agree exactly, since the update is linear in ``(dA, dB)``.
        Cost: one dense delta per adapted tensor per adapter in memory at a time.

    Example:
        >>> merged = merge_adapters(base, ["out/task_a", "out/task_b"], method="ties", density=0.2)
    """
    from ..errors import MergeConfigError
    from ..merging.registry import get_merge_method
    from ..merging.schedule import layer_positions
    from ..task_vector import TaskVector

    if not adapters:
        raise ValueError("merge_adapters needs at least one adapter.")
    merge_method = get_merge_method(method)
    if weights is not None:
        params["weight"] = list(weights)
    resolved = merge_method.resolve_params(len(adapters), params)
    if merge_method.prepass is not None and merge_method.prepass(resolved) is not None:
        raise MergeConfigError(
            f"merge_adapters: method {method!r} with these parameters needs a pass over each whole model before "
            "merging (e.g. ties with trim_scope='global'), which this in-memory helper does not run. Convert the "
            "adapters to task vectors (task_vector_from_peft) and merge them with hf_taskarith.merge(), or choose "
            "parameters that work tensor by tensor.")
    tvs = [a if isinstance(a, TaskVector) else task_vector_from_peft(a, base_model=base_model) for a in adapters]
    state = float_state_dict(base_model)
    fp = fingerprint_state_dict(state)
    for i, tv in enumerate(tvs):
        recorded = tv.metadata.base_fingerprint
        if recorded and recorded != fp:
            msg = (f"adapter {i} was trained on a base with fingerprint {recorded}, not this base ({fp}); merge it "
                   "into the model it was trained on, or pass allow_mismatch=True.")
            if not allow_mismatch:
                raise IncompatibleBaseError(msg)
            logger.warning("allow_mismatch=True: %s", msg)
    names = list(dict.fromkeys(n for tv in tvs for n in tv.keys()))
    unknown = [n for n in names if n not in state]
    if unknown:
        raise KeyMismatchError(f"the adapters change tensors the base has not: {format_names(unknown)}; is "
                               "base_model the model the adapters were trained on "
                               f"(e.g. {format_names(list(state), 5)})?")
    out = copy.deepcopy(base_model) if copy_model else base_model
    target = float_state_dict(out)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    positions = layer_positions(list(target))
    with torch.no_grad():
        for name in names:
            ref = target[name]
            tensor_params = merge_method.tensor_params(resolved, tensor_name=name, position=positions[name])
            base = ref.detach().to(device="cpu", dtype=torch.float32, copy=True)
            deltas = [tv[name].to(torch.float32) if name in tv else torch.zeros(ref.shape) for tv in tvs]
            if merge_method.on_weights:  # slerp, model_stock, ...: the adapters' weights in, merged weights out
                merged = merge_method.fn([d.add_(base) for d in deltas], tensor_params, generator, base=base)
                ref.copy_(merged.to(device=ref.device, dtype=ref.dtype))
                continue
            kw = {"base": base} if merge_method.takes_base else {}
            merged = merge_method.fn(deltas, tensor_params, generator, **kw)
            ref.add_(merged.to(device=ref.device, dtype=ref.dtype))
    return out


# -- reading ----------------------------------------------------------------------------------
def _read_adapter(model_or_dir: Any, adapter_name: str | None, base_model: nn.Module | None):
    """``(config dict, adapter state dict with peft's saved keys, clean base state or None)``."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        cfg_file, w_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not cfg_file.is_file() or not w_file.is_file():
            found = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else "no such folder"
            raise CheckpointNotFoundError(f"{folder} is not a peft adapter folder: need {ADAPTER_CONFIG} and "
                                          f"{ADAPTER_WEIGHTS} (found {found}). Save it with "
                                          "model.save_pretrained(dir) (safe_serialization=True).")
        import safetensors.torch

        config = json.loads(cfg_file.read_text())
        weights = safetensors.torch.load_file(str(w_file))
        base_state = float_state_dict(base_model) if base_model is not None else None
        return config, weights, base_state
    from peft.utils import get_peft_model_state_dict

    peft_config = getattr(model_or_dir, "peft_config", None)
    if not isinstance(peft_config, Mapping):
        raise TypeError(f"model_or_dir must be a peft.PeftModel or an adapter folder; got "
                        f"{type(model_or_dir).__name__}. Wrap the model with peft.get_peft_model first.")
    name = adapter_name or model_or_dir.active_adapter
    if name not in peft_config:
        raise KeyError(f"adapter {name!r} not found; loaded adapters: {list(peft_config)}.")
    if any(getattr(m, "merged", False) for m in model_or_dir.modules() if hasattr(m, "merged_adapters")):
        raise ValueError("the model has merged adapter weights (merge_adapter()); unmerge_adapter() first, so the "
                         "base weights are the base's.")
    config = peft_config[name].to_dict()
    weights = {k: v.detach() for k, v in get_peft_model_state_dict(model_or_dir, adapter_name=name,
                                                                    save_embedding_layers=False).items()}
    return config, weights, _clean_base_state(model_or_dir.get_base_model())


def _clean_base_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a peft-wrapped model, under their original names."""
    out = {}
    for k, v in float_state_dict(base).items():
        if any(m in k for m in _ADAPTER_MARKERS):
            continue
        out[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v
    return out


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


# -- converters: (config, weights) -> {base name: dense delta} ---------------------------------
def _lora(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not linear in their update (the magnitude vector rescales the whole "
                         "weight); merge_and_unload() them and use TaskVector.from_models(base, merged).")
    if config.get("lora_bias"):
        raise ValueError("LoRA adapters with lora_bias=True are not supported; convert with lora_bias=False or use "
                         "TaskVector.from_models(base, model.merge_and_unload()).")
    out = {}
    for key, a in weights.items():
        m = re.fullmatch(r"(.*)\.lora_(embedding_)?A(\.weight)?", key)
        if m is None:
            continue
        module, embedding = m.group(1), bool(m.group(2))
        infix = "embedding_" if embedding else ""
        b = weights[key.replace(f"lora_{infix}A", f"lora_{infix}B")]
        if a.dim() != 2:
            raise ValueError(f"{key}: a {a.dim()}-d LoRA factor (convolution); convert the loaded PeftModel instead "
                             "of its folder, or use TaskVector.from_models(base, model.merge_and_unload()).")
        name = _strip(module)
        work = _work_dtype(a, b)
        delta = (b.to(work) @ a.to(work)) * _lora_scaling(config, name)
        if embedding or config.get("fan_in_fan_out"):
            delta = delta.T
        out[f"{name}.weight"] = delta.contiguous()
    return out


def _lora_scaling(config: Mapping[str, Any], module: str) -> float:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():  # peft's rule: the first pattern matching a suffix of the name
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _llora(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    scaling = float(config["lora_alpha"]) / int(config["r"])
    out = {}
    for key, da in weights.items():
        if not key.endswith(".llora_delta_A"):
            continue
        module = key[: -len(".llora_delta_A")]
        try:
            db, a0, b0 = (weights[f"{module}.{n}"] for n in ("llora_delta_B", "llora_A0", "llora_B0"))
        except KeyError as e:
            raise KeyMismatchError(f"L-LoRA weights for {module!r} are incomplete: {e.args[0]!r} is missing.") from None
        w = _work_dtype(da, db, a0, b0)
        delta = (b0.to(w) @ da.to(w) + db.to(w) @ a0.to(w)) * scaling
        out[f"{_strip(module)}.weight"] = delta
    return out


def _tangent(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "base_model.tangent_delta."
    return {k[len(prefix):]: v.to(_work_dtype(v)) for k, v in weights.items() if k.startswith(prefix)}


_CONVERTERS = {"LORA": _lora, LLORA_PEFT_TYPE: _llora, TANGENT_PEFT_TYPE: _tangent}


def _modules_to_save_deltas(weights: Mapping[str, torch.Tensor],
                            base_state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Trained minus original weights of ``modules_to_save`` entries (saved under the base's names)."""
    entries = {}
    for key, value in weights.items():
        name = _strip(key).replace(".modules_to_save.", ".")
        if any(m in "." + name for m in (".lora_", ".llora_")) or key.startswith("base_model.tangent_delta."):
            continue
        entries[name] = value
    if not entries:
        return {}
    if base_state is None:
        raise ValueError(f"the adapter also trains whole modules (modules_to_save: {format_names(list(entries), 6)}); "
                         "their delta needs the base weights: pass base_model= (the model the adapter was "
                         "trained on).")
    missing = [n for n in entries if n not in base_state]
    if missing:
        raise KeyMismatchError(f"modules_to_save entries {format_names(missing)} are not in the base model.")
    return {n: v.to(_work_dtype(v)) - base_state[n].to(_work_dtype(v)) for n, v in entries.items()}


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is, else float32 (half-precision factors are multiplied in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, set):
            v = sorted(v)
        v = getattr(v, "value", v)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out
