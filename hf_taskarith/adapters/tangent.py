"""The full-model tangent tuner: :class:`~hf_taskarith.linearize.LinearizedModel` as a peft method.

``peft.get_peft_model(model, TangentConfig(...))`` builds a :class:`TangentModel`. It holds one
``delta`` per selected parameter of the base, per adapter, at the base's own dotted names
(``base_model.tangent_delta.<adapter>.<param name>``; saved without the adapter name), and its
forward is the linearized model ``f(x; theta0) + J f(x; theta0) . delta``, computed by
:func:`hf_taskarith.linearize.linearized_call`. Unlike ``LinearizedModel`` the base keeps its
parameters (frozen): the peft life cycle (``save_pretrained``, ``PeftModel.from_pretrained``,
``disable_adapter()``, ``merge_and_unload()``) works on the untouched model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..linearize.attention import make_attention_jvp_safe
from ..linearize.functional import swapped_parameters
from ..linearize.kernels import disable_hub_kernels
from ..linearize.selection import select_parameters
from ..linearize.storage import DeltaTree as _DeltaTree
from .config import TangentConfig
from .forward import LinearizedForwardHooks
from .model import check_base_fingerprint

logger = logging.getLogger(__name__)

DELTA_ATTR = "tangent_delta"


class DeltaTree(_DeltaTree):
    """Parameters at a model's dotted names (``a.b.weight`` -> submodule ``a.b``, parameter ``weight``)."""

    def flat(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())


