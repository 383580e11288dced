"""PEFT LoRA on qlora-kit's quantized layers (``peft.get_peft_model``, TRL's ``SFTTrainer(peft_config=...)``).

PEFT builds its LoRA layers through dispatchers; layer types it does not know are added per config with
``LoraConfig._register_custom_module``. :func:`register_peft_layers` does that for qlora-kit's quantized
linear layers (``QuantLinear``, ``QuantConv1D``). Importing this module (``qlora_kit.hf`` imports it) also
installs that registration in PEFT's LoRA dispatch (:func:`install_peft_dispatch`), so a plain
``peft.LoraConfig`` works on a qlora-kit model; :class:`LoraConfig` is ``peft.LoraConfig`` with the
registration done on construction (same fields, same ``adapter_config.json``) and a clear error for
``target_modules="all-linear"``.

The layer, :class:`QuantizedLoraLinear`, is PEFT's own ``lora.Linear`` (same parameters, same state-dict
keys, same variants) with three differences: the forward takes qlora-kit's fused Triton path (base
matmul + LoRA in one kernel, packed weight re-dequantized in backward) where our ``add_lora`` would; merge
and unmerge dequantize, update and requantize the packed weight (like PEFT's bitsandbytes layers: unmerging
is exact only up to the requantization error); and the in/out features come from the quantized layer.

Example:
    >>> import qlora_kit.peft_layers
    >>> model = peft.get_peft_model(quantized_model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import warnings

import peft
import torch
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ._dispatch import use_triton
from .nn.quantized import QuantConv1D, QuantizedLayer, QuantLinear


def _base_of(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


class QuantizedLoraLinear(_PeftLoraLinear):
    """PEFT's LoRA ``Linear`` over a qlora-kit ``QuantLinear`` or ``QuantConv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        kwargs.pop("is_target_conv_1d_layer", None)
        conv1d = isinstance(_base_of(base_layer), QuantConv1D)
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=conv1d, **kwargs)
        self.fan_in_fan_out = conv1d  # delta weights in the float layer's layout ((in, out) for Conv1D)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    # ----- forward: qlora-kit's fused kernel where it applies, PEFT's own forward otherwise -------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = None if args or kwargs else self._fused_forward(x)
        return fused if fused is not None else super().forward(x, *args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One plain LoRA adapter on CUDA (or QLORA_KIT_BACKEND=triton): the fused Triton matmul, else None."""
        live = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or len(live) != 1 or not use_triton(x):
            return None
        name = live[0]
        if (
            name in self.lora_variant
            or self.lora_bias.get(name)
            or x.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        ):
            return None
        from .kernels.lora import LoraMeta, lora_linear
        from .nn.lora_layers import LoraLinear

        base = self.get_base_layer()
        weight = LoraLinear._packed_base(base)
        if weight is None:
            return None
        x_c = x.to(base.compute_dtype)
        dropout = self.lora_dropout[name]
        use_dropout = isinstance(dropout, nn.Dropout) and self.training and dropout.p > 0
        x_d = dropout(x_c) if use_dropout else None
        meta = LoraMeta(scale=self.scaling[name], dropout=x_d is not None)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return lora_linear(x_c, weight, base.bias, a, b, meta, x_dropped=x_d).to(x.dtype)

    # ----- merge: through a dequantized fp32 copy, then requantized ------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base: QuantizedLayer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            warnings.warn(
                "merging LoRA into a quantized layer requantizes it: outputs move by the rounding error",
                stacklevel=2,
            )
            w = base.dequantize_weight(torch.float32)
            if name in self.lora_variant:
                w = self.lora_variant[name].merge_safe(self, name, w)
            else:
                w = w + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self.lora_bias[name]:
                if base.bias is None:
                    raise RuntimeError(
                        "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
                    )
                base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            base.set_float_weight(w)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base: QuantizedLayer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            w = base.dequantize_weight(torch.float32)
            if name in self.lora_variant:
                w = self.lora_variant[name].unmerge(self, name, w)
            else:
                w = w - self.get_delta_weight(name).float()
            if self.lora_bias[name]:
                base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            base.set_float_weight(w)

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", "lora.QuantizedLoraLinear")


PEFT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    QuantLinear: QuantizedLoraLinear,
    QuantConv1D: QuantizedLoraLinear,
}


def _dispatch_quantized_layers(create_new_module):
    """Wrap PEFT's ``LoraModel._create_new_module`` so a plain ``peft.LoraConfig`` reaching one of our layers
    registers them first (PEFT's custom-module mechanism); every other layer takes PEFT's dispatch untouched."""

    def create(lora_config, adapter_name, target, **kwargs):
        if isinstance(_base_of(target), tuple(PEFT_LAYERS)) and isinstance(lora_config, peft.LoraConfig):
            register_peft_layers(lora_config)
        return create_new_module(lora_config, adapter_name, target, **kwargs)

    create.qlora_kit_dispatch = True
    return create


def install_peft_dispatch() -> None:
    """Make ``peft.get_peft_model(model, peft.LoraConfig(...))`` wrap qlora-kit's quantized layers (idempotent).

    PEFT has no global registry of layer types: custom layers live on each config
    (``LoraConfig._register_custom_module``). Importing this module (and so ``qlora_kit.hf``) calls this once; it
    adds that registration to PEFT's LoRA dispatch, only for configs whose target is a qlora-kit layer, so a
    plain config (including one read by ``PeftModel.from_pretrained`` or made by TRL) needs nothing more.
    """
    from peft.tuners.lora.model import LoraModel

    current = LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(current, "qlora_kit_dispatch", False):
        LoraModel._create_new_module = staticmethod(_dispatch_quantized_layers(current))


def register_peft_layers(config: peft.LoraConfig) -> peft.LoraConfig:
    """Teach a ``peft.LoraConfig`` qlora-kit's quantized layers (PEFT's custom-module mechanism); returns it.

    Example:
        >>> config = register_peft_layers(peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        >>> model = peft.get_peft_model(quantized_model, config)
    """
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"register_peft_layers needs a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module(PEFT_LAYERS)
    return config


class LoraConfig(peft.LoraConfig):
    """``peft.LoraConfig`` that knows qlora-kit's quantized layers (same fields, same saved config).

    ``target_modules="all-linear"`` is PEFT's search for ``nn.Linear`` / ``Conv1D`` layers, which quantized
    layers are not; name the layers, e.g. ``target_modules=qlora_kit.peft_layers.linear_layer_names(model)``.
    """

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
            raise ValueError(
                "target_modules='all-linear' finds only nn.Linear layers, and qlora-kit's quantized layers are not "
                "nn.Linear; pass target_modules=qlora_kit.peft_layers.linear_layer_names(model) instead"
            )
        register_peft_layers(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs) -> peft.LoraConfig:
        """A saved adapter's config, registered (PEFT builds the class from ``peft_type``, so a plain LoraConfig).

        Example:
            >>> cfg = LoraConfig.from_pretrained(adapter_dir)
            >>> model = peft.PeftModel.from_pretrained(quantized_model, adapter_dir, config=cfg)
        """
        config = peft.LoraConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return register_peft_layers(config)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct short names (``q_proj``, ``c_attn``, ...) of the model's linear layers, quantized or float,
    output head left out: what ``target_modules="all-linear"`` means for a qlora-kit model."""
    from transformers.pytorch_utils import Conv1D

    from .api import output_head

    head = output_head(model)
    names = set()
    for path, module in model.named_modules():
        if module is head or not path or ".lora_" in path:
            continue
        if isinstance(module, (nn.Linear, Conv1D, QuantLinear, QuantConv1D)) and not isinstance(module, BaseTunerLayer):
            names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


install_peft_dispatch()
