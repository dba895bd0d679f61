"""The model card written next to a merged checkpoint.

Its metadata lists every Hub id among the base and the inputs under ``base_model`` (local
paths are not Hub ids), with ``base_model_relation: merge``, as mergekit's cards do, so the
Hub shows the merge in each parent's model tree. The title is the config's ``name``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..cards import render
from ..version import __version__
from .report import MergeReport, MergeSummary


def is_hub_id(label: str) -> bool:
    """True if ``label`` names a Hub repo (``org/name`` or ``name``) rather than a local path.

    A label that exists on disk, starts like a path (``/``, ``~``, ``.``) or is not a valid
    repo id (spaces, ``<state dict>``, two slashes) is not a Hub id.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.1-8B"), is_hub_id("/models/base"), is_hub_id("model 0")
        (True, False, False)
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not label or label[0] in "/~." or "\\" in label or Path(label).exists():
        return False
    try:
        validate_repo_id(label)
    except HFValidationError:
        return False
    return True


def hub_parents(labels: Iterable[str]) -> list[str]:
    """The Hub ids among ``labels``, in order, each once (the card's ``base_model`` list)."""
    return list(dict.fromkeys(label for label in labels if is_hub_id(label)))


def render_merge_card(summary: MergeSummary, report: MergeReport, *, config_yaml: str | None,
                      name: str | None = None) -> str:
    """The merged model's card (``README.md``).

    Args:
        summary, report: what the merge was asked to do and what it did.
        config_yaml: the merge config, shown in the card.
        name: the title (default ``Merged model (METHOD)``).

    Returns:
        The card's text: YAML metadata (``base_model`` lists the Hub parents), then Markdown.
    """
    weights = summary.params.get("weight")
    inputs = [{"label": label, "weight": (weights[i] if isinstance(weights, list) else None)}
              for i, label in enumerate(summary.input_labels)]
    params = [(k, v) for k, v in summary.params.items() if k != "weight"]
    parents = hub_parents([summary.base_label, *summary.input_labels])
    card_data = {"library_name": "transformers", "tags": ["merge", "hf_taskarith", summary.method],
                 "base_model": parents or None, "base_model_relation": "merge" if parents else None}
    return render(
        "merged_model.md", card_data,
        title=name or f"Merged model ({summary.method})", library_version=__version__,
        method_name=summary.method, method_description=summary.description,
        method_reference=summary.reference, base=summary.base_label, inputs=inputs, params=params,
        seed=summary.seed, dtype=summary.dtype or "same as base",
        report=report.describe(), config_yaml=(config_yaml or "").strip(),
    )
