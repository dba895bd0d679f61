"""Configs of the linearized adapters: :class:`LinearizedLoraConfig` and :class:`TangentConfig`.

Both are :class:`peft.PeftConfig` dataclasses, so ``peft.get_peft_model(model, config)``,
``model.save_pretrained(dir)`` (``adapter_config.json``) and ``peft.PeftModel.from_pretrained``
handle them as any built-in method once :mod:`hf_taskarith.adapters` is imported (see
:mod:`hf_taskarith.adapters.registration`).

Each config records the hf_taskarith version that wrote it and a fingerprint of the base
weights (filled in by ``get_peft_model``); loading an adapter onto another base fails
with :class:`~hf_taskarith.errors.IncompatibleBaseError`. Keys written by a newer version
are dropped with a warning (peft's own forward-compatibility path).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

from packaging.version import InvalidVersion, Version
from peft import PeftConfig

from ..errors import AdapterConfigError
from ..version import __version__

logger = logging.getLogger(__name__)

#: ``peft_type`` strings of the two methods (namespaced, so they cannot collide with peft's own)
LLORA_PEFT_TYPE = "HF_TASKARITH_LLORA"
TANGENT_PEFT_TYPE = "HF_TASKARITH_TANGENT"

Linearization = Literal["model", "layer"]
LINEARIZATIONS: tuple[str, ...] = ("model", "layer")


@dataclass
class _LinearizedAdapterConfig(PeftConfig):
    """Provenance fields shared by the linearized adapter configs."""

    base_model_fingerprint: str | None = field(
        default=None,
        metadata={"help": "Fingerprint of the base weights the adapter was created on (set by get_peft_model); "
                          "loading onto a base with another fingerprint fails."},
    )
    hf_taskarith_version: str | None = field(
        default=None, metadata={"help": "hf_taskarith version that wrote the config (leave empty to auto-fill)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hf_taskarith_version is None:
            self.hf_taskarith_version = __version__
        elif _is_newer(self.hf_taskarith_version):
            logger.warning("%s was written by hf_taskarith %s, newer than this %s; settings it introduced are "
                           "ignored. Upgrade hf_taskarith to use them.", type(self).__name__,
                           self.hf_taskarith_version, __version__)


@dataclass
class LinearizedLoraConfig(_LinearizedAdapterConfig):
    """L-LoRA: LoRA layers linearized around their (non-zero) initialization (Tang et al., ICLR 2024).

    Each targeted ``nn.Linear`` gets frozen random factors ``A0`` (``r x in``) and ``B0``
    (``out x r``) and trainable deltas ``dA``, ``dB`` (zero at init). The layer's weight update
    is the first-order term of LoRA's ``scaling * B A`` around ``(A0, B0)``::

        dW = scaling * (B0 @ dA + dB @ A0)            # linear in (dA, dB): no cross term

    and the constant ``scaling * B0 A0`` is dropped (the output offset is subtracted), so the
    model at init equals the base. Both factors learn: with peft's usual ``B0 = 0`` the term
    ``B0 dA`` would vanish and ``A`` would never move. ``A0`` is drawn like LoRA's ``A``
    (uniform, variance ``1 / (3 in)``), ``B0`` the same way over its own fan (variance
    ``1 / (3 out)``), so ``B0 B0^T`` and ``A0^T A0`` have the same spectrum scale and the two
    factors get gradients of the same size.

    Args:
        r: the rank (``> 0``).
        lora_alpha: ``scaling = lora_alpha / r``.
        target_modules: module names (exact, or a suffix after a ``.``), or one regular expression
            matched against the full module name. Only ``nn.Linear`` modules can be targeted.
            ``None``: peft's LoRA defaults for the architecture (e.g. ``query``/``value`` for BERT).
        exclude_modules: modules never targeted (same forms).
        linearization: ``"model"`` (default; the paper's partial linearization): the whole
            network is linearized in the adapter parameters,
            ``f(x; theta0) + J_phi f(x; theta0) (phi - phi0)``, with the tangent carried through
            every layer after the first adapter (forward-mode AD). ``"layer"``: only each LoRA
            branch is linearized, the network stays non-linear, ``f(x; W0 + dW)``; costs what
            LoRA costs, and task vectors still add without cross terms.
        init_seed: seed of ``A0``/``B0`` (``None``: the global RNG). Adapters trained from the
            same seed share ``(A0, B0)`` and can be merged exactly in adapter space.
        modules_to_save: modules trained ordinarily and saved in full (e.g. a classifier head).
        base_model_fingerprint, hf_taskarith_version: provenance, filled in automatically.

    Raises:
        AdapterConfigError: ``r <= 0``, a non-finite ``lora_alpha`` or an unknown ``linearization``.

    Example:
        >>> import peft, hf_taskarith.adapters
        >>> config = LinearizedLoraConfig(r=8, target_modules=["query", "value"])
        >>> model = peft.get_peft_model(base, config)
        >>> model.save_pretrained("out")      # adapter_config.json + adapter_model.safetensors
    """

    r: int = field(default=8, metadata={"help": "Rank of the adapter (> 0)."})
    lora_alpha: float = field(default=8.0, metadata={"help": "scaling = lora_alpha / r."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or suffixes (list), or a regex over full module names (str); None: "
                          "peft's LoRA defaults for the architecture. Only nn.Linear modules."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never targeted (same forms as target_modules)."}
    )
    linearization: str = field(
        default="model",
        metadata={"help": "'model': the network is linearized in the adapter parameters (Tang et al.); 'layer': "
                          "only each LoRA branch is linearized (costs what LoRA costs)."},
    )
    init_seed: int | None = field(
        default=None, metadata={"help": "Seed of the frozen initial factors A0, B0; None uses the global RNG."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained ordinarily and saved in full (e.g. the classifier)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LLORA_PEFT_TYPE
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r <= 0:
            raise AdapterConfigError(f"r={self.r!r}: the rank must be a positive integer (e.g. r=8).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real) \
                or not math.isfinite(self.lora_alpha):
            raise AdapterConfigError(f"lora_alpha={self.lora_alpha!r} must be a finite number (scaling = "
                                     "lora_alpha / r).")
        if self.linearization not in LINEARIZATIONS:
            raise AdapterConfigError(f"linearization={self.linearization!r} is not one of {list(LINEARIZATIONS)}: "
                                     "'model' linearizes the network in the adapter parameters, 'layer' only each "
                                     "LoRA branch.")
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``."""
        return float(self.lora_alpha) / int(self.r)


@dataclass
class TangentConfig(_LinearizedAdapterConfig):
    """A full-model tangent adapter: :class:`~hf_taskarith.linearize.LinearizedModel` as a peft method.

    The adapter holds ``delta`` for the selected parameters; the model computes
    ``f(x; theta0) + J f(x; theta0) . delta`` (the same forward-mode engine as
    ``LinearizedModel``), and ``save_pretrained`` writes ``delta`` only.

    Args:
        linearize: which trainable parameters get a ``delta``: ``None`` (all), a regular
            expression or a list of them searched in parameter names (as ``LinearizedModel``'s
            ``linearize=``). The others are held at ``theta0``.
        base_model_fingerprint, hf_taskarith_version: provenance, filled in automatically.

    Raises:
        AdapterConfigError: ``linearize`` is not a string or a list of strings.

    Note:
        Costs what ``LinearizedModel`` costs (docs/linearized.md, *Cost, measured*) and stores one full
        copy of the selected parameters. Parameters frozen before ``get_peft_model`` get no
        ``delta`` (e.g. a zero-shot head).

    Example:
        >>> model = peft.get_peft_model(base, TangentConfig(linearize=r"attention"))
    """

    linearize: list[str] | str | None = field(
        default=None,
        metadata={"help": "Regex (or list of regexes) searched in parameter names; None: every trainable parameter."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = TANGENT_PEFT_TYPE
        lin = self.linearize
        if lin is not None and not isinstance(lin, str) and not (
                isinstance(lin, (list, tuple)) and lin and all(isinstance(p, str) for p in lin)):
            raise AdapterConfigError(f"linearize={lin!r}: expected None, a regex string or a non-empty list of "
                                     "regex strings.")
        if isinstance(lin, tuple):
            self.linearize = list(lin)


def _as_set(value):
    """peft's convention: module-name lists are stored as sets, a single string stays a regex."""
    if value is None or isinstance(value, str):
        return value
    return set(value)


def _is_newer(version: str) -> bool:
    try:
        return Version(str(version)) > Version(__version__)
    except InvalidVersion:
        return False
