"""The model card written next to a merged checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

from ..cards import render
from ..version import __version__
from .report import MergeReport, MergeSummary


def render_merge_card(summary: MergeSummary, report: MergeReport, *, config_yaml: str | None) -> str:
    weights = summary.params.get("weight")
    inputs = [{"label": label, "weight": (weights[i] if isinstance(weights, list) else None)}
              for i, label in enumerate(summary.input_labels)]
    params = [(k, v) for k, v in summary.params.items() if k != "weight"]
    label = summary.base_label
    is_hub_id = re.match(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", label) and not Path(label).exists()
    base_id = label if is_hub_id else None
    card_data = {"library_name": "transformers", "tags": ["merge", "hf_taskarith", summary.method],
                 "base_model": base_id, "base_model_relation": "merge" if base_id else None}
    return render(
        "merged_model.md", card_data,
        title=f"Merged model ({summary.method})", library_version=__version__,
        method_name=summary.method, method_description=summary.description,
        method_reference=summary.reference, base=summary.base_label, inputs=inputs, params=params,
        seed=summary.seed, dtype=summary.dtype or "same as base",
        report=report.describe(), config_yaml=(config_yaml or "").strip(),
    )
