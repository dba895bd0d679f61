"""Metadata that every task vector carries: which base it belongs to and how it was made."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from packaging.version import InvalidVersion, Version

from .version import __version__

logger = logging.getLogger(__name__)

FORMAT_NAME = "hf_taskarith.task_vector"
FORMAT_VERSION = 1
#: the file that marks a folder as a saved task vector, and the stem of its weights files
CONFIG_NAME = "task_vector_config.json"
WEIGHTS_PREFIX = "task_vector"


@dataclass
class TaskVectorMetadata:
    """Provenance of a task vector.

    Attributes:
        base_model: Hub id or path of the pre-trained model the vector is relative to.
        base_revision: the base's commit sha, tag or branch, when known.
        base_fingerprint: :mod:`hf_taskarith.io.fingerprint` of the base weights; checked
            before the vector is applied.
        finetuned_model: id or path of the fine-tuned model, when the vector was extracted.
        created_with: how the vector was made (``"from_models"``, ``"from_checkpoints"``,
            ``"linearized"``, ``"arithmetic"``, ...).
        library_version: hf_taskarith version that wrote it.
        extra: free-form details (training hyper-parameters, data, metrics, compression,
            a pulled Hub commit sha, ...). JSON-serializable values only.
    """

    base_model: str | None = None
    base_revision: str | None = None
    base_fingerprint: str | None = None
    finetuned_model: str | None = None
    created_with: str = "unknown"
    library_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TaskVectorMetadata:
        """Read metadata, warning (not failing) on keys from newer library versions."""
        data = dict(data)
        fmt = data.pop("format", FORMAT_NAME)
        if fmt != FORMAT_NAME:
            from .errors import TaskArithError

            raise TaskArithError(f"{source}: format is {fmt!r}, expected {FORMAT_NAME!r}; not a task vector.")
        fmt_version = data.pop("format_version", FORMAT_VERSION)
        known = {f.name for f in fields(cls)}
        unknown = {k: v for k, v in data.items() if k not in known}
        written_by = str(data.get("library_version", "0"))
        newer = _is_newer(written_by)
        if unknown or newer or (isinstance(fmt_version, int) and fmt_version > FORMAT_VERSION):
            logger.warning(
                "%s was written by hf_taskarith %s (format %s); this is %s. Unknown keys kept in "
                "extra['unknown']: %s", source, written_by, fmt_version, __version__, sorted(unknown),
            )
        meta = cls(**{k: v for k, v in data.items() if k in known})
        if unknown:
            meta.extra = {**meta.extra, "unknown": unknown}
        return meta

    def derived(self, created_with: str, **extra: Any) -> TaskVectorMetadata:
        """A copy describing a vector derived from this one (same base)."""
        return TaskVectorMetadata(
            base_model=self.base_model, base_revision=self.base_revision,
            base_fingerprint=self.base_fingerprint, finetuned_model=None,
            created_with=created_with, extra=dict(extra),
        )


def _is_newer(version: str) -> bool:
    try:
        return Version(version) > Version(__version__)
    except InvalidVersion:
        return False
