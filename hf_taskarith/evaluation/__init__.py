"""Evaluation of task arithmetic: addition, negation, coefficient search, disentanglement, plots."""

from .arithmetic import AdditionResult, NegationResult, choose_negation, normalized, task_addition, task_negation
from .coefficients import learn_coefficients
from .disentanglement import DisentanglementGrid, disentanglement_error
from .editing import EditorView, ModelEditor, TangentEditor, restrict
from .tangent_outputs import TangentOutputs, TangentPoint

__all__ = ["ModelEditor", "TangentEditor", "EditorView", "restrict", "task_addition", "task_negation",
           "choose_negation", "normalized", "AdditionResult", "NegationResult", "disentanglement_error",
           "DisentanglementGrid", "learn_coefficients", "TangentOutputs", "TangentPoint"]
