"""Training in the tangent space: :class:`LinearizedTrainer`."""

from .trainer import LinearizedTrainer

__all__ = ["LinearizedTrainer"]
