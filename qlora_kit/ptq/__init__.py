"""Post-training quantization algorithms: HQQ, GPTQ, AWQ, SmoothQuant (and dynamic W8A8 through the core).

Each algorithm is a frozen config that ``qlora_kit.quantize`` runs through the handler registered for its
type (``qlora_kit.registry.register_quantize_handler``). The outputs are the core's packed formats, so the
fused kernels run them:

* :class:`HQQConfig`: int4 per group; the zero point of every group is optimised with HQQ's
  half-quadratic solver (an lp-norm, p < 1, of the weight error; no data). Zero points may be fractional.
* :class:`GPTQConfig`: int4 per group or int8 per channel; each layer's weight is quantized column by
  column with the error fed back through the inverse Hessian ``H = 2 X^T X / n`` of its calibration
  inputs (damping, blocks of 128 columns, optional act-order). Linear, GPT-2 Conv1D and ungrouped
  Conv1d / Conv2d / ConvTranspose2d layers: a convolution is a matmul of its 2-D weight view (the core
  formats' (out, in * kernel) view) with unfolded input patches, so X holds one patch row per output pixel
  (:func:`layer_rows`; a transposed convolution's patches are those of its zero-inserted input under the
  flipped kernel).
* :class:`AWQConfig`: int4 per group (or NF4); per input channel scales ``s = mean|x|^a`` (a from a grid)
  chosen by the output error of the enclosing block with the layers sharing that input quantized, folded
  into the op that produces the input (RMSNorm / LayerNorm or a previous linear; for convolutions a
  BatchNorm / GroupNorm or a previous convolution, also through a ReLU in between), then an optional
  per-group clipping search on the layer's input rows; round-to-nearest after that. Layers whose input has
  no such producer get the clipping search only.
* :class:`SmoothQuantConfig`: migrates activation outliers into the weights (``s = max|x|^a / max|w|^(1-a)``,
  folded the same way), then W8A8: int8 weights per channel, int8 activations per token at run time.
  :func:`smooth_activations` runs the migration alone.

A scale is only folded where that leaves the model's function unchanged: the producer is found by tensor
identity (the op whose output tensor the linears read) or by name for inputs that are linear in a
producer's output (``up_proj -> down_proj`` in SwiGLU, ``v_proj -> o_proj`` without grouped KV heads), and
every candidate is checked by running the block with a random scale folded in (post-LN LayerNorms that
also feed a residual fail the check and are left alone).

Dynamic quantization (weights quantized ahead of time, activations per call) is the core's
``Int8DynamicActivationConfig`` (W8A8) or ``FP8DynamicActivationConfig``; SmoothQuant produces those layers.

Calibration protocol (GPTQ, AWQ, SmoothQuant): prepare (find the repeated blocks, e.g. the decoder
layers), run ``calib_data`` (an iterable of model inputs: tensors, tuples or dicts of keyword
arguments) up to the first block and keep those inputs, then block by block: move the block to
``device``, hook its layers, run it on the kept inputs, quantize (convert) its layers, and run it again so
that its quantized outputs feed the next block. Only one float block is on the device at a time, so a
model larger than the device still calibrates. Models without a repeated block (UNets, GANs) calibrate
in one whole-model pass; layers outside the blocks are calibrated in a final whole-model pass.
Layers the algorithm does not handle (embeddings, grouped convolutions, layers the calibration data
never reaches) are quantized with round-to-nearest in the same format, with a warning naming them.
SmoothQuant smooths and runs W8A8 on Linear layers only (the core's W8A8 covers linear layers); its other
layers get int8 weight-only quantization, with a warning.

Layout: ``calibration.py`` (the protocol above), ``fold.py`` (activation statistics and scale folding,
shared by AWQ and SmoothQuant), ``layers.py`` (targets, 2-D weight views, input rows), ``numerics.py``
(quantize-dequantize helpers equal to the core formats), and one file per algorithm with its config, which
registers its handler with ``qlora_kit.registry.register_quantize_handler``. A new algorithm is one such
file plus an import here.

Example:
    >>> calib = [tokens[i : i + 4] for i in range(0, 32, 4)]
    >>> qlora_kit.quantize(model, qlora_kit.GPTQConfig(bits=4, group_size=128), calib_data=calib)
"""

from __future__ import annotations

from . import awq, gptq, hqq, smoothquant  # noqa: F401  (each registers its quantize handler on import)
from .awq import AWQConfig
from .calibration import Scope, calibrate, calibration_batches, first_tensor
from .fold import InputGroup, collect_groups, fold_scale, valid_producers
from .gptq import GPTQConfig, gptq_quantize
from .hqq import HQQConfig, hqq_params
from .layers import FilterFn, is_linear, layer_from_qweight, layer_rows, select_targets, set_weight_2d, weight_2d
from .numerics import format_fake_quant, int4_codes, int4_dequantize, int4_fake_quant, int4_weight, int8_weight
from .smoothquant import SmoothQuantConfig, smooth_activations

__all__ = [
    "AWQConfig",
    "FilterFn",
    "GPTQConfig",
    "HQQConfig",
    "InputGroup",
    "Scope",
    "SmoothQuantConfig",
    "calibrate",
    "calibration_batches",
    "collect_groups",
    "first_tensor",
    "fold_scale",
    "format_fake_quant",
    "gptq_quantize",
    "hqq_params",
    "int4_codes",
    "int4_dequantize",
    "int4_fake_quant",
    "int4_weight",
    "int8_weight",
    "is_linear",
    "layer_from_qweight",
    "layer_rows",
    "select_targets",
    "set_weight_2d",
    "smooth_activations",
    "valid_producers",
    "weight_2d",
]
