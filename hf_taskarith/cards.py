"""Locating and rendering the packaged model-card templates (``model_cards/``)."""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "model_cards"


def template_path(name: str) -> Path:
    """Path of a packaged template, e.g. ``template_path("merged_model.md")``."""
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in {TEMPLATE_DIR}; "
                                f"available: {sorted(p.name for p in TEMPLATE_DIR.glob('*.md'))}")
    return path


def render(name: str, card_data: dict, **variables) -> str:
    """Render a packaged template with ``huggingface_hub.ModelCard.from_template``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**{k: v for k, v in card_data.items() if v is not None})
    card = ModelCard.from_template(data, template_path=str(template_path(name)), **variables)
    return str(card)
