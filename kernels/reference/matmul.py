"""Pure-PyTorch references for the quantized matmuls and the dynamic activation quantizers.

These define the numerics the Triton kernels in ``kernels/matmul_4bit.py``, ``kernels/matmul_int.py`` and
``kernels/act_quant.py`` are tested against, and they are what the custom ops run on CPU.

Weight-only products (y = x W^T + b, W of shape (N, K) = (out, in)) dequantize W to the activation dtype
first, exactly as the format's ``dequantize`` does, then call ``F.linear``. Layouts:

* NF4 / FP4 (bitsandbytes): ``packed`` uint8 over the row-major flattened W, blocks of ``blocksize`` over
  the flat index (a block may straddle two rows when K % blocksize != 0); fp32 ``absmax`` per block, or
  ``qabsmax`` uint8 + ``nested_absmax`` fp32 per 256 blocks + ``offset`` with double quantization.
* int4 per group: ``packed`` uint8 [N, ceil(K/2)] (column 2j in the high nibble), bf16 ``scale`` and
  ``zero`` [N, ceil(K/group_size)]; W = (q - zero) * scale in fp32.
* per channel (int8 or fp8 e4m3 codes): ``qdata`` [N, K], fp32 ``scale`` [N]; W = qdata * scale.

Dynamic activation quantization (W8A8 / fp8): per token (row) absmax -> scale = absmax / 127 (or / 448
for e4m3; 1.0 for an all-zero row), q = clamp(round_half_even(x / scale)) for int8, ``.to(e4m3)`` for
fp8. The GEMM accumulates q_x q_w^T exactly (int32 / fp32) and its epilogue is, in fp32 and this order,
``acc * x_scale[:, None] * w_scale[None, :] + bias``, cast to the output dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .quant_4bit import BLOCKSIZES, dequantize_4bit, double_dequantize
from .quant_int import dequantize_int4  # re-exported: one int4 reference, used by the matmul references

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def check_shape_2d(meta) -> tuple[int, int]:
    """``meta.shape`` as a tuple of two ints >= 1 (a weight's (N, K)); ValueError naming ``meta``'s class."""
    shape = tuple(int(s) for s in meta.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{type(meta).__name__}.shape must be (N, K) with N, K >= 1, got {meta.shape!r}")
    return shape


def check_last_dim(x: torch.Tensor, k: int, what: str = "x") -> None:
    """ValueError unless ``x``'s last dimension is ``k``, the weight's (the kernels read K from the weight)."""
    if x.shape[-1] != k:
        raise ValueError(
            f"{what} has last dimension {x.shape[-1]} but the weight needs {k}; check the layer's in/out sizes"
        )


@dataclass(frozen=True)
class Quant4bitMeta:
    """Static description of an NF4/FP4 weight (everything but its buffers).

    Args:
        shape: (N, K) = (output channels, reduction dim) of the 2-D weight.
        blocksize: values per absmax block over the flattened weight (32 ... 4096).
        quant_type: "nf4" or "fp4".
        double_quant: whether the absmax is stored as uint8 codes + nested fp32 absmax + offset.
    """

    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    double_quant: bool

    def __post_init__(self):
        object.__setattr__(self, "shape", check_shape_2d(self))
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"Quant4bitMeta.blocksize must be one of {list(BLOCKSIZES)}, got {self.blocksize!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"Quant4bitMeta.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"Quant4bitMeta.double_quant must be a bool, got {self.double_quant!r}")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)


class Packed4bit(NamedTuple):
    """The buffers of an NF4/FP4 weight plus its metadata.

    ``absmax`` is the fp32 per-block absmax without double quantization; with it, ``absmax`` is None and
    ``qabsmax`` / ``nested_absmax`` / ``offset`` are set.
    """

    packed: torch.Tensor
    meta: Quant4bitMeta
    absmax: torch.Tensor | None = None
    qabsmax: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def check(self) -> Packed4bit:
        """Validate buffer sizes against ``meta``; returns self."""
        m = self.meta
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (m.numel + 1) // 2:
            raise ValueError(
                f"packed must be uint8 with {(m.numel + 1) // 2} bytes for shape {m.shape}, "
                f"got {self.packed.dtype} with {self.packed.numel()}"
            )
        stats = self.qabsmax if m.double_quant else self.absmax
        if stats is None or stats.numel() != m.nblocks:
            what = "qabsmax" if m.double_quant else "absmax"
            raise ValueError(f"{what} must hold {m.nblocks} values for shape {m.shape} and blocksize {m.blocksize}")
        if m.double_quant and (self.nested_absmax is None or self.offset is None):
            raise ValueError(
                "a double-quantized weight needs nested_absmax and offset; pass them or set double_quant=False"
            )
        return self

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax of every block (decoded from the nested state with double quantization)."""
        if self.meta.double_quant:
            return double_dequantize(self.qabsmax, self.nested_absmax, self.offset)
        return self.absmax.float()


# ----------------------------------------------------------------------------------------------- weights


def dequantize_packed_4bit(w: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) NF4/FP4 weight in ``dtype`` (code * absmax in fp32, then cast)."""
    m = w.meta
    return dequantize_4bit(w.packed, w.block_absmax(), m.shape, m.blocksize, m.quant_type, dtype)


def dequantize_channelwise(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-output-channel weight (int8 or fp8 codes) -> qdata * scale[:, None] in fp32, then cast."""
    return (qdata.float() * scale.float()[:, None]).to(dtype)


# ------------------------------------------------------------------------------- weight-only products


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x w^T + b with w already dequantized to x's dtype (any leading dims of x)."""
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def grad_input_ref(grad_out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dL/dx = grad_out @ w for y = x w^T (w already dequantized)."""
    return torch.matmul(grad_out, w.to(grad_out.dtype))


def matmul_4bit_ref(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W)^T + bias for an NF4/FP4 weight."""
    return linear_ref(x, dequantize_packed_4bit(w, x.dtype), bias)


def matmul_int4_ref(x, packed, scale, zero, group_size: int, bias=None) -> torch.Tensor:
    """x @ dequant(W)^T + bias for an int4 per-group weight."""
    return linear_ref(x, dequantize_int4(packed, scale, zero, x.shape[-1], group_size, x.dtype), bias)


def matmul_channelwise_ref(x, qdata, scale, bias=None) -> torch.Tensor:
    """x @ (qdata * scale[:, None])^T + bias for an int8 / fp8 per-channel weight."""
    return linear_ref(x, dequantize_channelwise(qdata, scale, x.dtype), bias)


# -------------------------------------------------------------------------- activation quantization


def _row_scale(x2d: torch.Tensor, qmax: float) -> torch.Tensor:
    absmax = x2d.abs().amax(dim=1)
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of the flattened (M, K) activations.

    Returns:
        (q int8 [M, K], scale fp32 [M]) with x ~= q * scale[:, None].
    """
    x2d = x.reshape(-1, x.shape[-1]).float()
    scale = _row_scale(x2d, INT8_MAX)
    q = torch.clamp(torch.round(x2d / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 e4m3 per row: scale = absmax / 448; q = (x / scale) rounded to e4m3 (half to even).

    Returns:
        (q float8_e4m3fn [M, K], scale fp32 [M]).
    """
    x2d = x.reshape(-1, x.shape[-1]).float()
    scale = _row_scale(x2d, FP8_E4M3_MAX)
    q = torch.clamp(x2d / scale[:, None], -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def scaled_gemm_ref(xq, x_scale, wq, w_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq wq^T) * x_scale[:, None] * w_scale[None, :] + bias, accumulated exactly, epilogue in fp32.

    ``xq``/``wq`` are int8 (exact int32 sums) or fp8 e4m3 (products are exact in fp64, and fp32 in
    the kernel); the sum is formed in fp64 here, which equals the int32 sum for int8.
    """
    acc = (xq.double() @ wq.double().t()).float()
    out = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_dynamic_linear_ref(x, w_int8, w_scale, bias=None) -> torch.Tensor:
    """W8A8: quantize x per token to int8, int GEMM, scale epilogue; output in x's dtype and leading shape."""
    xq, xs = quantize_per_token_int8(x)
    out = scaled_gemm_ref(xq, xs, w_int8, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def fp8_dynamic_linear_ref(x, w_fp8, w_scale, bias=None) -> torch.Tensor:
    """fp8 e4m3 rowwise: quantize x per token to e4m3, GEMM, scale epilogue; output in x's dtype."""
    xq, xs = quantize_per_token_fp8(x)
    out = scaled_gemm_ref(xq, xs, w_fp8, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w_fp8.shape[0])
