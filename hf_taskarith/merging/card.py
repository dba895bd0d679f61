"""The model card written next to a merged checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..cards import render
from ..version import __version__
from .engine import MergePlan, MergeReport


def render_merge_card(plan: MergePlan, report: MergeReport, *, seed: int, dtype: torch.dtype | None,
                      config_yaml: str | None) -> str:
    weights = plan.params.get("weight")
    inputs = [{"label": s.label, "weight": (weights[i] if isinstance(weights, list) else None)}
              for i, s in enumerate(plan.inputs)]
    params = [(k, v) for k, v in plan.params.items() if k != "weight"]
    label = plan.base.label
    is_hub_id = re.match(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", label) and not Path(label).exists()
    base_id = label if is_hub_id else None
    card_data = {"library_name": "transformers", "tags": ["merge", "hf_taskarith", plan.method.name],
                 "base_model": base_id, "base_model_relation": "merge" if base_id else None}
    return render(
        "merged_model.md", card_data,
        title=f"Merged model ({plan.method.name})", library_version=__version__,
        method_name=plan.method.name, method_description=plan.method.description,
        method_reference=plan.method.reference, base=plan.base.label, inputs=inputs, params=params,
        seed=seed, dtype=str(dtype).replace("torch.", "") if dtype else "same as base",
        report=report.describe(), config_yaml=(config_yaml or "").strip(),
    )
