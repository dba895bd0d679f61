"""The model card written next to a merged checkpoint."""

from __future__ import annotations

import os

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
    base_id = plan.base.label if not os.path.isabs(plan.base.label) else None
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
