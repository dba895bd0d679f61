"""The fine-tuning modes the studies compare, and how each one's task vectors are edited.

One table, so the regime map, the disentanglement map and anything reading their results agree
on which vectors live in the tangent space and which comparisons are paired:

- ``nonlinear``: ordinary fine-tuning, edited in weight space;
- ``linear``: tangent-space fine-tuning (:class:`~hf_taskarith.LinearizedModel`), edited in the
  tangent space;
- ``lora``: a LoRA adapter trained as usual, edited in weight space;
- ``llora``: L-LoRA (a linearized LoRA adapter), edited in the tangent space.
"""

from __future__ import annotations

#: mode -> (how the encoder is trained: "nonlinear" or "linear", adapter kind or None)
MODES: dict[str, tuple[str, str | None]] = {
    "nonlinear": ("nonlinear", None), "linear": ("linear", None),
    "lora": ("nonlinear", "lora"), "llora": ("linear", "llora"),
}
#: modes whose task vectors are added and negated in the tangent space
TANGENT_MODES = frozenset(m for m, (training, _) in MODES.items() if training == "linear")
#: paired comparisons over seeds, reported when both modes ran: (a, b) means "a - b"
PAIRS = (("linear", "nonlinear"), ("llora", "lora"))