class TangentStatus(BaseTunerLayer, nn.Module):
    """A parameter-free tuner layer reporting the tangent adapters' state to peft.

    peft's ``disable_adapter()``, ``get_model_status()`` and ``get_layer_status()`` look for
    ``BaseTunerLayer`` modules; the tangent tuner injects none (its deltas live on the tuner),
    so this one stands for all of them: enabled or not, active and available adapters.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, tuner: TangentModel) -> None:
        nn.Module.__init__(self)
        self.__dict__["_tuner"] = tuner  # not a submodule: no cycle in named_modules()

    @property
    def disable_adapters(self) -> bool:
        return not self._tuner._enabled

    @property
    def active_adapters(self) -> list[str]:
        return list(self._tuner.active_adapters)

    @property
    def merged_adapters(self) -> list[str]:
        return []

    def enable_adapters(self, enabled: bool) -> None:
        self._tuner._enabled = bool(enabled)

    def _get_available_adapters(self) -> set[str]:
        return set(self._tuner.peft_config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("TangentStatus only reports state; it is never called.")


class TangentModel(BaseTuner):
    """peft tuner for :class:`~hf_taskarith.adapters.TangentConfig` (``peft_type="HF_TASKARITH_TANGENT"``).

    Note:
        The wrapped model stays in ``eval()`` (dropout off at theta0). Several adapters may be
        loaded; the active ones' deltas are summed (the model is linear in them).
        ``merge_and_unload()`` adds ``delta`` to the weights: the weight-space (first-order)
        counterpart of the linearized model, as ``TaskVector.apply_to``. ``generate()`` is not
        supported (it bypasses the forward); merge first.
    """

    prefix: str = "tangent_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True  # the deltas live on the tuner, not in injected layers

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._enabled = True
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- injection ----------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        """Create the ``delta`` of ``adapter_name`` (zeros) for the parameters ``config.linearize`` selects."""
        config: TangentConfig = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        check_base_fingerprint(self, model, config)
        if DELTA_ATTR not in self._modules:
            self._canonical = _canonical_names(model)
            self._trainable = [n for n, p in self._canonical_params(model).items()
                               if p.requires_grad and p.is_floating_point()]
            disable_hub_kernels(model)  # before any mode switch; kernels have no tangent rule
            make_attention_jvp_safe(model)
            model.requires_grad_(False)
            model.eval()
            self.add_module(DELTA_ATTR, nn.ModuleDict())
            self.add_module("tangent_status", TangentStatus(self))
            self.__dict__["_hf_taskarith_hooks"] = LinearizedForwardHooks(model, self._active, self._dual_parameters)
        if not self._trainable:
            raise ValueError(f"{type(model).__name__} has no trainable floating-point parameter (all had "
                             "requires_grad=False before get_peft_model); nothing to linearize.")
        params = self._canonical_params(model)
        selected = select_parameters({n: self._canonical[n] for n in self._trainable},
                                     {n: params[n] for n in self._trainable}, config.linearize)
        tree = DeltaTree()
        for name in selected:
            w = params[name]
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            tree.add(name, torch.zeros(w.shape, dtype=dtype, device=w.device))
        getattr(self, DELTA_ATTR)[adapter_name] = tree
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _canonical_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: model.get_parameter(n) for n in self._canonical}

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - not module-based
        raise NotImplementedError("TangentModel holds its deltas on the tuner; no module is replaced.")

    def _prepare_adapter_config(self, peft_config: TangentConfig, model_config: dict) -> TangentConfig:
        return peft_config

    # -- adapters -------------------------------------------------------------------------
    def deltas(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """Name (the base model's) -> ``delta`` of one adapter (default: the first active one)."""
        name = adapter_name or self.active_adapters[0]
        return getattr(self, DELTA_ATTR)[name].flat()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for key, tree in getattr(self, DELTA_ATTR).items():
            tree.requires_grad_(key in names and not inference_mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key in names:
            getattr(self, DELTA_ATTR)[key].requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._enabled = enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; loaded: {list(self.peft_config)}.")
        del self.peft_config[adapter_name]
        del getattr(self, DELTA_ATTR)[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = list(self.peft_config)
            self.active_adapter = remaining[:1] or []

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f"{DELTA_ATTR}.{adapter_name}.", f"{DELTA_ATTR}.", 1)

    def _active_deltas(self) -> dict[str, torch.Tensor]:
        trees = getattr(self, DELTA_ATTR)
        total: dict[str, torch.Tensor] = {}
        for name in self.active_adapters:
            if name not in trees:
                continue
            for k, d in trees[name].flat().items():
                total[k] = d if k not in total else total[k] + d
        return total

    # -- forward --------------------------------------------------------------------------
    def _active(self) -> bool:
        return self._enabled and bool(self._active_deltas())

    @contextlib.contextmanager
    def _dual_parameters(self) -> Iterator[None]:
        """Inside the AD level: every linearized parameter slot holds ``make_dual(theta0, delta)``."""
        params = self._canonical_params(self.model)
        values = {n: fwAD.make_dual(params[n], d if d.dtype == params[n].dtype else d.to(params[n].dtype))
                  for n, d in self._active_deltas().items()}
        aliases = {n: self._canonical[n] for n in values if self._canonical[n]}
        with swapped_parameters(self.model, values, aliases):
            yield

    def train(self, mode: bool = True) -> TangentModel:
        """The wrapped model stays in ``eval()`` (dropout off at the linearization point)."""
        super().train(mode)
        self.model.eval()
        return self

    # -- unloading ------------------------------------------------------------------------
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Add the adapters' ``delta`` to the weights and return the base model (weight-space model)."""
        names = adapter_names or self.active_adapters
        params = self._canonical_params(self.model)
        with torch.no_grad():
            for name in names:
                for k, d in self.deltas(name).items():
                    new = params[k] + d.to(params[k].dtype)
                    if safe_merge and not bool(torch.isfinite(new).all()):
                        raise ValueError(f"merging adapter {name!r} gives NaN/inf in {k!r}.")
                    params[k].copy_(new)
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove the adapters and return the base model unchanged."""
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


def _canonical_names(model: nn.Module) -> dict[str, list[str]]:
    """First name -> other names, for every parameter (tied weights once)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names[1:] for names in by_id.values()}
