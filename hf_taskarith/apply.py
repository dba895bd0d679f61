"""Applying a task vector to an in-memory model, with compatibility checks and a report."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import IncompatibleBaseError, NonFiniteError, format_names
from .io.fingerprint import fingerprint_state_dict
from .state import float_state_dict

if TYPE_CHECKING:
    from .task_vector import TaskVector

logger = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    """What happened when a task vector was applied."""

    applied: list[str] = field(default_factory=list)  # the tensors that fit (changed once ``performed``)
    missing_in_base: list[str] = field(default_factory=list)      # in the vector, not in the model
    shape_mismatch: list[str] = field(default_factory=list)       # "name: vector [..] vs model [..]"
    not_in_vector: list[str] = field(default_factory=list)        # float params the vector leaves alone
    fingerprint_expected: str | None = None
    fingerprint_found: str | None = None
    identity_notes: list[str] = field(default_factory=list)  # base id / revision differences
    performed: bool = False  # set once the tensors in ``applied`` were actually changed

    @property
    def fingerprint_ok(self) -> bool:
        return not self.fingerprint_expected or self.fingerprint_expected == self.fingerprint_found

    @property
    def compatible(self) -> bool:
        """Fingerprint (or, when the vector has none, id and revision) match and every tensor fits."""
        identity_ok = bool(self.fingerprint_expected) or not self.identity_notes
        return self.fingerprint_ok and identity_ok and not self.missing_in_base and not self.shape_mismatch

    @property
    def skipped(self) -> list[str]:
        return self.missing_in_base + [s.split(":")[0] for s in self.shape_mismatch]

    def describe(self) -> str:
        n = len(self.applied)
        total = n + len(self.skipped)
        lines = [f"applied {n} tensors" if self.performed else f"{n} of {total} tensors fit"]
        if not self.fingerprint_ok:
            lines.append(f"base fingerprint {self.fingerprint_found} != expected {self.fingerprint_expected}")
        lines += self.identity_notes
        if self.missing_in_base:
            lines.append(f"skipped, not in base: {format_names(self.missing_in_base)}")
        if self.shape_mismatch:
            lines.append(f"skipped, shape mismatch: {'; '.join(self.shape_mismatch[:20])}")
        if self.not_in_vector:
            lines.append(f"left unchanged (not in vector): {format_names(self.not_in_vector)}")
        return "; ".join(lines)


def check_compatibility(tv: TaskVector, base: torch.nn.Module | dict[str, torch.Tensor]) -> ApplyReport:
    """Compare a task vector with a base model without changing anything.

    Checks the weight fingerprint, every tensor's name and shape, and (from ``base.config``)
    the base model id and revision. The fingerprint is decisive: the same weights under
    another name are compatible; when the vector has no fingerprint, a differing id or
    revision makes it incompatible.
    """
    state = float_state_dict(base)
    report = ApplyReport(fingerprint_expected=tv.metadata.base_fingerprint,
                         fingerprint_found=fingerprint_state_dict(state))
    cfg = getattr(base, "config", None)
    meta = tv.metadata
    for what, want, got in (("id", meta.base_model, getattr(cfg, "_name_or_path", None)),
                            ("revision", meta.base_revision, getattr(cfg, "_commit_hash", None))):
        if want and got and want != got:
            report.identity_notes.append(f"base {what} {got!r} differs from the vector's {want!r}")
    shapes = tv.shapes()
    for name, shape in shapes.items():
        if name not in state:
            report.missing_in_base.append(name)
        elif tuple(state[name].shape) != tuple(shape):
            report.shape_mismatch.append(f"{name}: vector {list(shape)} vs model {list(state[name].shape)}")
        else:
            report.applied.append(name)
    report.not_in_vector = [n for n in state if n not in shapes]
    return report


def _updated(tv: TaskVector, state: dict[str, torch.Tensor], name: str, scaling: float) -> torch.Tensor:
    """``state[name] + scaling * tv[name]`` in the parameter's dtype.

    Raises:
        NonFiniteError: the delta, or the result (overflow in the parameter's dtype), holds NaN/inf.
    """
    p = state[name]
    delta = tv[name].to(device=p.device, dtype=torch.float32)
    if not bool(torch.isfinite(delta).all()):
        raise NonFiniteError(
            f"task vector tensor {name!r} contains NaN or inf; nothing was applied. The vector is damaged: "
            "re-create or re-download it (pull_task_vector verifies downloads against the Hub's hashes)."
        )
    new = (p.to(torch.float32) + delta * scaling).to(p.dtype)
    if new.is_floating_point() and not bool(torch.isfinite(new).all()):
        raise NonFiniteError(
            f"applying the task vector with scaling {scaling} makes {name!r} overflow to inf in {p.dtype}; "
            "nothing was applied. Use a smaller scaling or a wider dtype."
        )
    return new


def apply_to_module(tv: TaskVector, model: torch.nn.Module, scaling: float, *, inplace: bool = False,
                    allow_mismatch: bool = False, allow_negative_variance: bool = False) -> torch.nn.Module:
    """``model`` with ``scaling * tv`` added: a new model (a deep copy), or ``model`` itself edited
    when ``inplace``; see :meth:`TaskVector.apply_to`.

    Raises:
        IncompatibleBaseError: see :func:`check_compatibility` (unless ``allow_mismatch``).
        NonFiniteError: a delta holds NaN/inf, a result overflows, or a normalization variance
            (``running_var``) would become negative, making the outputs NaN in eval mode
            (unless ``allow_negative_variance``); the model is left unchanged.

    Note:
        Every tensor is computed twice (a checking pass, then the update), so that a refusal
        leaves the model untouched without holding a second copy of its weights. The copy (not
        ``inplace``) is made only after the checks pass.
    """
    state = float_state_dict(model)
    report = check_compatibility(tv, model)
    problems = not report.compatible
    if problems and not allow_mismatch:
        raise IncompatibleBaseError(
            f"task vector (base {tv.metadata.base_model!r}) does not match this model, so nothing was applied: "
            f"{report.describe()}. Apply it to the base it was made from, or pass "
            "allow_mismatch=True to apply the matching tensors and skip the rest."
        )
    if report.identity_notes and not problems:
        logger.info("base weights match the vector's fingerprint (%s)", "; ".join(report.identity_notes))
    negative_variances = []
    with torch.no_grad():
        for name in report.applied:  # check everything first: a refusal leaves the model unchanged
            new = _updated(tv, state, name, scaling)
            if _is_variance(name) and bool((new < 0).any()):
                negative_variances.append(f"{name} (min {float(new.min()):.3g})")
        if negative_variances and not allow_negative_variance:
            raise NonFiniteError(
                f"applying the task vector with scaling {scaling} makes normalization variances negative in "
                f"{format_names(negative_variances)}: the model's outputs would be NaN in eval mode; nothing was "
                "applied. Use a smaller |scaling|, leave the running statistics out of the vector "
                "(TaskVector({k: v for k, v in tv.items() if 'running_' not in k}, tv.metadata)), or pass "
                "allow_negative_variance=True to apply it anyway."
            )
        if not inplace:
            model = copy.deepcopy(model)
            state = float_state_dict(model)
        for name in report.applied:
            state[name].copy_(_updated(tv, state, name, scaling))
    report.performed = True
    if problems:
        logger.warning("applied task vector with mismatches: %s", report.describe())
    if negative_variances:
        logger.warning("applied the task vector with scaling %s (allow_negative_variance=True): normalization "
                       "variances are negative in %s; the model's outputs will be NaN in eval mode.",
                       scaling, format_names(negative_variances))
    # torch types Module.__setattr__ for tensors and modules only; any value is accepted at runtime
    model.hf_taskarith_apply_report = report  # type: ignore[assignment]
    return model


def _is_variance(name: str) -> bool:
    """A normalization layer's running variance (BatchNorm / InstanceNorm ``running_var``)."""
    return name.rsplit(".", 1)[-1] == "running_var"
