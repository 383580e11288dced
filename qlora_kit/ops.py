"""Quantized matmuls as ``torch.library`` custom ops (namespace ``qlora_kit``).

Each op has a fake (meta) implementation and a registered backward, so ``torch.compile`` traces models
that use them without graph breaks, and autograd flows to the activations (weights are frozen; a bias
that requires grad gets one too). Implementation per call (``qlora_kit/_dispatch.py``): CUDA tensors
run the Triton kernels (``qlora_kit.kernels.matmul_4bit`` / ``matmul_int`` / ``act_quant``, imported
only then), CPU tensors the CPU kernels of ``kernels/cpu.py`` where they apply (weights of 2**18 values or
more), else the pure-PyTorch references; ``QLORA_KIT_BACKEND=triton`` forces the Triton kernels and
``QLORA_KIT_BACKEND=reference`` the references.

Ops (all return a new tensor in x's dtype, shape (..., N)):
    qlora_kit::matmul_4bit(x, packed, absmax, nested_absmax?, offset?, bias?, n, k, blocksize, quant_type)
        NF4/FP4; ``absmax`` is the fp32 block absmax, or the uint8 codes when nested_absmax is given.
    qlora_kit::matmul_int4(x, packed, scale, zero, bias?, group_size)
    qlora_kit::matmul_channelwise(x, qdata, scale, bias?)          int8 or fp8 e4m3 codes, W8A16
    qlora_kit::int8_dynamic_linear(x, w_int8, w_scale, bias?)      W8A8, per-token dynamic int8
    qlora_kit::fp8_dynamic_linear(x, w_fp8, w_scale, bias?)        fp8 e4m3 rowwise (sm89+ on CUDA)
and their ``*_grad_input`` companions. The activation-quantized ops differentiate as if the activation
quantizer were the identity (straight-through): dx = dy (w_q * w_scale).

Example:
    >>> from qlora_kit import ops
    >>> y = ops.quantized_linear(x, layer.qweight, layer.bias)
"""

import functools

import torch
from torch import Tensor

from ._dispatch import call, custom_op, use_cpu_kernels, use_triton
from .kernels import cpu
from .kernels.reference import matmul as ref

__all__ = [
    "call",
    "fp8_dynamic_linear",
    "int8_dynamic_linear",
    "matmul_4bit",
    "matmul_channelwise",
    "matmul_int4",
    "quantized_linear",
]


@functools.lru_cache(maxsize=256)
def _meta_4bit(n: int, k: int, blocksize: int, quant_type: str, double_quant: bool) -> ref.Quant4bitMeta:
    return ref.Quant4bitMeta((n, k), blocksize, quant_type, double_quant)  # validated once per distinct weight


def _packed_4bit(packed, absmax, nested_absmax, offset, n, k, blocksize, quant_type) -> ref.Packed4bit:
    meta = _meta_4bit(n, k, blocksize, quant_type, nested_absmax is not None)
    if meta.double_quant:
        return ref.Packed4bit(packed, meta, qabsmax=absmax, nested_absmax=nested_absmax, offset=offset)
    return ref.Packed4bit(packed, meta, absmax=absmax)


def _bias_grad(ctx, grad: Tensor, index: int, n: int):
    return grad.reshape(-1, n).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[index] else None


def _out_like(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


# -------------------------------------------------------------------------------------------- NF4 / FP4


@custom_op("qlora_kit::matmul_4bit")
def matmul_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    quant_type: str,
) -> Tensor:
    w = _packed_4bit(packed, absmax, nested_absmax, offset, n, k, blocksize, quant_type).check()
    y = cpu.matmul_4bit(x, w, bias) if use_cpu_kernels(x) else None
    if y is None and use_triton(x):
        from .kernels.matmul_4bit import matmul_4bit as triton_matmul_4bit

        return triton_matmul_4bit(x, w, bias)
    return ref.matmul_4bit_ref(x, w, bias) if y is None else y


