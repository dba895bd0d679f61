"""Inputs of a merge, each able to produce one tensor (or one delta) at a time.

The base is a :class:`TensorSource` (a checkpoint on disk or an in-memory state dict).
Each merged input is a :class:`DeltaSource`: a fine-tuned model (delta = model - base) or a
task vector (delta stored as is). Everything is read lazily, one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.checkpoints import Checkpoint, resolve_checkpoint_path
from ..io.fingerprint import fingerprint_checkpoint, fingerprint_state_dict
from ..io.safetensors_file import RangeReader
from ..state import dedupe_tied, float_state_dict
from ..task_vector import TaskVector


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]
    dtype: torch.dtype


class MemoryRange:
    """The :class:`~hf_taskarith.io.safetensors_file.RangeReader` interface over a tensor in
    memory: ranges are views, nothing is copied."""

    def __init__(self, tensor: torch.Tensor):
        self._flat = tensor.detach().reshape(-1)
        self.numel, self.dtype = self._flat.numel(), self._flat.dtype

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._flat[start:stop]

    def close(self) -> None:
        pass


class TensorSource:
    """Named tensors with cheap metadata and lazy reads.

    ``fresh`` is True when :meth:`get` returns a new tensor the caller may modify.
    """

    label: str
    folder: Path | None = None
    fresh: bool = False

    def names(self) -> list[str]: ...
    def meta(self, name: str) -> Meta: ...
    def get(self, name: str) -> torch.Tensor: ...
    def fingerprint(self) -> str: ...

    def open_range(self, name: str) -> RangeReader | MemoryRange:
        """A reader of any flat range of the stored tensor (see :mod:`..blockwise`); close it after use."""
        return MemoryRange(self.get(name))


class CheckpointSource(TensorSource):
    fresh = True

    def __init__(self, ckpt: Checkpoint, label: str):
        self.ckpt, self.label, self.folder = ckpt, label, ckpt.folder

    def names(self) -> list[str]:
        return self.ckpt.keys()

    def meta(self, name: str) -> Meta:
        i = self.ckpt.info(name)
        return Meta(i.shape, i.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get_tensor(name)

    def fingerprint(self) -> str:
        return fingerprint_checkpoint(self.ckpt)

    def open_range(self, name: str) -> RangeReader:
        return RangeReader(self.ckpt.info(name))


class StateDictSource(TensorSource):
    def __init__(self, state: Mapping[str, torch.Tensor], label: str):
        self.state, self.label = state, label

    def names(self) -> list[str]:
        return list(self.state)

    def meta(self, name: str) -> Meta:
        t = self.state[name]
        return Meta(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].detach().to("cpu")

    def fingerprint(self) -> str:
        return fingerprint_state_dict(float_state_dict(self.state))


class DeltaSource:
    """One merged input: yields ``delta(name)`` as float32, and the raw tensor it came from."""

    label: str
    source: TensorSource | None  # the model tensors (None for task vectors)

    def __init__(self, label: str):
        self.label = label

    def names(self) -> list[str]: ...
    def meta(self, name: str) -> Meta: ...
    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor: ...
    def raw(self, name: str) -> torch.Tensor: ...

    def open_range(self, name: str) -> RangeReader | MemoryRange:
        """A range reader of the raw tensor (model weights, or stored delta); close it after use."""
        return MemoryRange(self.raw(name))

    #: True when the raw tensor is model weights (delta = weights - base), not a stored delta
    is_model: bool = False
    expected_fingerprint: str | None = None
    base_model: str | None = None


class ModelDelta(DeltaSource):
    """A fine-tuned model; its delta is ``model - base``."""

    is_model = True

    def __init__(self, source: TensorSource):
        super().__init__(source.label)
        self.source = source

    def names(self) -> list[str]:
        return self.source.names()

    def meta(self, name: str) -> Meta:
        return self.source.meta(name)

    def raw(self, name: str) -> torch.Tensor:
        return self.source.get(name)

    def open_range(self, name: str) -> RangeReader | MemoryRange:
        return self.source.open_range(name)

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return torch.sub(self.source.get(name), base)  # promotes to float32, one allocation


class TaskVectorDelta(DeltaSource):
    """A task vector; its delta is stored directly."""

    def __init__(self, tv: TaskVector, label: str):
        super().__init__(label)
        self.tv, self.source = tv, None
        self.expected_fingerprint = tv.metadata.base_fingerprint
        self.base_model = tv.metadata.base_model
        self._shapes = tv.shapes()

    def names(self) -> list[str]:
        return list(self._shapes)

    def meta(self, name: str) -> Meta:
        return Meta(tuple(self._shapes[name]), torch.float32)

    def raw(self, name: str) -> torch.Tensor:
        return self.tv[name]

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.tv[name].to(torch.float32, copy=not self.tv.lazy)

    def open_range(self, name: str) -> RangeReader | MemoryRange:
        store = self.tv._deltas
        if hasattr(store, "open_range"):  # stored on disk: read by range
            return store.open_range(name)
        return MemoryRange(self.tv[name])  # in memory, or decoded whole (compressed)


def open_tensor_source(ref, *, label: str | None = None, revision: str | None = None) -> TensorSource:
    """A base or model reference -> :class:`TensorSource` (paths, Hub ids, modules, state dicts)."""
    if isinstance(ref, TensorSource):
        return ref
    if isinstance(ref, torch.nn.Module):
        name = getattr(getattr(ref, "config", None), "_name_or_path", None) or type(ref).__name__
        return StateDictSource(dedupe_tied(ref.state_dict()), label or name)
    if isinstance(ref, Mapping):
        return StateDictSource(ref, label or "<state dict>")
    path = resolve_checkpoint_path(ref, revision=revision)
    return CheckpointSource(Checkpoint(path), label or str(ref))


def open_delta_source(ref, *, label: str | None = None) -> DeltaSource:
    """A merge input -> :class:`DeltaSource`: a TaskVector, a saved task-vector folder, or a model."""
    if isinstance(ref, DeltaSource):
        return ref
    if isinstance(ref, TaskVector):
        return TaskVectorDelta(ref, label or ref.metadata.finetuned_model or "<task vector>")
    if isinstance(ref, (str, os.PathLike)):
        path = Path(ref)
        if path.is_dir() and TaskVector.is_task_vector_folder(path):
            return TaskVectorDelta(TaskVector.from_pretrained(path), label or str(ref))
        if not path.exists():
            resolved = resolve_checkpoint_path(ref)
            if TaskVector.is_task_vector_folder(resolved):
                return TaskVectorDelta(TaskVector.from_pretrained(resolved), label or str(ref))
            return ModelDelta(CheckpointSource(Checkpoint(resolved), label or str(ref)))
    return ModelDelta(open_tensor_source(ref, label=label))
