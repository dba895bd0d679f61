"""The model card pushed with a task vector (rendered from ``model_cards/task_vector.md``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..cards import render
from ..version import __version__

if TYPE_CHECKING:
    from ..task_vector import TaskVector

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def render_task_vector_card(tv: TaskVector, *, repo_id: str, revision: str | None = None,
                            license: str = "apache-2.0") -> str:
    """Render the card: base model metadata, how the vector was trained, metrics, usage."""
    m = tv.metadata
    extra = dict(m.extra)
    training = sorted((k, v) for k, v in (extra.get("training") or {}).items())
    metrics = sorted((k, v) for k, v in (extra.get("metrics") or {}).items())
    compression = sorted((k, v) for k, v in (extra.get("compression") or {}).items())
    base_id = m.base_model if m.base_model and _HUB_ID.match(m.base_model) else None
    card_data = {
        "library_name": "hf_taskarith", "license": license,
        "tags": ["task-vector", "task-arithmetic", "hf_taskarith"]
        + (["linearized"] if m.created_with == "linearized" else []),
        "base_model": base_id, "base_model_relation": "adapter" if base_id else None,
    }
    return render(
        "task_vector.md", card_data,
        title=repo_id.split("/")[-1], base_model=m.base_model or "unknown", base_revision=m.base_revision,
        library_version=__version__, created_with=m.created_with,
        linearized="yes" if m.created_with == "linearized" or extra.get("linearized") else "no",
        base_fingerprint=m.base_fingerprint or "unknown", n_tensors=len(tv), n_params=f"{tv.numel():,}",
        norm=f"{tv.norm():.4g}", training=training, metrics=metrics, compression=compression,
        repo_id=repo_id, revision=revision, license=license,
    )
