"""qlora-kit: quantization and LoRA / QLoRA fine-tuning for any PyTorch backbone.

The public API is loaded lazily, so `import qlora_kit` imports no triton, bitsandbytes or diffusers
and never initialises CUDA.

Example:
    >>> import qlora_kit
    >>> model = qlora_kit.quantize(model, qlora_kit.NF4Config())
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    # quantization core
    "quantize": "api",
    "memory_footprint": "api",
    "default_filter": "api",
    "NF4Config": "configs",
    "FP4Config": "configs",
    "Int8WeightConfig": "configs",
    "Int4WeightConfig": "configs",
    "FP8WeightConfig": "configs",
    "Int8DynamicActivationConfig": "configs",
    "FP8DynamicActivationConfig": "configs",
    "save_quantized": "serialization",
    "load_quantized": "serialization",
    # LoRA / QLoRA
    "LoraConfig": "lora",
    "add_lora": "lora",
    "merge_lora": "lora",
    "unmerge_lora": "lora",
    "set_adapter": "lora",
    "disable_adapters": "lora",
    "prepare_for_kbit_training": "lora",
    "save_adapter": "lora",
    "load_adapter": "lora",
    "delete_adapter": "lora",
    "MergeReport": "lora",
    # PTQ algorithms and QAT
    "HQQConfig": "ptq",
    "GPTQConfig": "ptq",
    "AWQConfig": "ptq",
    "SmoothQuantConfig": "ptq",
    "smooth_activations": "ptq",
    "QATConfig": "qat",
    "prepare_qat": "qat",
    "convert_qat": "qat",
}

__all__ = sorted([*_EXPORTS, "functional", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "functional":
        return importlib.import_module(".functional", __name__)
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    else:  # a config class a format or algorithm registered (qlora_kit/formats/<name>.py): qlora_kit.MXFP4Config
        value = importlib.import_module(".registry", __name__).config_class(name) if name.endswith("Config") else None
        if value is None:
            raise AttributeError(f"module 'qlora_kit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
