"""One exception family for the library.

Every error also subclasses the matching built-in exception, so callers can catch
what they already know (``except ValueError``) or everything from this library
(``except TaskArithError``).
"""

from __future__ import annotations


class TaskArithError(Exception):
    """Base class of every error raised by hf_taskarith."""


class CheckpointNotFoundError(TaskArithError, FileNotFoundError):
    """A model folder, checkpoint file or Hub repo could not be found."""


class CorruptCheckpointError(TaskArithError, ValueError):
    """A safetensors file is truncated, has a malformed header, or is otherwise unreadable."""


class KeyMismatchError(TaskArithError, KeyError):
    """Two collections of tensors do not have the same names.

    ``KeyError`` quotes its message when printed; this class prints it plainly.
    """

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(TaskArithError, ValueError):
    """Tensors that should line up have different shapes."""


class IncompatibleBaseError(TaskArithError, ValueError):
    """A task vector was made from a different base model than the one it is applied to."""


class NonFiniteError(TaskArithError, FloatingPointError):
    """A tensor contains NaN or infinity."""


class MergeConfigError(TaskArithError, ValueError):
    """A merge configuration (YAML or keyword arguments) is invalid."""


class MergeArgumentTypeError(MergeConfigError, TypeError):
    """A merge argument has the wrong type (a string where a list of models is expected, ...)."""


class UnknownMethodError(MergeConfigError, KeyError):
    """A merge method name is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def format_names(names, limit: int = 20) -> str:
    """Render a list of tensor names for an error message, truncating long lists."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


class HubError(TaskArithError, RuntimeError):
    """A Hub operation failed (the message names the repo, revision and file)."""


class ConcurrentPushError(HubError):
    """The branch moved while pushing (another push landed first); nothing was overwritten."""


class NotATaskVectorRepoError(HubError, FileNotFoundError):
    """A Hub repo/revision exists but does not hold a task vector."""


class AdapterConfigError(TaskArithError, ValueError):
    """An adapter configuration does not fit the model (unknown target modules, a rank <= 0, ...)."""


class DatasetError(TaskArithError, ValueError):
    """A dataset cannot be used for the task: not found, a missing split or column, unusable labels."""
