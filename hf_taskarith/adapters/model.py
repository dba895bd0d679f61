"""The L-LoRA tuner: injects :class:`~hf_taskarith.adapters.layer.LinearizedLoraLayer` and runs the forward.

``peft.get_peft_model(model, LinearizedLoraConfig(...))`` builds a :class:`LinearizedLoraModel`
(peft's ``BaseTuner`` protocol). With ``linearization="model"`` its forward evaluates

    ``f_lin(x) = f(x; theta0) + J_phi f(x; theta0) . (phi - phi0)``

in one forward-mode AD pass (the engine of :mod:`hf_taskarith.linearize`): the primal runs at
the base weights, the L-LoRA layers inject the closed-form tangent of their branch, and every
later layer carries it. With ``linearization="layer"`` it is an ordinary forward.

Strict by default: every entry of ``target_modules`` must match a module (the error lists the
``nn.Linear`` names that exist), and an adapter created on one base refuses another
(fingerprint of the base weights).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import AdapterConfigError, IncompatibleBaseError
from ..io.fingerprint import fingerprint_state_dict
from ..linearize.attention import make_attention_jvp_safe
from ..linearize.kernels import disable_hub_kernels
from ..state import float_state_dict
from .config import LinearizedLoraConfig
from .forward import LinearizedForwardHooks
from .layer import LinearizedLoraLayer

logger = logging.getLogger(__name__)


def check_base_fingerprint(tuner: BaseTuner, model: nn.Module, config: Any) -> None:
    """Record the base's fingerprint in ``config``, or check it against the recorded one.

    The fingerprint is taken once per tuner, on the clean model (before the first adapter is
    injected), so later adapters are compared with the same base.

    Raises:
        IncompatibleBaseError: ``config`` records another base.
    """
    fp = tuner.__dict__.get("_hf_taskarith_base_fingerprint")
    if fp is None:
        fp = fingerprint_state_dict(float_state_dict(model))
        tuner.__dict__["_hf_taskarith_base_fingerprint"] = fp
    recorded = config.base_model_fingerprint
    if recorded is None:
        config.base_model_fingerprint = fp
    elif recorded != fp:
        raise IncompatibleBaseError(
            f"this {type(config).__name__} adapter was created on a base with weight fingerprint {recorded} "
            f"(base_model_name_or_path={config.base_model_name_or_path!r}), but the model it is loaded onto has "
            f"{fp}: another checkpoint, or the same one with a different (e.g. randomly initialised) head. Load the "
            "base the adapter was trained on. To load it anyway, read the config with "
            "peft.PeftConfig.from_pretrained(dir), set config.base_model_fingerprint = None, and pass config=.")


def module_candidates(model: nn.Module, kind: type | tuple[type, ...] = nn.Linear) -> list[str]:
    """The distinct last name components of ``kind`` modules (what ``target_modules`` may name)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, kind) and not isinstance(module, BaseTunerLayer) and name:
            last = name.rsplit(".", 1)[-1]
            if last not in names:
                names.append(last)
    return names