@torch.library.custom_op("qlora_kit::matmul_4bit_grad_input", mutates_args=())
def _matmul_4bit_grad_input(
    grad: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    quant_type: str,
) -> Tensor:
    w = _packed_4bit(packed, absmax, nested_absmax, offset, n, k, blocksize, quant_type).check()
    if use_triton(grad):
        from .kernels.matmul_4bit import matmul_4bit_grad_input

        return matmul_4bit_grad_input(grad, w)
    return ref.grad_input_ref(grad, ref.dequantize_packed_4bit(w, grad.dtype))


@matmul_4bit.register_fake
def _(x, packed, absmax, nested_absmax, offset, bias, n, k, blocksize, quant_type):
    return _out_like(x, n)


@_matmul_4bit_grad_input.register_fake
def _(grad, packed, absmax, nested_absmax, offset, n, k, blocksize, quant_type):
    return _out_like(grad, k)


def _setup_4bit(ctx, inputs, output):
    x, packed, absmax, nested_absmax, offset, bias = inputs[:6]
    ctx.save_for_backward(packed, absmax, nested_absmax, offset)  # the packed weight only, never W
    ctx.args = inputs[6:]  # n, k, blocksize, quant_type
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_4bit(ctx, grad):
    n = ctx.args[0]
    gx = _matmul_4bit_grad_input(grad, *ctx.saved_tensors, *ctx.args) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, None, _bias_grad(ctx, grad, 5, n), None, None, None, None


matmul_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)

# ---------------------------------------------------------------------------------------- int4 per group


@custom_op("qlora_kit::matmul_int4")
def matmul_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    y = cpu.matmul_int4(x, packed, scale, zero, group_size, bias) if use_cpu_kernels(x) else None
    if y is None and use_triton(x):
        from .kernels.matmul_int import matmul_int4 as triton_matmul_int4

        return triton_matmul_int4(x, packed, scale, zero, group_size, bias)
    return ref.matmul_int4_ref(x, packed, scale, zero, group_size, bias) if y is None else y


@torch.library.custom_op("qlora_kit::matmul_int4_grad_input", mutates_args=())
def _matmul_int4_grad_input(
    grad: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, k: int, group_size: int
) -> Tensor:
    if use_triton(grad):
        from .kernels.matmul_int import matmul_int4_grad_input

        return matmul_int4_grad_input(grad, packed, scale, zero, k, group_size)
    return ref.grad_input_ref(grad, ref.dequantize_int4(packed, scale, zero, k, group_size, grad.dtype))


@matmul_int4.register_fake
def _(x, packed, scale, zero, bias, group_size):
    return _out_like(x, packed.shape[0])


@_matmul_int4_grad_input.register_fake
def _(grad, packed, scale, zero, k, group_size):
    return _out_like(grad, k)


def _setup_int4(ctx, inputs, output):
    x, packed, scale, zero, bias, group_size = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.k, ctx.group_size = x.shape[-1], group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_int4(ctx, grad):
    packed, scale, zero = ctx.saved_tensors
    gx = _matmul_int4_grad_input(grad, packed, scale, zero, ctx.k, ctx.group_size) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, _bias_grad(ctx, grad, 4, packed.shape[0]), None


matmul_int4.register_autograd(_backward_int4, setup_context=_setup_int4)

# ------------------------------------------------------------------------ per channel (int8 / fp8 codes)


def _channelwise_on_triton(t: Tensor, qdata: Tensor) -> bool:
    # Triton decodes e4m3 only on sm89+; older GPUs dequantize with PyTorch instead
    if not use_triton(t):
        return False
    return qdata.dtype != torch.float8_e4m3fn or not t.is_cuda or torch.cuda.get_device_capability(t.device) >= (8, 9)


