"""Stage 4, export: back to plain Hugging Face weights, or to a PEFT LoRA adapter; one module per format.

- :mod:`~corda_kernels.export.plain`: :func:`merge` folds every adapter into its layer
  (``W' + scale·delta``) and restores plain ``nn.Linear`` / ``Conv1D`` modules, so
  ``save_pretrained`` writes an ordinary checkpoint; :func:`unload` drops the adapters and keeps
  the frozen residual ``W'`` (the base model PEFT needs for CorDA/PiSSA adapters);
  :func:`save_merged_model` and :func:`save_residual_model` save either without changing ``model``.
- :mod:`~corda_kernels.export.bnb_checkpoint`: a quantized residual saved as a pre-quantized
  bitsandbytes checkpoint that transformers loads 4/8-bit (used by :func:`save_residual_model`).
- :mod:`~corda_kernels.export.peft_adapter`: :func:`save_peft_adapter` writes
  ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(residual_base, path)`` loads with the same outputs, or with
  ``initial=`` PEFT's PiSSA/CorDA conversion for the original base.
"""

from .peft_adapter import ADAPTER_WEIGHTS, adapter_base, dense_factors, save_peft_adapter, task_type
from .plain import (
    adapters,
    merge,
    merged_weight,
    plain_layer,
    plain_layers,
    residual_weight,
    save_merged_model,
    save_residual_model,
    unload,
)

__all__ = [
    "ADAPTER_WEIGHTS",
    "adapter_base",
    "adapters",
    "dense_factors",
    "merge",
    "merged_weight",
    "plain_layer",
    "plain_layers",
    "residual_weight",
    "save_merged_model",
    "save_peft_adapter",
    "save_residual_model",
    "task_type",
    "unload",
]
