"""The L-LoRA layer: a ``nn.Linear`` plus a LoRA branch linearized around ``(A0, B0)``.

For an input ``x`` (and, in ``"model"`` linearization, its tangent ``x_t``) the layer computes,
with ``s = lora_alpha / r``::

    y   = x W0^T + b0                                   # the base layer, unchanged
    y_t = x_t W0^T + s * x (B0 dA + dB A0)^T            # "model": the tangent of the output
    y   = x W0^T + b0 + s * x (B0 dA + dB A0)^T         # "layer": the update added directly

``B0 dA + dB A0 = [B0, dB] @ [dA; A0]``, so the branch is two plain matmuls of rank ``2r``
(no ``torch.func``): ``x @ [dA; A0]^T`` then ``@ [B0, dB]^T``. The constant ``s B0 A0`` of the
LoRA expansion is dropped, so at init (``dA = dB = 0``) the model equals the base.

In ``"model"`` linearization the layer must run inside the adapter model's forward (a
forward-mode AD level, see :mod:`hf_taskarith.adapters.model`); called on its own it raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

_IN_LINEARIZED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_taskarith_llora", default=False)


@contextlib.contextmanager
def linearized_forward() -> Iterator[None]:
    """Marks the extent of a linearized forward (inside a forward-mode AD level)."""
    token = _IN_LINEARIZED_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_LINEARIZED_FORWARD.reset(token)


def initial_factors(in_features: int, out_features: int, r: int, *, seed: int | None, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)``: ``A0 ~ U(+-1/sqrt(in))`` (``r x in``), ``B0 ~ U(+-1/sqrt(out))`` (``out x r``).

    Drawn in float32 on the CPU (from ``torch.Generator().manual_seed(seed)``, or the global
    RNG for ``seed=None``), so a seed gives the same factors on every device and dtype.
    """
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    a0 = (torch.rand(r, in_features, generator=gen) * 2 - 1) / math.sqrt(in_features)
    b0 = (torch.rand(out_features, r, generator=gen) * 2 - 1) / math.sqrt(out_features)
    return a0.to(device=device, dtype=dtype), b0.to(device=device, dtype=dtype)


class LinearizedLoraLayer(nn.Module, BaseTunerLayer):
    """A ``nn.Linear`` with one or more L-LoRA adapters (peft's tuner-layer protocol).

    Attributes (one entry per adapter name):
        llora_delta_A, llora_delta_B: the trainable deltas ``dA`` (``r x in``), ``dB`` (``out x r``).
        llora_A0, llora_B0: the frozen initial factors (buffers, saved with the adapter).
        r, lora_alpha, scaling, linearization: per-adapter settings.
    """

    adapter_layer_names = ("llora_delta_A", "llora_delta_B")
    other_param_names = ("llora_A0", "llora_B0", "r", "lora_alpha", "scaling", "linearization")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, *, r: int, lora_alpha: float,
                 linearization: str, init_seed: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.llora_delta_A = nn.ParameterDict()
        self.llora_delta_B = nn.ParameterDict()
        self.llora_A0 = BufferDict(persistent=True)
        self.llora_B0 = BufferDict(persistent=True)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.linearization: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, r=r, lora_alpha=lora_alpha, linearization=linearization, init_seed=init_seed)

    def update_layer(self, adapter_name: str, *, r: int, lora_alpha: float, linearization: str,
                     init_seed: int | None = None) -> None:
        """Add adapter ``adapter_name`` (zero deltas, fresh ``A0``/``B0``) and make it active."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype not in (torch.float16, torch.bfloat16) else torch.float32
        a0, b0 = initial_factors(self.in_features, self.out_features, r, seed=init_seed, dtype=dtype,
                                 device=weight.device)
        self.llora_A0[adapter_name] = a0
        self.llora_B0[adapter_name] = b0
        self.llora_delta_A[adapter_name] = nn.Parameter(torch.zeros_like(a0))
        self.llora_delta_B[adapter_name] = nn.Parameter(torch.zeros_like(b0))
        self.r[adapter_name] = int(r)
        self.lora_alpha[adapter_name] = float(lora_alpha)
        self.scaling[adapter_name] = float(lora_alpha) / int(r)
        self.linearization[adapter_name] = linearization
        self.set_adapter(self.active_adapters)

    # -- maths ----------------------------------------------------------------------
    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, U)`` with ``dW = s * U @ V``: ``V = [dA; A0]`` (``2r x in``), ``U = [B0, dB]`` (``out x 2r``)."""
        v = torch.cat([self.llora_delta_A[adapter], self.llora_A0[adapter]], dim=0)
        u = torch.cat([self.llora_B0[adapter], self.llora_delta_B[adapter]], dim=1)
        return v, u

    def branch(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``s * x (B0 dA + dB A0)^T`` for a plain (primal) input."""
        v, u = self._factors(adapter)
        x = x.to(v.dtype)
        return F.linear(F.linear(x, v), u) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense weight update ``s * (B0 dA + dB A0)`` (``out x in``) of one adapter."""
        v, u = self._factors(adapter)
        return (u @ v) * self.scaling[adapter]

    # -- forward --------------------------------------------------------------------
    def _active_here(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.llora_delta_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._active_here()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        layer_mode = [a for a in active if self.linearization[a] == "layer"]
        model_mode = [a for a in active if self.linearization[a] == "model"]
        for a in layer_mode:
            result = result + self.branch(x, a).to(result.dtype)
        if model_mode:
            if not _IN_LINEARIZED_FORWARD.get():
                raise RuntimeError(
                    "an L-LoRA adapter with linearization='model' ran outside its PeftModel's forward (e.g. through "
                    "generate() or the unwrapped base model). The linearized model exists only as a whole; call the "
                    "PeftModel itself, or merge_and_unload() / TaskVector.from_peft(...).apply_to(base) for a "
                    "weight-space model, or train with linearization='layer'.")
            x_p = fwAD.unpack_dual(x).primal
            tangent = sum(self.branch(x_p, a) for a in model_mode)
            y_p, y_t = fwAD.unpack_dual(result)
            tangent = tangent.to(y_p.dtype)
            result = fwAD.make_dual(y_p, tangent if y_t is None else y_t + tangent)
        return result

    # -- merging ----------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``s (B0 dA + dB A0)`` of the adapters to the base weight (exact for ``"layer"``;
        for ``"model"`` the weight-space counterpart of the tangent, a first-order approximation)."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.llora_delta_A
                 and a not in self.merged_adapters]
        weight = self.base_layer.weight
        for a in names:
            delta = self.get_delta_weight(a).detach().to(weight.dtype)
            if safe_merge and not bool(torch.isfinite(weight.data + delta).all()):
                raise ValueError(f"merging adapter {a!r} into {type(self.base_layer).__name__} gives NaN/inf; "
                                 "the adapter weights are broken.")
            weight.data += delta
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        """Subtract the merged adapters again."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            weight.data -= self.get_delta_weight(a).detach().to(weight.dtype)

    def __repr__(self) -> str:
        return "llora." + super().__repr__()