def matches_target(target_modules: Any, key: str) -> bool:
    """peft's convention: a string is a regex over the full name; a list names modules or suffixes."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith("." + t) for t in target_modules)


class LinearizedLoraModel(BaseTuner):
    """peft tuner for :class:`~hf_taskarith.adapters.LinearizedLoraConfig` (``peft_type="HF_TASKARITH_LLORA"``).

    Built by ``peft.get_peft_model`` / ``peft.PeftModel.from_pretrained``; not meant to be
    constructed directly. ``merge_and_unload()`` adds ``s (B0 dA + dB A0)`` to each targeted
    weight: exact for ``linearization="layer"``, the weight-space (first-order) counterpart
    for ``"model"``.

    Note:
        ``linearization="model"``: the wrapped model stays in ``eval()`` (dropout off at the
        linearization point), attention is made jvp-safe (eager or SDPA), and ``generate()`` is not
        supported (untested; merge first). Gradient
        checkpointing is not supported.
    """

    prefix: str = "llora_"
    tuner_layer_cls = LinearizedLoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- injection ------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: LinearizedLoraConfig, adapter_name: str) -> None:
        check_base_fingerprint(self, model, config)
        self._resolve_targets(model, config)
        if config.linearization == "model":
            disable_hub_kernels(model)  # before any mode switch; kernels have no tangent rule
            make_attention_jvp_safe(model)
            model.eval()

    def _resolve_targets(self, model: nn.Module, config: LinearizedLoraConfig) -> None:
        linear = module_candidates(model)
        if config.target_modules is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

            model_type = getattr(getattr(model, "config", None), "model_type", None)
            found = defaults.get(model_type)
            if found is None:
                raise AdapterConfigError(
                    f"no default target_modules for model type {model_type!r}; pass target_modules= (names of "
                    f"nn.Linear modules, e.g. {linear[:12]}).")
            config.target_modules = set(found)
        names = [n for n, _ in model.named_modules() if n]
        if isinstance(config.target_modules, str):
            unmatched = [] if any(matches_target(config.target_modules, n) for n in names) else [config.target_modules]
        else:
            unmatched = sorted(t for t in config.target_modules if not any(matches_target([t], n) for n in names))
        if unmatched:
            raise AdapterConfigError(
                f"target_modules {unmatched} match no module of {type(model).__name__}. nn.Linear modules that can "
                f"be targeted: {linear}. Give module names or suffixes (e.g. ['query', 'value']) or one regex over "
                "full names (e.g. r'.*\\.attention\\.self\\.(query|value)').")

    def _prepare_adapter_config(self, peft_config: LinearizedLoraConfig, model_config: dict) -> LinearizedLoraConfig:
        return peft_config  # targets were resolved (strictly) in _pre_injection_hook

    @staticmethod
    def _check_target_module_exists(peft_config: LinearizedLoraConfig, key: str) -> bool:
        if matches_target(peft_config.exclude_modules, key):
            return False
        if peft_config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key)
                                               for m in peft_config.modules_to_save):
            return False
        return matches_target(peft_config.target_modules, key)

    def _create_and_replace(self, peft_config: LinearizedLoraConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        settings = dict(r=peft_config.r, lora_alpha=peft_config.lora_alpha,
                        linearization=peft_config.linearization, init_seed=_layer_seed(peft_config.init_seed,
                                                                                        current_key))
        if isinstance(target, LinearizedLoraLayer):
            target.update_layer(adapter_name, **settings)
            return
        if not isinstance(target, nn.Linear):
            raise AdapterConfigError(
                f"target module {current_key!r} is a {type(target).__name__}; L-LoRA adapts nn.Linear layers only. "
                f"Targetable names: {module_candidates(self.model)}; use exclude_modules= to skip this one.")
        new = LinearizedLoraLayer(target, adapter_name, **settings)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _check_new_adapter_config(self, config: LinearizedLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        modes = {c.linearization for c in self.peft_config.values()}
        if len(modes) > 1:
            raise AdapterConfigError(f"all L-LoRA adapters of one model must use the same linearization; got "
                                     f"{sorted(modes)}. Load them into separate models.")

    # -- forward ----------------------------------------------------------------------
    @property
    def linearization(self) -> str:
        """``"model"`` or ``"layer"`` (the same for every adapter of this model)."""
        return next(iter(self.peft_config.values())).linearization

    def _post_injection_hook(self, model: nn.Module, config: LinearizedLoraConfig, adapter_name: str) -> None:
        if config.linearization == "model" and "_hf_taskarith_hooks" not in self.__dict__:
            self.__dict__["_hf_taskarith_hooks"] = LinearizedForwardHooks(model, self._adapters_active)

    def _adapters_active(self) -> bool:
        for module in self.model.modules():
            if isinstance(module, LinearizedLoraLayer):
                return not module.disable_adapters and not module.merged
        return False

    def train(self, mode: bool = True) -> LinearizedLoraModel:
        """In ``"model"`` linearization the wrapped model stays in ``eval()`` (dropout off at theta0)."""
        super().train(mode)
        if self.peft_config and self.linearization == "model":
            self.model.eval()
        return self


def _layer_seed(seed: int | None, key: str) -> int | None:
    """A per-layer seed derived from the adapter's ``init_seed`` and the module name (stable across runs)."""
    if seed is None:
        return None
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63)
