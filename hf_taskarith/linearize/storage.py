"""Where a LinearizedModel keeps its weights: theta0 as buffers, deltas as parameters.

The frozen linearization point theta0 lives in the wrapped model as (persistent) buffers, so
optimizers and ``Trainer`` never see it; the trainable ``theta - theta0`` lives in a
:class:`DeltaTree` at the wrapped model's own dotted names.
"""

from __future__ import annotations

import torch
from torch import nn


class DeltaTree(nn.Module):
    """Holds parameters at the wrapped model's own dotted names (``delta.<name>``, ``nonlinear.<name>``)."""

    def add(self, name: str, value: torch.Tensor) -> nn.Parameter:
        *path, attr = name.split(".")
        mod: nn.Module = self
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        param = nn.Parameter(value)
        mod.register_parameter(attr, param)
        return param


def delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """``delta``'s dtype: the parameter's, but float32 for half precision (a master copy)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_float_parameters(model: nn.Module) -> None:
    params = list(model.named_parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters; there is nothing to linearize.")
    if not any(p.is_floating_point() for _, p in params):
        dtypes = sorted({str(p.dtype).replace("torch.", "") for _, p in params})
        raise ValueError(
            f"{type(model).__name__} has no floating-point parameters (found {dtypes}, e.g. "
            f"{params[0][0]!r}); forward-mode AD and task vectors need float weights. Quantized models must be "
            "loaded unquantized (torch_dtype=torch.float32 or torch.bfloat16) to be linearized.")


def parameters_to_buffers(model: nn.Module) -> None:
    """Turn every parameter of ``model`` into a (persistent) buffer holding the same tensor."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            del module._parameters[name]
            module.register_buffer(name, None if p is None else p.detach(), persistent=True)
