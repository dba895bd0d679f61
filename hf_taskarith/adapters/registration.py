"""Teaching peft about our two methods: the only place that touches peft's internals.

peft has no public way for an outside package to add a tuner type: ``register_peft_method``
accepts only names already in its ``PeftType`` enum. What it does accept is a plain string
``peft_type``: every lookup peft makes on the way through ``get_peft_model``,
``save_pretrained`` and ``PeftModel.from_pretrained`` is a dict lookup keyed by the type
(``PeftType`` is a ``str`` enum, so ``"LORA"`` and ``PeftType.LORA`` are the same key), and
``adapter_config.json`` stores the type as a string. So :func:`register` adds our
(namespaced) strings to peft's four registries, exactly what ``register_peft_method`` would
have written for an enum member:

* ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``: ``"HF_TASKARITH_LLORA"`` ->
  :class:`LinearizedLoraConfig`, ``"HF_TASKARITH_TANGENT"`` -> :class:`TangentConfig`
* ``PEFT_TYPE_TO_TUNER_MAPPING``: -> :class:`LinearizedLoraModel`, :class:`TangentModel`
* ``PEFT_TYPE_TO_PREFIX_MAPPING``: -> ``"llora_"``, ``"tangent_"``

No enum is extended and no peft function is replaced. Registration runs on
``import hf_taskarith.adapters`` and is idempotent (a second call is a no-op; a *different*
class already registered under our key is an error).

Supported peft versions: 0.21.0 and newer, the first release whose save and load delegate to
the tuner class (``BaseTuner._get_adapter_state_dict`` and friends), so that no per-method
branch in ``save_and_load.py`` needs to know our type. 0.20 and older lack those hooks and are
refused with a clear ``ImportError``. Tested with peft 0.21.0 and 0.21.2.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: the oldest peft whose save/load paths delegate to the tuner class (checked by feature, see below)
MIN_PEFT_VERSION = "0.21.0"

_REGISTERED = False


def _methods():
    from .config import LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE, LinearizedLoraConfig, TangentConfig
    from .model import LinearizedLoraModel
    from .tangent import TangentModel

    return [(LLORA_PEFT_TYPE, LinearizedLoraConfig, LinearizedLoraModel),
            (TANGENT_PEFT_TYPE, TangentConfig, TangentModel)]


def check_peft_supported() -> None:
    """Raise ``ImportError`` when the installed peft lacks what registration relies on."""
    import peft
    import peft.mapping as mapping
    from peft.tuners.tuners_utils import BaseTuner

    missing = [name for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                                 "PEFT_TYPE_TO_PREFIX_MAPPING") if not isinstance(getattr(mapping, name, None), dict)]
    missing += [f"BaseTuner.{name}" for name in ("_get_adapter_state_dict", "_remove_adapter_name_from_key",
                                                 "_remap_adapter_state_dict_for_load") if not hasattr(BaseTuner, name)]
    if missing:
        raise ImportError(
            f"hf_taskarith.adapters needs peft >= {MIN_PEFT_VERSION} (tested with 0.21.0 and 0.21.2); "
            "the installed peft "
            f"{peft.__version__} lacks {missing}. Upgrade with: pip install -U 'peft>={MIN_PEFT_VERSION}'.")


def register() -> None:
    """Add our methods to peft's registries (idempotent).

    Raises:
        ImportError: the installed peft is too old (see :data:`MIN_PEFT_VERSION`).
        RuntimeError: another class is already registered under one of our ``peft_type`` keys.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    check_peft_supported()
    import peft.mapping as mapping

    for peft_type, config_cls, tuner_cls in _methods():
        for table, value in ((mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
                             (mapping.PEFT_TYPE_TO_TUNER_MAPPING, tuner_cls),
                             (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, tuner_cls.prefix)):
            current = table.get(peft_type)
            if current is not None and current is not value and _qualname(current) != _qualname(value):
                raise RuntimeError(f"peft already has {current!r} registered as {peft_type!r}; hf_taskarith's "
                                   f"{_qualname(value)} cannot be registered. Is another package using this name?")
            table[peft_type] = value
        logger.debug("registered peft_type %r -> %s", peft_type, tuner_cls.__name__)
    _REGISTERED = True


def is_registered() -> bool:
    """Whether :func:`register` has run in this process."""
    return _REGISTERED


def _qualname(obj) -> str:
    if isinstance(obj, str):
        return obj
    return f"{obj.__module__}.{obj.__qualname__}"
