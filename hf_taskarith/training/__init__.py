"""Training in the tangent space: :class:`LinearizedTrainer`; :func:`train_encoder` fine-tunes a
sentence encoder through a frozen head with it (:mod:`.frozen_head`).

Offline data and models for the demo, the examples and the benchmarks: :mod:`.tasks` and
:mod:`.assets` (pip-packaged data sets and MiniLM), :mod:`.encoders`, :mod:`.heads`.
"""

from .frozen_head import EncoderTrainingResult, FrozenHeadClassifier, train_encoder
from .trainer import LinearizedTrainer

__all__ = ["LinearizedTrainer", "train_encoder", "FrozenHeadClassifier", "EncoderTrainingResult"]
