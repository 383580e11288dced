"""Shared body of the two bitsandbytes 4-bit block formats (NF4 and FP4 differ only in the code table)."""

from __future__ import annotations

import math

import torch

from .. import functional as F
from .. import ops
from .base import WeightFormat, check_matrix, refuse_activation, register_frozen


class Blockwise4bitWeight(WeightFormat):
    """Packed 4-bit codes over the flattened matrix, one absmax per block, optionally double-quantized.

    Frozen parameters: ``packed`` uint8 [ceil(numel / 2)]; ``absmax`` fp32 [nblocks] or, with double quantization,
    ``qabsmax`` uint8 [nblocks], ``nested_absmax`` fp32 [ceil(nblocks / 256)]; buffer ``offset`` fp32 0-dim.
    """

    name = ""
    quant_type = ""
    configs: tuple[type, ...] = ()
    meta_fields = ("blocksize", "double_quant")

    @classmethod
    def describe(cls, config) -> str:
        return f"{cls.name} (blocks of {config.blocksize}{', double quant' if config.double_quant else ''})"

    @classmethod
    def nbytes_for(cls, shape, config) -> int:
        n = math.prod(shape)
        blocks = math.ceil(n / config.blocksize)
        scales = blocks + 4 * math.ceil(blocks / 256) + 4 if config.double_quant else 4 * blocks
        return (n + 1) // 2 + scales

    def __init__(self, shape, blocksize: int, double_quant: bool):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        n = math.prod(self.shape)
        nblocks = math.ceil(n / self.blocksize)
        register_frozen(self, "packed", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        if self.double_quant:
            register_frozen(self, "qabsmax", torch.zeros(nblocks, dtype=torch.uint8))
            register_frozen(self, "nested_absmax", torch.zeros(math.ceil(nblocks / 256), dtype=torch.float32))
            # a buffer: FSDP2 cannot shard 0-dim parameters, and 4 bytes replicated per rank cost nothing
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
        else:
            register_frozen(self, "absmax", torch.zeros(nblocks, dtype=torch.float32))

    @classmethod
    def from_float(cls, w: torch.Tensor, config, *, tensor_name: str = "weight"):
        check_matrix(w, tensor_name)
        quantize = F.quantize_nf4 if cls.quant_type == "nf4" else F.quantize_fp4
        packed, absmax = quantize(w, config.blocksize, name=tensor_name)
        obj = cls(w.shape, config.blocksize, config.double_quant).to(w.device)
        obj.set_codes(packed, absmax)
        return obj

    @torch.no_grad()
    def set_codes(self, packed: torch.Tensor, absmax: torch.Tensor) -> None:
        """Store quantized codes and their fp32 block absmax (double-quantizing the absmax when configured)."""
        self.packed.copy_(packed.reshape(self.packed.shape))
        if self.double_quant:
            qabsmax, nested, offset = F.double_quantize(absmax)
            self.qabsmax.copy_(qabsmax)
            self.nested_absmax.copy_(nested)
            self.offset.copy_(offset)
        else:
            self.absmax.copy_(absmax)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (decoded from the nested state with double quantization)."""
        if self.double_quant:
            return F.double_dequantize(self.qabsmax, self.nested_absmax, self.offset)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        dequantize = F.dequantize_nf4 if self.quant_type == "nf4" else F.dequantize_fp4
        return dequantize(self.packed, self.block_absmax(), self.shape, self.blocksize, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> torch.Tensor:
        """y = x W^T + bias through the ``qlora_kit::matmul_4bit`` custom op (weight-only: no activation modes)."""
        if activation is not None:
            refuse_activation(self.name, activation)
        if self.double_quant:
            stats = (self.qabsmax, self.nested_absmax, self.offset)
        else:
            stats = (self.absmax, None, None)
        n, k = self.shape
        return ops.call(ops.matmul_4bit, x, self.packed, *stats, bias, n, k, self.blocksize, self.quant_type)

    def kernel_weight(self):
        """The codes and scales as the fused LoRA kernel's ``Packed4bit`` operand."""
        from ..kernels.reference.matmul import Packed4bit, Quant4bitMeta

        meta = Quant4bitMeta(self.shape, self.blocksize, self.quant_type, self.double_quant)
        if self.double_quant:
            return Packed4bit(
                self.packed, meta, qabsmax=self.qabsmax, nested_absmax=self.nested_absmax, offset=self.offset
            )
        return Packed4bit(self.packed, meta, absmax=self.absmax)
