"""Helpers for building linearized models from task vectors and from saved folders.

* :func:`scaled_pairs` normalises the ways :meth:`LinearizedModel.from_task_vector` accepts
  task vectors and coefficients into ``[(task_vector, coefficient), ...]``.
* :func:`check_bases` compares each vector's recorded base (fingerprint, else id/revision)
  with the model it is about to be evaluated on.
* :func:`auto_class_name` and :func:`load_base_model` record and reload the base through
  transformers' Auto classes, so a saved linearized model holds only its task vector.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import IncompatibleBaseError

logger = logging.getLogger(__name__)

#: Auto classes tried, most specific first, when recording how to reload a base model
AUTO_CLASSES = (
    "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForImageClassification",
    "AutoModelForAudioClassification", "AutoModelForZeroShotImageClassification", "AutoModel",
)

TaskVectors = Any
"""A task vector, a list of ``(task_vector, coefficient)`` pairs, or a list of task vectors."""


def scaled_pairs(task_vector: TaskVectors, scaling: float | Iterable[float]) -> list[tuple[Mapping, float]]:
    """``[(vector, coefficient), ...]`` from any accepted form.

    * ``tv, s`` -> ``[(tv, s)]``
    * ``[(tv1, s1), (tv2, s2)], s`` -> ``[(tv1, s * s1), (tv2, s * s2)]``
    * ``[tv1, tv2], [s1, s2]`` -> ``[(tv1, s1), (tv2, s2)]``; ``[tv1, tv2], s`` -> every coefficient ``s``

    Raises:
        TypeError: an unknown form, or a list of coefficients where one number is expected.
        ValueError: no vectors, or as many coefficients as vectors is not given.
    """
    if isinstance(task_vector, Mapping):
        return [(task_vector, _number(scaling, "scaling"))]
    if isinstance(task_vector, (str, bytes, os.PathLike)) or not isinstance(task_vector, Iterable):
        raise TypeError(f"task_vector must be a TaskVector (or name -> tensor mapping), a list of them, or a list "
                        f"of (task_vector, coefficient) pairs; got {type(task_vector).__name__}. Load saved "
                        "vectors with TaskVector.from_pretrained first.")
    items = list(task_vector)
    if not items:
        raise ValueError("task_vector is an empty list; give at least one task vector.")
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], Mapping) for x in items):
        s = _number(scaling, "scaling (with (task_vector, coefficient) pairs, a global factor)")
        return [(tv, s * _number(c, "a pair's coefficient")) for tv, c in items]
    if all(isinstance(x, Mapping) for x in items):
        if isinstance(scaling, numbers.Real):
            return [(tv, float(scaling)) for tv in items]
        coefs = [_number(c, "scaling") for c in scaling]
        if len(coefs) != len(items):
            raise ValueError(f"{len(items)} task vectors but {len(coefs)} scalings; give one per vector, "
                             "or one number.")
        return list(zip(items, coefs))
    kinds = sorted({type(x).__name__ for x in items})
    raise TypeError("task_vector list must hold only task vectors or only (task_vector, coefficient) pairs; "
                    f"got {kinds}.")


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {x!r}.")
    return float(x)


def check_bases(pairs: list[tuple[Mapping, float]], base_model: torch.nn.Module, *, allow_mismatch: bool) -> bool:
    """Check every vector against ``base_model``; returns True when all are compatible.

    Raises:
        IncompatibleBaseError: a vector's base fingerprint (or, without one, id/revision), names
            or shapes differ and ``allow_mismatch`` is False.
    """
    from ..apply import check_compatibility
    from ..task_vector import TaskVector

    ok = True
    for i, (tv, _) in enumerate(pairs):
        if not isinstance(tv, TaskVector):
            continue  # a bare mapping carries no provenance; names and shapes are checked on load
        report = check_compatibility(tv, base_model)
        if report.compatible:
            continue
        ok = False
        where = f"task vector {i}" if len(pairs) > 1 else "the task vector"
        msg = (f"{where} (base {tv.metadata.base_model!r}) does not match base_model: {report.describe()}. "
               "Evaluate it on the base it was trained from, or pass allow_mismatch=True to load the matching "
               "tensors anyway.")
        if not allow_mismatch:
            raise IncompatibleBaseError(msg)
        logger.warning("allow_mismatch=True: %s", msg)
    return ok


def recorded_spec(pairs: list[tuple[Mapping, float]]) -> dict[str, Any]:
    """The linearization settings the vectors were trained with (``linearize``, ``rest``, ``loss_type``).

    Vectors without a record (arithmetic results, ordinary fine-tuning) are ignored.

    Raises:
        ValueError: two vectors record different settings.
    """
    found: dict[str, Any] | None = None
    for tv, _ in pairs:
        spec = getattr(getattr(tv, "metadata", None), "extra", {}).get("linearization")
        if not isinstance(spec, dict):
            continue
        mine = {k: spec.get(k) for k in ("linearize", "rest", "loss_type")}
        mine["rest"] = mine["rest"] or "frozen"
        if found is not None and mine != found:
            raise ValueError(f"the task vectors were trained with different linearization settings ({found} vs "
                             f"{mine}); pass linearize= and rest= explicitly to choose one.")
        found = mine
    return found or {}


def auto_class_name(model: torch.nn.Module) -> str | None:
    """The transformers Auto class that loads ``type(model)`` from its config, or ``None``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return None
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        try:
            if auto is not None and auto._model_mapping[type(config)] is type(model):
                return name
        except (KeyError, AttributeError, ValueError):
            continue
    return None


def load_base_model(meta, override: str | os.PathLike | None,
                    model_kwargs: Mapping[str, Any] | None) -> torch.nn.Module:
    """Load the base a saved task vector records (its Auto class, else its transformers class).

    Args:
        meta: the task vector's :class:`~hf_taskarith.TaskVectorMetadata`.
        override: an id or local folder to load instead of the recorded ``base_model``.
        model_kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``attn_implementation``, ...).

    Raises:
        ValueError: no id is recorded or given, or the model class is not a transformers class.
    """
    import transformers

    spec = meta.extra.get("linearization") or {}
    model_id = str(override) if override is not None else meta.base_model
    if not model_id:
        raise ValueError("the saved task vector records no base model id (the base was built from a config, not "
                         "loaded from a folder or the Hub); pass base_model= (the model, or its id/folder).")
    cls_name = spec.get("auto_class") or spec.get("model_class")
    cls = getattr(transformers, cls_name, None) if cls_name else None
    if cls is None:
        raise ValueError(f"cannot reload the base {model_id!r}: its class {spec.get('model_class')!r} is not a "
                         "transformers class; build the model yourself and pass base_model=.")
    kwargs = dict(model_kwargs or {})
    if override is None and meta.base_revision:
        kwargs.setdefault("revision", meta.base_revision)
    logger.info("loading base %s with %s.from_pretrained", model_id, cls_name)
    return cls.from_pretrained(model_id, **kwargs)