@custom_op("qlora_kit::matmul_channelwise")
def matmul_channelwise(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    y = cpu.matmul_channelwise(x, qdata, scale, bias) if use_cpu_kernels(x) else None
    if y is None and _channelwise_on_triton(x, qdata):
        from .kernels.matmul_int import matmul_channelwise as triton_matmul_channelwise

        return triton_matmul_channelwise(x, qdata, scale, bias)
    return ref.matmul_channelwise_ref(x, qdata, scale, bias) if y is None else y


@torch.library.custom_op("qlora_kit::matmul_channelwise_grad_input", mutates_args=())
def _matmul_channelwise_grad_input(grad: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    if _channelwise_on_triton(grad, qdata):
        from .kernels.matmul_int import matmul_channelwise_grad_input

        return matmul_channelwise_grad_input(grad, qdata, scale)
    return ref.grad_input_ref(grad, ref.dequantize_channelwise(qdata, scale, grad.dtype))


@matmul_channelwise.register_fake
def _(x, qdata, scale, bias):
    return _out_like(x, qdata.shape[0])


@_matmul_channelwise_grad_input.register_fake
def _(grad, qdata, scale):
    return _out_like(grad, qdata.shape[1])


def _setup_channelwise(ctx, inputs, output):
    x, qdata, scale, bias = inputs
    ctx.save_for_backward(qdata, scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_channelwise(ctx, grad):
    qdata, scale = ctx.saved_tensors
    gx = _matmul_channelwise_grad_input(grad, qdata, scale) if ctx.needs_input_grad[0] else None
    return gx, None, None, _bias_grad(ctx, grad, 3, qdata.shape[0])


matmul_channelwise.register_autograd(_backward_channelwise, setup_context=_setup_channelwise)

# ------------------------------------------------------------------------- dynamic activation quantization


@custom_op("qlora_kit::int8_dynamic_linear")
def _int8_dynamic_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    if use_triton(x):
        from .kernels.act_quant import int8_dynamic_linear as impl

        return impl(x, w_int8, w_scale, bias)
    return ref.int8_dynamic_linear_ref(x, w_int8, w_scale, bias)


@custom_op("qlora_kit::fp8_dynamic_linear")
def _fp8_dynamic_linear(x: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    if use_triton(x):
        from .kernels.act_quant import fp8_dynamic_linear as impl

        return impl(x, w_fp8, w_scale, bias)  # raises a clear error on GPUs older than sm89
    return ref.fp8_dynamic_linear_ref(x, w_fp8, w_scale, bias)


for _op in (_int8_dynamic_linear, _fp8_dynamic_linear):
    _op.register_fake(lambda x, w, w_scale, bias: _out_like(x, w.shape[0]))
    # straight-through: the activation quantizer counts as identity, so dx = dy (w * w_scale)
    _op.register_autograd(_backward_channelwise, setup_context=_setup_channelwise)

# ----------------------------------------------------------------------------------------- entry points


def quantized_linear(x: Tensor, qweight, bias: Tensor | None = None, *, activation: str | None = None) -> Tensor:
    """y = x W^T + bias for a quantized weight, through the custom op of its format.

    Args:
        x: activations (..., in_features); the output has x's dtype.
        qweight: a format object (``qlora_kit/formats``): "nf4", "fp4", "int4", "int8" or "fp8", with
            its buffers and attributes as in the format contract.
        bias: optional (out_features,).
        activation: None for weight-only; "int8" (needs an "int8" weight) or "fp8" (an "fp8" weight)
            to also quantize x per token on the fly (W8A8 / fp8 rowwise).

    Returns:
        (..., out_features) tensor.

    Raises:
        ValueError: an activation mode the weight's format does not support.

    Example:
        >>> y = quantized_linear(x, layer.qweight, layer.bias)
    """
    linear = getattr(qweight, "linear", None)
    if linear is None:
        name = getattr(qweight, "name", type(qweight).__name__)
        raise ValueError(f"quantized_linear does not support weight format {name!r}: its class has no linear()")
    return linear(x, bias, activation=activation)


def int8_dynamic_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """W8A8: x quantized per token to int8 on the fly, int8 GEMM, row/column scales and bias in the epilogue.

    Args:
        x: (..., K) fp16 / bf16 / fp32. w_int8: (N, K) int8. w_scale: (N,) fp32. bias: optional (N,).

    Returns:
        (..., N) in x's dtype.
    """
    return _int8_dynamic_linear(x, w_int8, w_scale, bias)


def fp8_dynamic_linear(x: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """fp8 e4m3 rowwise: as :func:`int8_dynamic_linear` with e4m3 codes (sm89+ GPUs; emulated on CPU).

    Raises:
        RuntimeError: on a CUDA GPU older than compute capability 8.9.
    """
    return _fp8_dynamic_linear(x, w_fp8, w_scale, bias)
