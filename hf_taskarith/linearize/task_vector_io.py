"""Task vectors in and out of a :class:`~hf_taskarith.linearize.LinearizedModel`: building one from
vectors or a saved folder, saving it as a vector, and reading ``delta`` as a vector.

A mixin of :class:`~hf_taskarith.linearize.LinearizedModel`, kept apart from the forward pass; it
uses the model's ``_delta_params`` / ``_nonlinear_params`` / ``tv_names`` and its base record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn

from ..errors import KeyMismatchError, ShapeMismatchError, format_names
from ..state import float_state_dict
from .persistence import TaskVectors, check_bases, load_base_model, recorded_spec, scaled_pairs
from .storage import full_tensor

if TYPE_CHECKING:
    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)


class TaskVectorIO:
    """Task-vector constructors, saving and loading of :class:`LinearizedModel`."""

    @classmethod
    def from_task_vector(cls, base_model: nn.Module, task_vector: TaskVectors,
                         scaling: float | Iterable[float] = 1.0, *, allow_mismatch: bool = False,
                         **kwargs: Any) -> Self:
        """The linearized model at ``theta0 + sum_i s_i tau_i``: how tangent-space task vectors are used.

        Evaluates ``f_lin(x; theta0 + sum_i s_i tau_i) = f(x; theta0) + sum_i s_i J tau_i``,
        exactly linear in the coefficients. This differs from ``tv.apply_to(model)``, which
        puts ``theta0 + s tau`` into the *non-linear* model: for a linearized task vector
        that is only a first-order approximation of what was trained (the error grows with
        ``|tau|^2``), but it needs no tangent pass at inference. Both are supported; the
        paper evaluates linearized task vectors with this one.

        Args:
            base_model: the pre-trained model the vectors were trained from (not modified;
                pass ``copy_model=False`` to take it over instead of copying it).
            task_vector: a :class:`~hf_taskarith.TaskVector`, a list of ``(task_vector,
                coefficient)`` pairs, or a list of task vectors.
            scaling: one number (for a list of vectors: every coefficient; for pairs: a
                global factor), or one coefficient per vector.
            allow_mismatch: load even if a vector records another base (fingerprint, or id
                and revision without one), or its names or shapes differ; mismatched tensors
                are skipped and reported in a warning.
            **kwargs: for the constructor (``engine``, ``loss_fn``, ``linearize``, ``rest``,
                ...). ``linearize``, ``rest`` and ``loss_type`` default to what the vectors
                record (a vector trained with ``rest="train"`` has non-linear parts).

        Returns:
            A :class:`LinearizedModel` with ``delta`` (and the ``nonlinear`` parameters) set.

        Raises:
            IncompatibleBaseError: a vector was made from another base and ``allow_mismatch``
                is False.
            KeyMismatchError, ShapeMismatchError: names or shapes differ (not lenient).
            ValueError: a vector has non-zero entries for parameters this model holds
                constant (e.g. it was trained with ``rest="train"`` and ``rest="frozen"`` is
                asked for), or the vectors record different linearization settings.

        Note:
            Cost: the coefficients are summed tensor by tensor into ``delta``; lazily loaded
            vectors are read one tensor at a time. Forward cost is the linearized model's.

        Example:
            >>> lin = LinearizedModel.from_task_vector(base, [(tv_a, 0.5), (tv_b, 0.5)])
            >>> lin = LinearizedModel.from_task_vector(base, [tv_a, tv_b], [0.5, 0.3])
            >>> logits = lin(**batch).logits
        """
        pairs = scaled_pairs(task_vector, scaling)
        compatible = check_bases(pairs, base_model, allow_mismatch=allow_mismatch)
        for key, value in recorded_spec(pairs).items():
            if key not in kwargs and value is not None:
                kwargs[key] = value
        lin = cls(base_model, **kwargs)
        return lin._load_combination(pairs, strict=compatible or not allow_mismatch)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model: nn.Module | str | os.PathLike | None = None, *,
                        revision: str | None = None, allow_mismatch: bool = False,
                        model_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> Self:
        """Rebuild a linearized model saved by :meth:`save_pretrained` (a task vector) on its base.

        Args:
            path: the saved folder (or a Hub repo holding a task vector).
            base_model: the base as a model; or an id/folder to load it from; ``None`` loads
                the recorded ``base_model`` id at its recorded revision with the recorded
                transformers Auto class (falls back to the concrete class).
            revision: Hub revision of ``path``.
            allow_mismatch: see :meth:`from_task_vector`. The base fingerprint is always checked.
            model_kwargs: for the base's ``from_pretrained`` (e.g. ``torch_dtype``).
            **kwargs: for the constructor (``engine``, ``loss_fn``, ...).

        Raises:
            ValueError: ``base_model`` is None and no id (or no transformers class) is recorded.
            IncompatibleBaseError: the loaded base's fingerprint differs (e.g. a classification
                head initialised at random when the id is reloaded; save the base with its
                head and record that folder) and ``allow_mismatch`` is False.

        Example:
            >>> lin.save_pretrained("out/lin")              # the task vector only
            >>> lin = LinearizedModel.from_pretrained("out/lin")                # reloads the base
            >>> lin = LinearizedModel.from_pretrained("out/lin", base_model=base)
        """
        from ..task_vector import TaskVector

        tv = TaskVector.from_pretrained(path, revision=revision)
        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            base_model = load_base_model(tv.metadata, base_model, model_kwargs)
            kwargs.setdefault("copy_model", False)  # nobody else holds the freshly loaded base
        return cls.from_task_vector(base_model, tv, allow_mismatch=allow_mismatch, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False, **extra: Any) -> Path:
        """Write the task vector and a reference to the base, never the base weights.

        The folder holds ``task_vector.safetensors`` (``delta``, and ``theta - theta0`` of
        the ``nonlinear`` parameters, over the wrapped model's names) and
        ``task_vector_config.json`` with the base id, revision and weight fingerprint, the
        transformers class to reload it with, and the linearization settings. Read it back
        with :meth:`from_pretrained`, or as a plain task vector with
        :meth:`TaskVector.from_pretrained <hf_taskarith.TaskVector.from_pretrained>`.

        Args:
            save_directory: the folder (written atomically).
            overwrite: replace an existing folder.
            **extra: recorded in the metadata (``training={...}``, ``metrics={...}``).

        Returns:
            The folder path.

        Raises:
            NonFiniteError: ``delta`` holds NaN or inf (nothing is written).
            FileExistsError: the folder exists and ``overwrite`` is False.
        """
        if not self.base_model:
            logger.warning("LinearizedModel.save_pretrained: no base model id is recorded (the base was built from "
                           "a config); from_pretrained will need base_model=. Pass base_model='id or folder' when "
                           "wrapping to record one.")
        return self.task_vector(**extra).save_pretrained(save_directory, overwrite=overwrite)

    def linearization_record(self) -> dict[str, Any]:
        """The settings recorded in task vectors (``extra["linearization"]``), JSON-serializable."""
        return {"engine": self.engine, "linearize": self._linearize_record, "rest": self.rest,
                "loss_type": self.loss_type, "linearized_parameters": len(self._trainable),
                "nonlinear_parameters": len(self._nonlinear), "model_class": self._model_class,
                "auto_class": self._auto_class}

    def task_vector(self, *, dtype: torch.dtype = torch.float32, **extra: Any) -> TaskVector:
        """``theta - theta0`` as a :class:`~hf_taskarith.TaskVector` over the wrapped model's names.

        ``delta`` for linearized parameters, ``theta - theta0`` for parameters trained
        non-linearly (``rest="train"``), zeros for the rest. Names equal
        ``float_state_dict(model)`` (tied weights once, float buffers and frozen parameters
        included with zero deltas), so ``tv.apply_to(original_model)`` and
        :func:`~hf_taskarith.merge` accept it. The metadata records the base (id, revision,
        fingerprint) and :meth:`linearization_record` under ``extra["linearization"]``;
        ``extra`` is recorded too.
        """
        from ..metadata import TaskVectorMetadata
        from ..task_vector import TaskVector

        deltas = {}
        delta_params, nonlinear_params = self._delta_params, self._nonlinear_params
        for name, ref in self._theta0_state().items():
            d, w, ref = (full_tensor(t) for t in (delta_params.get(name), nonlinear_params.get(name), ref))
            if d is not None:
                deltas[name] = d.detach().to(dtype=dtype, copy=True)
            elif w is not None:
                work = torch.float64 if torch.float64 in (w.dtype, ref.dtype) else torch.float32
                deltas[name] = (w.detach().to(work) - ref.to(work)).to(dtype)
            else:
                deltas[name] = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
        meta = TaskVectorMetadata(base_model=self.base_model, base_revision=self.base_revision,
                                  base_fingerprint=self.base_fingerprint, created_with="linearized",
                                  extra={"linearization": self.linearization_record(), **extra})
        return TaskVector(deltas, meta)

    def load_task_vector(self, tv: Mapping[str, torch.Tensor], *, scaling: float = 1.0,
                         strict: bool = True) -> Self:
        """Set ``delta = scaling * tv`` (and ``nonlinear = theta0 + scaling * tv``); return self.

        Use :meth:`from_task_vector` to build a model from vectors with base checks.

        Raises:
            KeyMismatchError: ``strict`` and the names differ from :meth:`task_vector`'s.
            ShapeMismatchError: ``strict`` and a tensor has another shape.
            ValueError: ``strict`` and ``tv`` is non-zero on a parameter this model holds
                constant (frozen, a float buffer, or left out by ``linearize=`` with
                ``rest="frozen"``). With ``strict=False`` these are skipped with a warning,
                and names absent from ``tv`` are left as they are.
        """
        return self._load_combination([(tv, float(scaling))], strict=strict)

    def load_task_vectors(self, task_vectors: TaskVectors, scaling: float | Iterable[float] = 1.0, *,
                          strict: bool = True) -> Self:
        """Set ``delta = sum_i s_i tau_i`` from several vectors (same forms as :meth:`from_task_vector`).

        Names absent from every vector keep their current ``delta`` when ``strict=False``.
        Raises as :meth:`load_task_vector` does.
        """
        return self._load_combination(scaled_pairs(task_vectors, scaling), strict=strict)

    def _load_combination(self, pairs: list[tuple[Mapping[str, torch.Tensor], float]], *,
                          strict: bool) -> Self:
        expected = set(self.tv_names)
        for tv, _ in pairs:
            if strict and set(tv.keys()) != expected:
                raise KeyMismatchError(
                    f"task vector names differ from this model's: missing [{format_names(sorted(expected - set(tv)))}]"
                    f"; unexpected [{format_names(sorted(set(tv) - expected))}]. Pass strict=False (or "
                    "allow_mismatch=True) to load the overlap.")
        theta0 = self._theta0_state()
        delta_params, nonlinear_params = self._delta_params, self._nonlinear_params
        skipped: list[str] = []
        with torch.no_grad():
            for name in self.tv_names:
                ref = theta0[name]
                present = [(tv, s) for tv, s in pairs if name in tv]
                if not present:
                    continue
                bad = [f"{name}: task vector {list(tv[name].shape)} vs model {list(ref.shape)}"
                       for tv, _ in present if tuple(tv[name].shape) != tuple(ref.shape)]
                if bad:
                    if strict:
                        raise ShapeMismatchError("; ".join(bad) + ". Pass strict=False (or allow_mismatch=True) "
                                                 "to skip mismatched tensors.")
                    skipped += bad
                    continue
                work = torch.float64 if ref.dtype == torch.float64 else torch.float32
                total = sum(tv[name].to(device=ref.device, dtype=work) * s for tv, s in present)
                if name in delta_params:
                    p = delta_params[name]
                    p.copy_(total.to(p.dtype))
                elif name in nonlinear_params:
                    p = nonlinear_params[name]
                    p.copy_((ref.to(work) + total).to(p.dtype))
                elif bool(torch.as_tensor(total).any()):
                    if strict:
                        raise ValueError(
                            f"the task vector changes {name!r}, which this linearized model holds constant (a frozen "
                            "parameter, a float buffer, or one linearize= leaves out with rest='frozen'). Build the "
                            "model with the settings it was trained with (linearize=..., rest='train'), or pass "
                            "strict=False (allow_mismatch=True) to ignore it.")
                    skipped.append(f"{name}: non-zero but held constant")
        if skipped:
            logger.warning("loading task vector: skipped %d tensors: %s", len(skipped), "; ".join(skipped[:20]))
        return self

    def _theta0_state(self) -> dict[str, torch.Tensor]:
        state = float_state_dict(self.model)
        missing = [n for n in self.tv_names if n not in state]
        if missing:  # cannot happen unless the wrapped model was edited after wrapping
            raise KeyMismatchError(f"wrapped model lost tensors since wrapping: {format_names(missing)}.")
        return {n: state[n] for n in self.tv_names}
