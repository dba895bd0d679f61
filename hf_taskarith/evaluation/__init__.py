"""Evaluation of task arithmetic: addition, negation, coefficient search, disentanglement, plots."""

from .arithmetic import AdditionResult, NegationResult, normalized, task_addition, task_negation
from .coefficients import learn_coefficients
from .disentanglement import DisentanglementGrid, disentanglement_error
from .editing import EditorView, ModelEditor, TangentEditor, restrict
from .tangent_outputs import TangentOutputs, TangentPoint

__all__ = ["ModelEditor", "TangentEditor", "EditorView", "restrict", "task_addition", "task_negation", "normalized",
           "AdditionResult", "NegationResult", "disentanglement_error", "DisentanglementGrid", "learn_coefficients",
           "TangentOutputs", "TangentPoint"]
