"""Where a LinearizedModel keeps its weights: theta0 as frozen parameters, deltas as parameters.

The linearization point theta0 stays in the wrapped model as its own parameters, frozen
(``requires_grad=False``), so the wrapped model remains an ordinary transformers model:
``.device``, ``.dtype``, ``num_parameters()``, ``save_pretrained`` and the code transformers
runs on ``.train()`` keep working (parameters turned into buffers, as earlier versions did, break
every transformers method that reads ``next(model.parameters())``). Optimizers built from ``requires_grad`` parameters, as
``Trainer`` builds them, never see theta0. The trainable ``theta - theta0`` lives in a
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


def freeze_parameters(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter of ``model`` (theta0 is a constant)."""
    for p in model.parameters():
        p.requires_grad_(False)
