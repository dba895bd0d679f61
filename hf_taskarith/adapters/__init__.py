"""PEFT-style linearized adapters: L-LoRA and full-model tangent adapters, through peft's own API.

Importing this package registers two peft methods (see :mod:`.registration`):

* :class:`LinearizedLoraConfig` (``peft_type="HF_TASKARITH_LLORA"``): LoRA linearized around a
  non-zero initialization (Tang et al., ICLR 2024), trained at about LoRA's cost.
* :class:`TangentConfig` (``peft_type="HF_TASKARITH_TANGENT"``): the full linearized model
  (:class:`~hf_taskarith.linearize.LinearizedModel`) with peft's life cycle.

Both work with ``peft.get_peft_model``, ``model.save_pretrained`` and
``peft.PeftModel.from_pretrained``. :func:`task_vector_from_peft` (also
``TaskVector.from_peft``) turns a LoRA, L-LoRA or tangent adapter into a dense task vector,
and :func:`merge_adapters` merges several adapters into one model in dense delta space.

Example:
    >>> import peft
    >>> from hf_taskarith.adapters import LinearizedLoraConfig
    >>> model = peft.get_peft_model(base, LinearizedLoraConfig(r=8, target_modules=["query", "value"]))
    >>> ...  # train with Trainer or LinearizedTrainer
    >>> model.save_pretrained("out/llora")
    >>> tv = TaskVector.from_peft("out/llora")       # names of base weights, e.g. "...query.weight"
"""

from .config import LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE, LinearizedLoraConfig, TangentConfig
from .registration import register

register()

from .convert import merge_adapters, task_vector_from_peft  # noqa: E402
from .layer import LinearizedLoraLayer  # noqa: E402
from .model import LinearizedLoraModel  # noqa: E402
from .tangent import TangentModel  # noqa: E402

__all__ = [
    "LinearizedLoraConfig", "TangentConfig", "LinearizedLoraModel", "TangentModel", "LinearizedLoraLayer",
    "task_vector_from_peft", "merge_adapters", "is_linearized_adapter", "LLORA_PEFT_TYPE", "TANGENT_PEFT_TYPE",
]


def is_linearized_adapter(model) -> bool:
    """True for a ``PeftModel`` whose active adapter is an L-LoRA or tangent adapter."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "peft_type", None) in (LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE)
