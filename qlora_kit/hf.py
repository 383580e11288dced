"""The Hugging Face path: ``from_pretrained(..., quantization_config=qlora_kit.hf.QuantizationConfig(...))``.

Importing this module registers a transformers quantizer under ``quant_method="qlora_kit"`` (transformers'
public ``register_quantization_config`` / ``register_quantizer``). Then:

- ``AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantizationConfig(NF4Config()))``
  quantizes each linear layer as its weight is read from the checkpoint shards (one float weight in
  memory at a time), with the same layer choice as transformers + bitsandbytes: ``nn.Linear`` (and its
  subclasses) and GPT-2's ``Conv1D``, leaving out the model's ``_keep_in_fp32_modules``, the output
  embeddings / tied weights / last layer (transformers' ``get_keys_to_not_convert``) and
  ``modules_to_not_convert``. ``device_map`` and ``dtype`` work as usual.
- ``save_pretrained`` writes the packed codes (``<layer>.qweight.packed``, ...) to safetensors and the
  quantization config to config.json; ``from_pretrained(path)`` reloads it bit-identically, no argument
  needed (this module must be imported first).
- PEFT / TRL: a plain ``peft.LoraConfig`` works once this module is imported (it registers qlora-kit's
  layers in PEFT's LoRA dispatch); :class:`qlora_kit.peft_layers.LoraConfig` (re-exported as ``LoraConfig``)
  adds a clear error for ``target_modules="all-linear"``.
- Outputs against bitsandbytes NF4 on the CPU: without double quantization bit-identical to bitsandbytes' own
  forward (its CPU path is dequantize + ``F.linear``; CPUs with AVX512-BF16 run a bf16 kernel instead). With
  double quantization the documented bound: each block's absmax ``a`` comes back within ``s * w(t) / 2`` (``s`` =
  max ``|a - mean|`` over its 256 blocks, ``w(t)`` <= 0.0140625 the width of the 8-bit map interval holding
  ``t = (a - mean) / s``), so a weight's relative error is at most ``0.00703 * s / a`` plus fp32 rounding;
  bitsandbytes' CPU quantizer may round to the other end of the interval (``s * w(t)``). See the README and
  ``tests/test_hf_bnb_outputs.py``.

Example:
    >>> import qlora_kit.hf
    >>> from transformers import AutoModelForCausalLM
    >>> qc = qlora_kit.hf.QuantizationConfig(qlora_kit.NF4Config(blocksize=64, double_quant=True))
    >>> model = AutoModelForCausalLM.from_pretrained("path/or/hub-id", quantization_config=qc)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .hf_quantize import fill_nf4, release_pages
from .nn.quantized import QuantConv1D, QuantizedLayer, QuantLinear, is_transformers_conv1d
from .peft_layers import LoraConfig, linear_layer_names, register_peft_layers
from .registry import config_class, format_for_config, weight_config_classes

__all__ = ["QuantizationConfig", "QloraKitHfQuantizer", "LoraConfig", "register_peft_layers", "linear_layer_names"]

QUANT_METHOD = "qlora_kit"
_BYTES_PER_VALUE = {"nf4": 0.5, "fp4": 0.5, "int4": 0.5, "int8": 1.0, "fp8": 1.0}


def _config_to_dict(config) -> dict:
    out = {"class": type(config).__name__}
    for k in config.__dataclass_fields__:
        v = getattr(config, k)
        out[k] = str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
    return out


def _config_from_dict(d: dict):
    d = dict(d)
    cls = config_class(d.pop("class", None))
    if cls is None:
        raise ValueError(
            "quantization_config.format_config names no qlora-kit config; known: "
            f"{[c.__name__ for c in weight_config_classes()]}"
        )
    return cls(**{k: (getattr(torch, v) if k.endswith("dtype") else v) for k, v in d.items()})


@register_quantization_config(QUANT_METHOD)
class QuantizationConfig(QuantizationConfigMixin):
    """A qlora-kit weight format for ``from_pretrained(quantization_config=...)``.

    Args:
        config: a format config (``NF4Config``, ``FP4Config``, ``Int8WeightConfig``, ``Int4WeightConfig``,
            ``FP8WeightConfig``, or the dynamic-activation configs); default ``NF4Config()``.
        modules_to_not_convert: module names (or patterns, as bitsandbytes' ``llm_int8_skip_modules``) kept in
            float, on top of transformers' defaults (output head, tied weights, ``_keep_in_fp32_modules``).

    Raises:
        TypeError: ``config`` is not a qlora-kit format config (PTQ algorithms that need calibration data, and
            HQQ, are applied with ``qlora_kit.quantize`` after loading).
    """

    def __init__(self, config=None, modules_to_not_convert: list[str] | None = None, **kwargs):
        format_config = kwargs.pop("format_config", None)
        kwargs.pop("quant_method", None)
        if config is None:
            from .configs import NF4Config

            config = _config_from_dict(format_config) if format_config is not None else NF4Config()
        if format_for_config(config) is None:
            known = ", ".join(sorted(c.__name__ for c in weight_config_classes()))
            raise TypeError(
                f"QuantizationConfig needs a qlora-kit format config ({known}), got {type(config).__name__}; "
                "apply PTQ algorithms with qlora_kit.quantize(model, config) after loading"
            )
        self.quant_method = QUANT_METHOD
        self.config = config
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        for k, v in kwargs.items():
            setattr(self, k, v)

    @property
    def format_name(self) -> str:
        return format_for_config(self.config).name

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_config": _config_to_dict(self.config),
            "modules_to_not_convert": self.modules_to_not_convert,
        }

    def __iter__(self):
        yield from self.to_dict().items()


class _QuantizeOnLoad(ConversionOps):
    """Runs as each chosen float weight is read: quantizes it and swaps the layer for a quantized one."""

    def __init__(self, quantizer: QloraKitHfQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        model, missing = kwargs["model"], kwargs.get("missing_keys")
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            self.quantizer.quantize_layer(model, name.rpartition(".")[0], value)
            if missing is not None:
                missing.discard(name)
        return {}


@register_quantizer(QUANT_METHOD)
class QloraKitHfQuantizer(HfQuantizer):
    """transformers' side of :class:`QuantizationConfig` (built by ``from_pretrained``, not by users)."""

    requires_calibration = False
    quantization_config: QuantizationConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()

    @property
    def quantized_element_size(self) -> float:
        return _BYTES_PER_VALUE[self.quantization_config.format_name]

    def update_device_map(self, device_map):
        if device_map is None and torch.cuda.is_available():
            return {"": torch.cuda.current_device()}
        return device_map

    def _choose_targets(self, model) -> set[str]:
        """The layers bitsandbytes would quantize (Linear and Conv1D outside the skip list), subclasses included."""
        skip = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        self.modules_to_not_convert = skip
        return {
            name
            for name, module in model.named_modules()
            if name
            and should_convert_module(name, skip)
            and (isinstance(module, nn.Linear) or is_transformers_conv1d(module))
            and not isinstance(module, QuantizedLayer)
        }

    def _process_model_before_weight_loading(self, model, **kwargs):
        self.targets = self._choose_targets(model)
        if not self.pre_quantized:
            return model
        config = self.quantization_config.config
        for name in sorted(self.targets):  # empty quantized layers on the meta device: the checkpoint fills them
            module = model.get_submodule(name)
            cls = QuantConv1D if is_transformers_conv1d(module) else QuantLinear
            with torch.device("meta"):
                layer = cls.empty_like_float(module, config, self._format_meta(module, cls))
            layer.train(module.training)
            model.set_submodule(name, layer)
        return model

    def _format_meta(self, module, cls) -> dict:
        """The saved-format metadata of ``module``'s quantized layer (what from_metadata rebuilds it from)."""
        config, shape = self.quantization_config.config, tuple(module.weight.shape)
        meta = {
            "format": self.quantization_config.format_name,
            "shape": list(shape[::-1] if cls is QuantConv1D else shape),
        }
        meta.update({k: getattr(config, k) for k in ("blocksize", "double_quant", "group_size") if hasattr(config, k)})
        return meta

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor == "weight" and module_name in self.targets

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_new_dtype(self, converter, param, dtype):
        # packed codes and their scales load in their saved dtypes, never cast to the model's dtype
        targets = getattr(converter, "target_patterns", None) or [""]
        if ".qweight." in targets[0]:
            return None
        return super().get_new_dtype(converter, param, dtype)

    @torch.no_grad()
    def quantize_layer(self, model, name: str, weight: torch.Tensor) -> None:
        """Quantize the float ``weight`` just read for layer ``name`` and swap the layer (the float is freed)."""
        module = model.get_submodule(name)
        cls = QuantConv1D if is_transformers_conv1d(module) else QuantLinear
        config, fmt = self.quantization_config.config, self.quantization_config.format_name
        module.weight = nn.Parameter(weight, requires_grad=False)
        if cls is QuantLinear and fmt == "nf4" and weight.device.type == "cpu":
            layer = cls.empty_like_float(module, config, self._format_meta(module, cls))
            fill_nf4(layer.qweight, weight, config.blocksize, name=f"{name}.weight")
        else:
            layer = cls.from_float(module, config, fmt, tensor_name=f"{name}.weight")
        layer.train(module.training)
        layer._is_hf_initialized = True
        model.set_submodule(name, layer)
        module.weight = None
        release_pages(weight)  # its pages of the memory-mapped shard are not needed again

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, QuantizedLayer):
                module.qweight.requires_grad_(False)  # the loader makes float tensors trainable parameters
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        from .nn.lora_layers import float_layer_like

        for name, module in list(model.named_modules()):
            if isinstance(module, (QuantLinear, QuantConv1D)):
                model.set_submodule(name, float_layer_like(module, module.dequantize_weight(dtype or module.out_dtype)))
        return model
