"""The fused LoRA linear as ``torch.library`` custom ops (namespace ``qlora_kit``), like the matmuls of ops.py.

    y = x W^T + bias + s * (x_d A^T) B^T          x_d = dropout(x), or x itself

Ops (x, grad 2-D; the base weight passed as its tensors w0..w3 plus ``fmt``, ``n``, ``k``, ``block``):
    qlora_kit::lora_linear(x, x_dropped?, lora_a, lora_b, bias?, w0, w1?, w2?, w3?, fmt, n, k, block, scale)
        -> (y [M, N], xa = x_d A^T [M, r]; xa is kept for backward)
    qlora_kit::lora_grad_input(grad, g?, lora_a?, w0, w1?, w2?, w3?, fmt, n, k, block, scale)
        -> dX = dY W (+ s * G A when G = dY B is given: fused in the kernel's epilogue)
Base weights ``fmt``:
    "float"        w0 = W [N, K] (frozen, any strides)
    "nf4" / "fp4"  w0 packed, w1 absmax (fp32), or with double quantization w1 qabsmax (uint8),
                   w2 nested_absmax, w3 offset; block = blocksize
    "int8" / "fp8" w0 qdata, w1 scale (per channel); "int4": w0 qdata, w1 scale, w2 zero; block = group_size
Implementation per call (``qlora_kit/_dispatch.py``): the Triton kernels of ``kernels/lora.py`` (imported only
then) where ``use_triton``, else the pure-PyTorch reference (``kernels/reference/lora.py``). The backward
(registered with ``register_autograd``) is ``kernels.lora.lora_backward``'s math with dX through
``qlora_kit::lora_grad_input``, so ``torch.compile`` sees two ops and a few matmuls, never the kernels.

Example:
    >>> from qlora_kit.ops_lora import LoraMeta, lora_linear
    >>> y = lora_linear(x, packed_weight, bias, A, B, LoraMeta(scale=2.0))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import use_triton
from .kernels.reference import lora as ref
from .kernels.reference.matmul import Packed4bit, Quant4bitMeta

__all__ = ["LoraMeta", "lora_linear"]

LoraMeta = ref.LoraMeta


def _weight_tensors(base) -> tuple:
    """(w0, w1, w2, w3, fmt, n, k, block): a float, :class:`Packed4bit` or :class:`PackedInt` base as op args."""
    if isinstance(base, Packed4bit):
        m = base.meta
        w1 = base.qabsmax if m.double_quant else base.absmax
        return base.packed, w1, base.nested_absmax, base.offset, m.quant_type, *m.shape, m.blocksize
    if isinstance(base, ref.PackedInt):
        m = base.meta
        return base.qdata, base.scale, base.zero, None, m.fmt, *m.shape, m.group_size
    return base, None, None, None, "float", *base.shape, 0


def _weight(w0, w1, w2, w3, fmt: str, n: int, k: int, block: int):
    """The inverse of :func:`_weight_tensors`."""
    if fmt in ("nf4", "fp4"):
        meta = Quant4bitMeta((n, k), block, fmt, w2 is not None)
        if meta.double_quant:
            return Packed4bit(w0, meta, qabsmax=w1, nested_absmax=w2, offset=w3)
        return Packed4bit(w0, meta, absmax=w1)
    if fmt in ref.INT_FORMATS:
        return ref.PackedInt(w0, w1, ref.IntQuantMeta((n, k), fmt, block), zero=w2)
    return w0


@torch.library.custom_op("qlora_kit::lora_linear", mutates_args=())
def _lora_linear(
    x: Tensor,
    x_dropped: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    w0: Tensor,
    w1: Tensor | None,
    w2: Tensor | None,
    w3: Tensor | None,
    fmt: str,
    n: int,
    k: int,
    block: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    base = _weight(w0, w1, w2, w3, fmt, n, k, block)
    x_d = x if x_dropped is None else x_dropped
    if use_triton(x):
        from .kernels import lora as kernels

        return kernels.lora_forward(x, x_d, lora_a, lora_b, bias, base, scale)
    y = ref.lora_linear(x, ref.dense_weight(base, x.dtype), bias, lora_a, lora_b, scale, x_d)
    return y, x_d @ lora_a.t().to(x.dtype)


@_lora_linear.register_fake
def _(x, x_dropped, lora_a, lora_b, bias, w0, w1, w2, w3, fmt, n, k, block, scale):
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("qlora_kit::lora_grad_input", mutates_args=())
def _lora_grad_input(grad: Tensor, g: Tensor | None, lora_a: Tensor | None, w0: Tensor, w1: Tensor | None,
                     w2: Tensor | None, w3: Tensor | None, fmt: str, n: int, k: int, block: int,
                     scale: float) -> Tensor:  # fmt: skip
    base = _weight(w0, w1, w2, w3, fmt, n, k, block)
    low = None if g is None else (g, lora_a)
    if use_triton(grad):
        from .kernels import lora as kernels

        return kernels.lora_grad_input(grad, base, low, scale)
    dx = grad @ ref.dense_weight(base, grad.dtype)
    return dx if low is None else dx + scale * (g @ lora_a.to(grad.dtype))


@_lora_grad_input.register_fake
def _(grad, g, lora_a, w0, w1, w2, w3, fmt, n, k, block, scale):
    return grad.new_empty((grad.shape[0], k))


def _setup(ctx, inputs, output):
    x, x_dropped, lora_a, lora_b, bias, w0, w1, w2, w3 = inputs[:9]
    ctx.weight_args = inputs[9:13]  # fmt, n, k, block
    ctx.meta = LoraMeta(scale=inputs[13], dropout=x_dropped is not None)
    ctx.bias_dtype = None if bias is None else bias.dtype
    # kept for backward: x_d, the [M, r] product, the adapters and the packed (or frozen float) weight
    ctx.save_for_backward(x if x_dropped is None else x_dropped, output[1], lora_a, lora_b, w0, w1, w2, w3)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_xa):
    x_d, xa, lora_a, lora_b, *weight = ctx.saved_tensors

    def grad_input(dy, base, low, scale):
        g, a = (None, None) if low is None else low
        return _lora_grad_input(dy, g, a, *weight, *ctx.weight_args, scale)

    from .kernels.lora import lora_backward

    needs_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    grads = lora_backward(grad, x_d, xa, lora_a, lora_b, None, ctx.meta, needs_x, grad_input=grad_input)
    grad_bias = grad.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[4] else None
    return *grads, grad_bias, *(None,) * 9


_lora_linear.register_autograd(_backward, setup_context=_setup)


def lora_linear(
    x: Tensor,
    base: Tensor | Packed4bit | ref.PackedInt,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    meta: LoraMeta,
    x_dropped: Tensor | None = None,
) -> Tensor:
    """Fused y = x W^T + bias + s * (x_d A^T) B^T over a frozen float or quantized base, as a custom op.

    The same contract as ``qlora_kit.kernels.lora.lora_linear`` (whose kernels it runs on the Triton
    backend), traceable by ``torch.compile``.

    Args:
        x: the input [..., K], in the compute dtype (fp16, bf16 or fp32).
        base: the frozen base weight: float [N, K], ``Packed4bit`` (NF4 / FP4) or ``PackedInt`` (int8 / fp8 per
            channel, int4 per group).
        bias: the base layer's bias [N], or None.
        lora_a: the adapter A [r, K]. Its gradient comes back in its own dtype.
        lora_b: the adapter B [N, r]. Likewise.
        meta: the LoRA scale and whether dropout is active (:class:`LoraMeta`).
        x_dropped: dropout(x) exactly when ``meta.dropout``, else None.

    Returns:
        y [..., N], in x's dtype.

    Raises:
        ValueError: from ``check_lora_inputs``: shapes that disagree, a base weight that requires grad or
            whose buffers do not match its metadata, or x_dropped not matching meta.
    """
    n, k = ref.check_lora_inputs(x, base, lora_a, lora_b, meta, x_dropped)
    x2 = x.reshape(-1, k).contiguous()
    xd2 = None if x_dropped is None else x_dropped.reshape(-1, k)
    y, _ = _lora_linear(x2, xd2, lora_a, lora_b, bias, *_weight_tensors(base), float(meta.scale))
    return y.reshape(*x.shape[:-1], n)
