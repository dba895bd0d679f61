"""Where a LinearizedModel keeps its weights: theta0 as frozen parameters, deltas as parameters.

The linearization point theta0 stays in the wrapped model as its own parameters, frozen
(``requires_grad=False``), so the wrapped model remains an ordinary transformers model:
``.device``, ``.dtype``, ``num_parameters()``, ``save_pretrained`` and the code transformers
runs on ``.train()`` keep working (parameters turned into buffers, as earlier versions did, break
every transformers method that reads ``next(model.parameters())``). Optimizers built from
``requires_grad`` parameters, as ``Trainer`` builds them, never see theta0. The trainable ``theta - theta0`` lives in a
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


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor behind a sharded ``DTensor`` (FSDP2's parameters; a collective: every rank
    must call it), or ``t`` itself."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def check_unsharded(params: dict[str, torch.Tensor]) -> None:
    """Refuse parameters still sharded when the linearized forward starts.

    The forward reads every ``theta0`` and ``delta`` before the wrapped model runs, so FSDP must
    shard the :class:`LinearizedModel` as one unit (``fully_shard(lin)``, accelerate's
    ``--fsdp_auto_wrap_policy NO_WRAP``); units inside it (per transformer layer) are gathered
    only when their own forward runs, too late for the linearized call.

    Raises:
        ValueError: naming a sharded parameter and the fix.
    """
    sharded = next((n for n, p in params.items() if hasattr(p, "full_tensor")), None)
    if sharded is not None:
        raise ValueError(
            f"parameter {sharded!r} is still sharded (a DTensor) when the linearized forward starts: FSDP wrapped "
            "a submodule of the LinearizedModel separately. Shard the LinearizedModel as one unit: "
            "fully_shard(lin) only, or with accelerate/Trainer fsdp_config={'auto_wrap_policy': 'NO_WRAP'} "
            "(accelerate launch --fsdp_auto_wrap_policy NO_WRAP).")


def is_sharded(module: nn.Module) -> bool:
    """Whether any trainable parameter of ``module`` is a sharded ``DTensor`` (FSDP2)."""
    return any(hasattr(p, "full_tensor") for p in module.parameters() if p.requires_grad)


def trained_weights(lin: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The ``delta.*`` and ``nonlinear.*`` tensors of a LinearizedModel (theta0 is never saved),
    whole and on CPU: what a delta checkpoint holds. Sharded tensors are gathered (a collective:
    call on every rank). ``state_dict``: an already gathered one (``Trainer`` under FSDP)."""
    state = state_dict if state_dict is not None else lin.state_dict()
    trained = {f"{tree}.{n}" for tree in ("delta", "nonlinear") for n, _ in getattr(lin, tree).named_parameters()}
    return {k: full_tensor(v).detach().contiguous().cpu() for k, v in state.items() if k in trained}
