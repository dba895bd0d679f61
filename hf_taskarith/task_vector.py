"""TaskVector: fine-tuned weights minus pre-trained weights, as a first-class object."""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .delegates import delegate
from .errors import (
    CheckpointNotFoundError,
    IncompatibleBaseError,
    KeyMismatchError,
    ShapeMismatchError,
    TaskArithError,
    format_names,
)
from .io.checkpoints import Checkpoint, open_checkpoint
from .io.fingerprint import fingerprint_checkpoint, fingerprint_state_dict
from .io.writer import atomic_output_dir, save_tensors
from .metadata import CONFIG_NAME, WEIGHTS_PREFIX, TaskVectorMetadata
from .state import float_state_dict

if TYPE_CHECKING:
    from .compression.compressed import DecodedTensors

logger = logging.getLogger(__name__)



class _LazyTensors(Mapping):
    """name -> tensor, read from a checkpoint on each access (nothing cached)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None = None):
        self._ckpt, self._dtype = ckpt, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ckpt:
            raise KeyError(name)
        t = self._ckpt.get_tensor(name)
        return t if self._dtype is None else t.to(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ckpt)

    def __len__(self) -> int:
        return len(self._ckpt)

    def open_range(self, name: str):
        """A range reader of one stored delta (streaming merges); converts dtype if asked."""
        from .io.safetensors_file import RangeReader

        reader = RangeReader(self._ckpt.info(name))
        return reader if self._dtype is None else _ConvertedRange(reader, self._dtype)


class _ConvertedRange:
    """A range reader whose ranges are converted to ``dtype`` (as ``_LazyTensors`` converts whole tensors)."""

    def __init__(self, reader, dtype: torch.dtype):
        self._reader, self.dtype, self.numel = reader, dtype, reader.numel

    def read(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return self._reader.read(start, stop, out).to(self.dtype)

    def close(self) -> None:
        self._reader.close()


class TaskVector(Mapping):
    """A read-only mapping ``parameter name -> delta tensor`` plus provenance metadata.

    Build one with :meth:`from_models`, :meth:`from_state_dicts`, :meth:`from_checkpoints`
    or :meth:`from_pretrained`. Task vectors support ``+``, ``-``, unary ``-``, scalar
    ``*`` and ``/``, and ``sum([...])``; :meth:`norm`, :meth:`dot` and
    :meth:`cosine_similarity` measure them.

    Args:
        deltas: name -> delta tensor (any mapping; may be lazy).
        metadata: provenance; defaults to an empty :class:`TaskVectorMetadata`.

    Example:
        >>> tv = TaskVector.from_models(base, finetuned)
        >>> edited = (0.5 * tv).apply_to(base)
    """

    def __init__(self, deltas: Mapping[str, torch.Tensor], metadata: TaskVectorMetadata | None = None):
        self._deltas = deltas
        self.metadata = metadata or TaskVectorMetadata()

    # -- mapping ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._deltas[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __repr__(self) -> str:
        m = self.metadata
        return (f"TaskVector(tensors={len(self)}, base_model={m.base_model!r}, "
                f"created_with={m.created_with!r})")

    @property
    def lazy(self) -> bool:
        """True when tensors are produced on access (read from disk, or decompressed)."""
        return isinstance(self._deltas, _LazyTensors) or hasattr(self._deltas, "shapes")

    @property
    def compressed(self) -> bool:
        return hasattr(self._deltas, "components")

    def materialize(self) -> TaskVector:
        """Load every tensor into memory (a no-op for in-memory vectors)."""
        return TaskVector({k: v for k, v in self.items()}, self.metadata) if self.lazy else self

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if isinstance(self._deltas, _LazyTensors):
            return {k: self._deltas._ckpt.info(k).shape for k in self}
        if hasattr(self._deltas, "shapes"):  # decoded on access (compressed)
            return self._deltas.shapes()
        return {k: tuple(v.shape) for k, v in self.items()}

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], *,
                         base_model: str | None = None, base_revision: str | None = None,
                         finetuned_model: str | None = None, dtype: torch.dtype | None = torch.float32,
                         created_with: str = "from_state_dicts") -> TaskVector:
        """``finetuned - base`` for every floating-point tensor (tied weights counted once).

        Args:
            base, finetuned: name -> tensor. Both must hold the same float tensor names.
            dtype: dtype of the stored deltas (float32 by default, so bf16 checkpoints
                lose nothing); ``None`` keeps the fine-tuned dtype.

        Raises:
            KeyMismatchError: the float tensor names differ (both sides listed).
            ShapeMismatchError: a tensor has different shapes (each listed).
        """
        b, f = float_state_dict(base), float_state_dict(finetuned)
        _check_same_keys(b.keys(), f.keys(), "base", "fine-tuned")
        _check_same_shapes({k: tuple(v.shape) for k, v in b.items()},
                           {k: tuple(v.shape) for k, v in f.items()}, "base", "fine-tuned")
        deltas = {}
        for k in b:
            work = torch.float64 if torch.float64 in (b[k].dtype, f[k].dtype) else torch.float32
            d = f[k].detach().to(work) - b[k].detach().to(work)
            deltas[k] = d.to(dtype or f[k].dtype)
        meta = TaskVectorMetadata(base_model=base_model, base_revision=base_revision,
                                  base_fingerprint=fingerprint_state_dict(b),
                                  finetuned_model=finetuned_model, created_with=created_with)
        return cls(deltas, meta)

    @classmethod
    def from_models(cls, base: torch.nn.Module, finetuned: torch.nn.Module, **kwargs: Any) -> TaskVector:
        """Task vector between two ``nn.Module`` s (e.g. transformers models).

        The base id and revision are read from ``base.config`` (``_name_or_path`` and
        ``_commit_hash``) when present; pass ``base_model=`` / ``base_revision=`` to override.
        """
        cfg = getattr(base, "config", None)
        kwargs.setdefault("base_model", getattr(cfg, "_name_or_path", None) or None)
        kwargs.setdefault("base_revision", getattr(cfg, "_commit_hash", None))
        fcfg = getattr(finetuned, "config", None)
        kwargs.setdefault("finetuned_model", getattr(fcfg, "_name_or_path", None) or None)
        kwargs.setdefault("created_with", "from_models")
        return cls.from_state_dicts(base.state_dict(), finetuned.state_dict(), **kwargs)

    @classmethod
    def from_checkpoints(cls, base: str | os.PathLike, finetuned: str | os.PathLike, *,
                         base_revision: str | None = None, finetuned_revision: str | None = None,
                         dtype: torch.dtype | None = torch.float32) -> TaskVector:
        """Task vector between two checkpoint folders (single or sharded safetensors) or Hub ids.

        Tensors are read one pair at a time, so peak memory is the resulting deltas plus
        one pair of tensors.
        """
        b, f = open_checkpoint(base, revision=base_revision), open_checkpoint(finetuned, revision=finetuned_revision)
        bi = {k: i for k, i in b.infos().items() if i.is_float}
        fi = {k: i for k, i in f.infos().items() if i.is_float}
        _check_same_keys(bi.keys(), fi.keys(), f"base ({b.path})", f"fine-tuned ({f.path})")
        _check_same_shapes({k: i.shape for k, i in bi.items()}, {k: i.shape for k, i in fi.items()},
                           f"base ({b.path})", f"fine-tuned ({f.path})")
        deltas = {}
        for k in bi:
            d = f.get_tensor(k).to(torch.float32) - b.get_tensor(k).to(torch.float32)
            deltas[k] = d.to(dtype or fi[k].dtype)
        meta = TaskVectorMetadata(base_model=str(base), base_revision=base_revision,
                                  base_fingerprint=fingerprint_checkpoint(b),
                                  finetuned_model=str(finetuned), created_with="from_checkpoints")
        return cls(deltas, meta)

    @classmethod
    def from_peft(cls, model_or_dir: Any, **kwargs: Any) -> TaskVector:
        """A LoRA, L-LoRA or tangent adapter (``PeftModel`` or adapter folder) as a dense task vector.

        LoRA becomes ``scaling * B @ A`` under the base's names (``...query.weight``), so every
        merge method applies. See :func:`hf_taskarith.adapters.convert.task_vector_from_peft`
        for the arguments (``adapter_name=``, ``base_model=``, ``dtype=``).
        """
        return delegate("from_peft")(model_or_dir, **kwargs)

    # -- algebra ----------------------------------------------------------------------
    def _combine(self, other: TaskVector, op, name: str) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        _check_same_keys(self.keys(), other.keys(), "left", "right")
        _check_same_shapes(self.shapes(), other.shapes(), "left", "right")
        fa, fb = self.metadata.base_fingerprint, other.metadata.base_fingerprint
        if fa and fb and fa != fb:
            raise IncompatibleBaseError(
                f"cannot {name} task vectors of different bases: {self.metadata.base_model!r} "
                f"(fingerprint {fa}) and {other.metadata.base_model!r} (fingerprint {fb})."
            )
        meta = (self.metadata if fa else other.metadata).derived("arithmetic")
        return TaskVector({k: op(self[k], other[k]) for k in self}, meta)

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, lambda a, b: a + b, "add")

    def __radd__(self, other: Any) -> TaskVector:
        if isinstance(other, numbers.Number) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, lambda a, b: a - b, "subtract")

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.items()}, self.metadata.derived("arithmetic"))

    def __mul__(self, alpha: float) -> TaskVector:
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
            return NotImplemented
        return TaskVector({k: v * float(alpha) for k, v in self.items()}, self.metadata.derived("arithmetic"))

    __rmul__ = __mul__

    def __truediv__(self, alpha: float) -> TaskVector:
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
            return NotImplemented
        return self * (1.0 / float(alpha))

    def dot(self, other: TaskVector) -> float:
        """Inner product over all shared parameters (float64 accumulation)."""
        _check_same_keys(self.keys(), other.keys(), "left", "right")
        return float(sum(torch.dot(self[k].reshape(-1).double(), other[k].reshape(-1).double()) for k in self))

    def norm(self, p: float = 2.0) -> float:
        """The p-norm of the whole vector (all parameters flattened together)."""
        if p == float("inf"):
            return float(max((v.abs().max() for v in self.values() if v.numel()), default=0.0))
        total = sum(v.double().abs().pow(p).sum() for v in self.values())
        return float(total) ** (1.0 / p)

    def cosine_similarity(self, other: TaskVector) -> float:
        """Cosine of the angle between two task vectors (0.0 if either is zero)."""
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def to(self, dtype: torch.dtype) -> TaskVector:
        return TaskVector({k: v.to(dtype) for k, v in self.items()}, self.metadata)

    # -- persistence ------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                        overwrite: bool = False) -> Path:
        """Write ``task_vector.safetensors`` (sharded when large) and ``task_vector_config.json``.

        The folder appears only when complete (written to a temporary folder, then renamed).
        Returns the folder path.
        """
        self._check_finite()
        config = self.metadata.to_dict()
        tensors: Mapping[str, torch.Tensor] = self
        if self.compressed:  # store the compact parts, decode on load
            decoded = cast("DecodedTensors", self._deltas)
            tensors = decoded.components
            config["extra"]["compression"] = {**config["extra"]["compression"], **decoded.spec()}
        with atomic_output_dir(save_directory, overwrite=overwrite) as tmp:
            save_tensors(tensors, tmp, prefix=WEIGHTS_PREFIX, max_shard_size=max_shard_size,
                         metadata={"format": "hf_taskarith.task_vector"})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        return Path(save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        dtype: torch.dtype | None = None) -> TaskVector:
        """Open a saved task vector lazily: tensors are read from disk only when accessed.

        Args:
            path: a folder written by :meth:`save_pretrained`, or a Hub repo id.
            revision: Hub revision (tag, branch or sha) when ``path`` is a repo id.
            dtype: convert tensors to this dtype on access.

        Raises:
            CheckpointNotFoundError: ``path`` is neither an existing folder nor a valid repo id,
                or the folder holds no task vector config.
            HubError, NotATaskVectorRepoError: for a repo id, as :func:`~hf_taskarith.hub.pull.pull_task_vector`.
        """
        if not Path(path).exists():
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(str(path))
            except HFValidationError:
                raise CheckpointNotFoundError(
                    f"{path}: no such folder, and not a Hub repo id ('namespace/name'). Check the path."
                ) from None
            return delegate("pull")(str(path), revision=revision, dtype=dtype)
        return cls.from_folder(path, dtype=dtype)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    config_label: str | None = None) -> TaskVector:
        """Open a saved task-vector folder lazily (what :meth:`from_pretrained` does for folders).

        Args:
            folder: written by :meth:`save_pretrained` (or a Hub snapshot of one).
            dtype: convert tensors to this dtype on access.
            config_label: how messages name the config (default: its path;
                :func:`~hf_taskarith.hub.pull.pull_task_vector` passes repo, revision and file).
        """
        folder = Path(folder)
        cfg = folder / CONFIG_NAME
        label = config_label or str(cfg)
        if not cfg.is_file():
            raise CheckpointNotFoundError(
                f"{folder} is not a task vector: {CONFIG_NAME} is missing (found "
                f"{sorted(p.name for p in folder.iterdir())[:10]}). To build one from model "
                "checkpoints use TaskVector.from_checkpoints(base, finetuned)."
            )
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TaskArithError(f"{label}: invalid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise TaskArithError(f"{label}: expected a JSON object (task-vector metadata), got a "
                                 f"{type(data).__name__}.")
        meta = TaskVectorMetadata.from_dict(data, source=label)
        tensors: Mapping[str, torch.Tensor] = _LazyTensors(Checkpoint(folder, weights_prefix=WEIGHTS_PREFIX), dtype)
        compression = meta.extra.get("compression")
        if compression and "shapes" in compression:
            from .errors import MergeConfigError
            from .version import __version__

            shapes = compression.pop("shapes")
            parts = _LazyTensors(Checkpoint(folder, weights_prefix=WEIGHTS_PREFIX))  # parts keep their dtypes
            try:
                tensors = delegate("open_compressed")(parts, compression, shapes)
            except MergeConfigError as e:  # e.g. a codec added by a newer version
                raise MergeConfigError(
                    f"{label}: cannot decode this compressed vector: {e} It was written by hf_taskarith "
                    f"{meta.library_version}; this is {__version__}. Upgrade hf_taskarith to read it."
                ) from None
        return cls(tensors, meta)

    def compress(self, method: str = "topk", **params: Any) -> TaskVector:
        """A compressed copy for sharing; see :func:`hf_taskarith.compression.compress`."""
        return delegate("compress")(self, method, **params)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Push to a Hub repo in one commit; see :func:`hf_taskarith.hub.push.push_task_vector`."""
        return delegate("push")(self, repo_id, **kwargs)

    @staticmethod
    def is_task_vector_folder(path: str | os.PathLike) -> bool:
        return (Path(path) / CONFIG_NAME).is_file()

    def _check_finite(self) -> None:
        from .errors import NonFiniteError

        bad = [k for k, v in self.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(f"task vector has NaN/inf in tensors: {format_names(bad)}.")

    # -- application ------------------------------------------------------------------
    def apply_to(self, base: torch.nn.Module | str | os.PathLike, scaling: float = 1.0, *, inplace: bool = False,
                 allow_mismatch: bool = False, allow_negative_variance: bool = False,
                 output_dir: str | os.PathLike | None = None, **merge_kwargs: Any):
        """Add ``scaling * self`` to a base model.

        Args:
            base: an ``nn.Module``: a **new** model is returned and ``base`` is left as it was
                (``inplace=True`` edits ``base`` itself and returns it, without a second copy of
                the weights in memory). Or a checkpoint folder / Hub id: then ``output_dir`` is
                required and an edited checkpoint is written there by the streaming merge
                engine; its path is returned.
            scaling: the coefficient; negative values negate the task.
            inplace: for modules, edit ``base`` instead of a copy (torch's ``add_`` to ``add``).
            allow_mismatch: apply even if the base's fingerprint or some names/shapes do not
                match; mismatched tensors are skipped and reported (logged, and returned in
                ``model.hf_taskarith_apply_report`` for modules).
            allow_negative_variance: for modules, apply even if a normalization layer's running
                variance (``running_var``) becomes negative (extrapolating, e.g. ``scaling=6``);
                the tensors are then named in a warning.

        Raises:
            IncompatibleBaseError: fingerprint, names or shapes differ and ``allow_mismatch``
                is False. The message lists what differs.
            NonFiniteError: a delta holds NaN/inf (or the result overflows), or, for modules, a
                ``running_var`` would become negative; the message names the tensor, and
                nothing is changed or written.
        """
        if isinstance(base, torch.nn.Module):
            return delegate("apply_to_module")(self, base, scaling, inplace=inplace, allow_mismatch=allow_mismatch,
                                               allow_negative_variance=allow_negative_variance)
        if output_dir is None:
            raise TypeError("apply_to(checkpoint_path, ...) writes a new checkpoint: pass output_dir=.")
        if inplace:
            raise TypeError("inplace=True applies to in-memory models only; a checkpoint is written to output_dir.")
        return delegate("merge")(base, [self], method="task_arithmetic", weights=[scaling], output_dir=output_dir,
                                 allow_mismatch=allow_mismatch, **merge_kwargs)


def _check_same_keys(a: Iterable[str], b: Iterable[str], name_a: str, name_b: str) -> None:
    sa, sb = set(a), set(b)
    if sa != sb:
        only_a, only_b = sorted(sa - sb), sorted(sb - sa)
        raise KeyMismatchError(
            f"tensor names differ: only in {name_a}: [{format_names(only_a)}]; only in {name_b}: "
            f"[{format_names(only_b)}]. Both sides must come from the same architecture."
        )


def _check_same_shapes(a: Mapping[str, tuple], b: Mapping[str, tuple], name_a: str, name_b: str) -> None:
    bad = [f"{k}: {list(a[k])} vs {list(b[k])}" for k in a if tuple(a[k]) != tuple(b[k])]
    if bad:
        raise ShapeMismatchError(f"shapes differ between {name_a} and {name_b}: " + "; ".join(bad[:20])
                                 + (f"; ... ({len(bad) - 20} more)" if len(bad) > 20 else ""))
