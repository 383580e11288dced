"""Layer helpers of the PTQ algorithms: which layers they see, their 2-D weight view and their input rows.

The 2-D view is the core formats' (output channels x rest) view (``qlora_kit/nn/geometry.py``); a
convolution is a matmul of that view with its unfolded input patches (:func:`layer_rows`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.geometry import from_2d, is_linear, to_2d
from ..nn.quantized import QuantizedLayer, quantized_class_for
from ..registry import format_for_config

FilterFn = Callable[[nn.Module, str], bool]


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def is_conv(module: nn.Module) -> bool:
    """An ungrouped Conv1d / Conv2d / ConvTranspose2d: per output pixel, its 2-D weight view times a column of
    unfolded input patches (see :func:`layer_rows`)."""
    return type(module) in _CONV_TYPES and module.groups == 1


def kernel_numel(module: nn.Module) -> int:
    """Kernel positions per input channel in the 2-D weight view (1 for linear layers)."""
    return math.prod(module.kernel_size) if type(module) in _CONV_TYPES else 1


def expand_channels(module: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """A per-input-channel vector as the per-column vector of the layer's 2-D weight view (a convolution's
    columns are (in_channel, kernel position), channel-major)."""
    k = kernel_numel(module)
    return s if k == 1 else s.repeat_interleave(k)


def batched(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input with the batch dimension (unbatched inputs are allowed by torch)."""
    spatial = 1 if type(module) is nn.Conv1d else 2
    return x.unsqueeze(0) if x.dim() == spatial + 1 else x


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (N, K) of the reduction dimension its 2-D weight view multiplies, so that
    ``rows @ weight_2d(module).T`` (+ bias) are the layer's outputs, one row per token or output pixel.

    Linear / Conv1D: the tokens. Conv1d / Conv2d: the unfolded input patches (padding applied as the layer
    does, string paddings and padding modes included). ConvTranspose2d: the patches of the stride-dilated
    (zero-inserted) input under the spatially flipped kernel, the convolution the transposed one equals;
    rows of output pixels a kernel tap does not reach hold zeros there.
    """
    if is_linear(module):
        return x.reshape(-1, x.shape[-1])
    x = batched(module, x)
    kernel, dil, stride = module.kernel_size, module.dilation, module.stride
    if type(module) is not nn.ConvTranspose2d:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if type(module) is nn.Conv1d:  # as a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, dil, stride = (1, *kernel), (1, *dil), (1, *stride)
    if type(module) is nn.ConvTranspose2d:
        n, c, h, w = x.shape
        up = x.new_zeros(n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1)
        up[:, :, :: stride[0], :: stride[1]] = x
        pads = []
        for i in (1, 0):  # F.pad order: last dimension first
            edge = dil[i] * (kernel[i] - 1) - module.padding[i]
            pads += [edge, edge + module.output_padding[i]]
        cols = F.unfold(F.pad(up, pads), kernel, dilation=dil)  # negative pads crop
        cols = cols.reshape(n, c, kernel[0], kernel[1], -1).flip(2, 3).reshape(n, c * kernel[0] * kernel[1], -1)
    else:
        cols = F.unfold(x, kernel, dilation=dil, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def channel_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (N, channels): tokens for linear layers, pixels (channel dimension 1) for convs."""
    if is_linear(module):
        return x.reshape(-1, x.shape[-1])
    x = batched(module, x)
    return x.transpose(1, -1).reshape(-1, x.shape[1])


def warn_rtn(algorithm: str, names: list[str], why: str) -> None:
    """Say which layers a calibrated algorithm quantized with plain round-to-nearest instead."""
    if names:
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        warnings.warn(f"{algorithm}: {len(names)} layer(s) got round-to-nearest instead ({why}): {shown}", stacklevel=3)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The (out, reduction) view of a layer's weight, as the core formats see it (a view, not a copy)."""
    return to_2d(module, module.weight)


def set_weight_2d(module: nn.Module, w2d: torch.Tensor) -> None:
    """Write a (out, reduction) matrix (the :func:`weight_2d` view) back into a layer's weight, in place."""
    w = module.weight
    with torch.no_grad():
        w.copy_(from_2d(module, w2d, w.shape).to(w.dtype))


def layer_from_qweight(module: nn.Module, qweight: nn.Module, fmt_config) -> QuantizedLayer:
    """The core quantized layer for ``module`` holding the given format object (bias copied)."""
    cls = quantized_class_for(module)
    layer = cls.empty_like_float(module, fmt_config, qweight.metadata())
    layer.qweight = qweight
    return layer.to(module.weight.device)


def rtn_layer(module: nn.Module, fmt_config, fqn: str) -> QuantizedLayer:
    """``module`` quantized with plain round-to-nearest in the core format of ``fmt_config``."""
    cls = quantized_class_for(module)
    return cls.from_float(module, fmt_config, format_for_config(fmt_config).name, tensor_name=f"{fqn}.weight")


def select_targets(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize`` would pick: supported, kept by the filter, not nested in another target."""
    from ..api import default_filter

    keep = filter_fn or default_filter(model)
    targets: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules():
        if not fqn or isinstance(module, QuantizedLayer) or quantized_class_for(module) is None:
            continue
        if not keep(module, fqn) or any(fqn.startswith(t + ".") for t, _ in targets):
            continue
        targets.append((fqn, module))
    return targets
