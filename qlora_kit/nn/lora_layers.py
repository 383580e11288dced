"""LoRA wrappers over any base layer: float or quantized (QLoRA).

A wrapper keeps the original layer as ``base_layer`` (PEFT's naming, so state-dict paths match PEFT)
and adds named adapters: y = base(x) + s * B(A(dropout(x))), s = alpha / r (alpha / sqrt(r) with
rsLoRA). Supported bases: nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d
(PEFT has no LoRA for transposed convolutions), nn.Embedding, and the quantized layers of
``qlora_kit/nn/quantized.py``.

Adapter tensors and their PEFT key names (per adapter ``name``):
    linear-like   lora_A.<name>.weight [r, in]          lora_B.<name>.weight [out, r]
    conv          lora_A.<name>.weight [r, in, *k]      lora_B.<name>.weight [out, r / groups, 1, ...]
    conv-transp.  lora_A.<name>.weight [in, r, *k]      lora_B.<name>.weight [out, r, 1, ...]
    embedding     lora_embedding_A.<name> [r, num]      lora_embedding_B.<name> [dim, r]
    DoRA          lora_magnitude_vector.<name>.weight   [out] (conv: [1, out, 1, ...])

Every kind also has a 2-D view, (output channels x reduction), in which the update is s * B2d @ A2d;
merging, PiSSA, LoftQ and DoRA norms are written once on that view.

On CUDA a linear-like layer with one active adapter runs the fused Triton kernel
(``kernels/lora.py``): the low-rank update is added in the epilogue of the base matmul, for float and
weight-only quantized bases (NF4, FP4, int8, fp8, int4; not W8A8 / fp8-dynamic layers). Elsewhere the
forward is the plain PyTorch composition (the reference).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import use_triton
from .quantized import (
    QuantConv1D,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantizedLayer,
    QuantLinear,
    _QuantConvNd,
    is_transformers_conv1d,
)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class LoraFactor(nn.Module):
    """Holds one adapter matrix as ``weight`` (so keys read ``lora_A.<name>.weight`` as in PEFT).

    Deliberately not an nn.Linear / nn.Conv: quantization walkers must never mistake an adapter for a
    layer to quantize.
    """

    def __init__(self, shape: tuple[int, ...], device=None, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def lora_kind(module: nn.Module) -> str | None:
    """The LoRA kind of a supported base layer ("linear", "conv", "conv_transpose", "embedding"), else None."""
    if isinstance(module, (nn.Linear, QuantLinear, QuantConv1D)) or is_transformers_conv1d(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, _QuantConvNd)):
        return "conv"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, QuantConvTranspose2d)):
        return "conv_transpose"
    if isinstance(module, (nn.Embedding, QuantEmbedding)):
        return "embedding"
    return None


def _is_conv1d_layout(base: nn.Module) -> bool:
    """transformers' Conv1D stores its weight as (in, out)."""
    return is_transformers_conv1d(base) or isinstance(base, QuantConv1D)


class LoraLayer(nn.Module):
    """A base layer plus named LoRA adapters. Build with :func:`wrap_with_lora`, not directly."""

    kind = ""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.fuse = True  # False: never take the fused Triton path (benchmarks, debugging)
        self._merge_undo: list[tuple] = []  # what unmerge needs, newest last

    def __getattr__(self, name: str):
        # attributes the wrapper lacks (weight, in_features, padding_idx, ...) come from the base layer, so
        # code reading e.g. ``model.embed_tokens.weight`` keeps working after wrapping
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "base_layer" or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    # ----- base layer access -------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base_layer, QuantizedLayer)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight in the float layer's layout (dequantized for quantized bases)."""
        base = self.base_layer
        if isinstance(base, QuantizedLayer):
            return base.dequantize_weight(dtype or torch.float32)
        return base.weight if dtype is None else base.weight.to(dtype)

    def set_base_weight(self, w: torch.Tensor) -> None:
        """Replace the base weight (requantized for quantized bases)."""
        base = self.base_layer
        if isinstance(base, QuantizedLayer):
            base.set_float_weight(w)
        else:
            with torch.no_grad():
                base.weight.copy_(w.to(base.weight.dtype))

    @property
    def groups(self) -> int:
        return int(getattr(self.base_layer, "groups", 1))

    # ----- per-kind hooks (overridden) ---------------------------------------------------------------
    def _dims(self) -> tuple[int, int]:
        """(input features, output features) of the base."""
        raise NotImplementedError

    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def rank_of(lora_a: torch.Tensor) -> int:
        """The rank r of an adapter, read from its A tensor."""
        return int(lora_a.shape[0])

    def _w_to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def _w_from_2d(self, w2d: torch.Tensor) -> torch.Tensor:
        return w2d

    def _a(self, name: str) -> torch.Tensor:
        return self.lora_A[name].weight

    def _b(self, name: str) -> torch.Tensor:
        return self.lora_B[name].weight

    def a_2d(self, name: str) -> torch.Tensor:
        """A as an (r, reduction) matrix."""
        return self._a(name).reshape(self.r[name], -1)

    def b_2d(self, name: str) -> torch.Tensor:
        """B as an (out, r) matrix."""
        return self._b(name).reshape(self._b(name).shape[0], -1)

    def _set_a_2d(self, name: str, a2d: torch.Tensor) -> None:
        with torch.no_grad():
            self._a(name).copy_(a2d.reshape(self._a(name).shape))

    def _set_b_2d(self, name: str, b2d: torch.Tensor) -> None:
        with torch.no_grad():
            self._b(name).copy_(b2d.reshape(self._b(name).shape))

    def _lora_forward(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """B(A(x)), unscaled."""
        raise NotImplementedError

    def _channel_view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-output-channel vector against an output tensor."""
        return t.reshape(-1)

    # ----- adapters ----------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
        base_name: str = "",
    ) -> None:
        """Create adapter ``name`` (rank ``r``) and initialise it (``init`` as in LoraConfig)."""
        if name in self.r:
            raise ValueError(f"{base_name or 'layer'} already has an adapter named {name!r}; pick another name")
        if self.kind == "conv" and r % self.groups:
            raise ValueError(
                f"{base_name or 'conv layer'} has groups={self.groups} and LoRA rank r={r}; "
                "use a rank divisible by groups or exclude this layer"
            )
        if use_dora and (self.kind not in ("linear", "conv") or self.groups > 1):
            raise ValueError(
                f"DoRA supports linear and ungrouped convolution layers, not {base_name or self.kind}; exclude it"
            )
        device = self.base_device()
        shape_a, shape_b = self._factor_shapes(r)
        if self.kind == "embedding":
            self.lora_embedding_A[name] = nn.Parameter(torch.zeros(shape_a, device=device))
            self.lora_embedding_B[name] = nn.Parameter(torch.zeros(shape_b, device=device))
        else:
            self.lora_A[name] = LoraFactor(shape_a, device=device)
            self.lora_B[name] = LoraFactor(shape_b, device=device)
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_adapter(name, init, base_name)
        if use_dora:
            self._init_dora(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; call unmerge_lora first")
        for container in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B):
            if name in container:
                del container[name]
        for container in (self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def base_device(self) -> torch.device:
        for t in list(self.base_layer.parameters()) + list(self.base_layer.buffers()):
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def _init_adapter(self, name: str, init: str, base_name: str) -> None:
        if init in ("default", "gaussian"):
            if self.kind == "embedding":  # as PEFT: A = 0, B ~ N(0, 1)
                nn.init.normal_(self.lora_embedding_B[name])
            elif init == "default":  # as PEFT: A like nn.Linear's default, B = 0
                nn.init.kaiming_uniform_(self._a(name), a=math.sqrt(5))
            else:
                nn.init.normal_(self._a(name), std=1 / self.r[name])
            return
        if self.groups > 1:
            raise ValueError(f"init={init!r} needs groups=1, but {base_name or 'this layer'} has groups={self.groups}")
        if init == "pissa":
            self._init_pissa(name)
        elif init == "loftq":
            self._init_loftq(name, base_name)
        else:
            raise ValueError(f"unknown LoRA init {init!r}")

    def _init_pissa(self, name: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; the base keeps the residual."""
        r, s = self.r[name], self.scaling[name]
        w2d = self._w_to_2d(self.base_weight(torch.float32)).float()
        u, sv, vh = torch.linalg.svd(w2d, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        a2d, b2d = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        self._set_a_2d(name, a2d)
        self._set_b_2d(name, b2d)
        self.set_base_weight(self._w_from_2d(w2d - s * b2d @ a2d))

    def _init_loftq(self, name: str, base_name: str) -> None:
        """LoftQ (one alternation): W ~ nf4(W - s B A) + s B A, with NF4 blocks of 64 on the 2-D view.

        The base weight becomes the dequantized NF4 part, so a later ``quantize(model, NF4Config(
        blocksize=64))`` reproduces it.
        """
        if self.is_quantized:
            raise ValueError(
                f"init='loftq' needs the float weights, but {base_name or 'this layer'} is already quantized; "
                "call add_lora on the float model first, then quantize it"
            )
        if self.kind == "embedding":
            raise ValueError(f"init='loftq' does not support embeddings ({base_name}); exclude them or use 'default'")
        from ..functional import dequantize_nf4, quantize_nf4

        r, s = self.r[name], self.scaling[name]
        w2d = self._w_to_2d(self.base_weight(torch.float32)).float()
        packed, absmax = quantize_nf4(w2d, 64)
        q2d = dequantize_nf4(packed, absmax, w2d.shape, 64, torch.float32)
        u, sv, vh = torch.linalg.svd(w2d - q2d, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        self._set_a_2d(name, root[:, None] * vh[:r])
        self._set_b_2d(name, u[:, :r] * root[None, :])
        self.set_base_weight(self._w_from_2d(q2d))

    @torch.no_grad()
    def _init_dora(self, name: str) -> None:
        norm = self._dora_norm(name, self.base_weight(torch.float32).float())
        shape = (1, -1) + (1,) * (self.base_layer_weight_dim() - 2) if self.kind == "conv" else (-1,)
        magnitude = norm.reshape(shape)
        holder = LoraFactor(tuple(magnitude.shape), device=magnitude.device)
        holder.weight.copy_(magnitude)
        self.lora_magnitude_vector[name] = holder

    def base_layer_weight_dim(self) -> int:
        return len(getattr(self.base_layer, "kernel_size", ())) + 2

    def _dora_norm(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Row norms of W2d + s B2d A2d (per output channel), without gradient."""
        delta = self.b_2d(name).detach().to(w.dtype) @ self.a_2d(name).detach().to(w.dtype)
        return torch.linalg.norm(self._w_to_2d(w) + self.scaling[name] * delta, dim=1)

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * B A in the base layer's weight layout."""
        if self.groups > 1:
            raise ValueError(f"a LoRA update over a grouped convolution (groups={self.groups}) has no weight form")
        delta2d = self.b_2d(name).detach().to(dtype) @ self.a_2d(name).detach().to(dtype)
        return self._w_from_2d(self.scaling[name] * delta2d)

    # ----- forward -----------------------------------------------------------------------------------
    def _live_adapters(self) -> list[str]:
        if self.adapters_disabled:
            return []
        return [a for a in self.active_adapters if a in self.r and a not in self.merged_adapters]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self._live_adapters()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        fused = self._fused_forward(x, live) if not args and not kwargs else None
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in live:
            if self.kind == "embedding":
                low = self._lora_forward(name, x)
                result = result + (self.scaling[name] * low).to(out_dtype)
                continue
            dtype = self._a(name).dtype
            x_d = self.lora_dropout[name](x.to(dtype) if x.is_floating_point() else x)
            low = self._lora_forward(name, x_d, *args, **kwargs)
            if name in self.lora_magnitude_vector:
                result = result + self._dora_term(name, x, x_d, result, low).to(out_dtype)
            else:
                result = result + (self.scaling[name] * low).to(out_dtype)
        return result

    def _dora_term(self, name, x, x_d, result, low) -> torch.Tensor:
        """DoRA (as PEFT): (m / ||W + s dW|| - 1) * base(x_d) + m / ||W + s dW|| * s * low, norm detached."""
        weight = self.base_weight(torch.float32)
        norm = self._dora_norm(name, weight.float()).detach()
        scale = self.lora_magnitude_vector[name].weight.reshape(-1) / norm
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            base_result = result.to(low.dtype)
        else:
            base_result = self.base_layer(x_d.to(x.dtype)).to(low.dtype)
        if bias is not None:
            base_result = base_result - self._channel_view(bias.to(low.dtype), base_result)
        scale = self._channel_view(scale.to(low.dtype), low)
        return (scale - 1) * base_result + scale * low * self.scaling[name]

    def _fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor | None:
        """The fused Triton path (linear-like layers only); None when it does not apply."""
        return None

    # ----- merge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, requantize: bool = True) -> float | None:
        """Fold the active adapters into the base weight; undo with :meth:`unmerge`.

        Float bases are updated in place (exactly undoable up to rounding). Quantized bases go through a
        dequantized fp32 copy, then are requantized (``requantize=True``) or replaced by a float layer
        in the compute dtype; the original quantized layer is kept so that unmerging restores it exactly.

        Returns:
            For quantized bases, the relative drift ||W_new - (W + dW)||_F / ||W + dW||_F, which is the
            expected relative output error for white-noise inputs; None for float bases.
        """
        names = [a for a in self.active_adapters if a in self.r and a not in self.merged_adapters]
        if not names:
            return None
        if self.groups > 1:
            raise ValueError(f"cannot merge LoRA into a grouped convolution (groups={self.groups}); keep it unmerged")
        if not self.is_quantized:
            weight = self.base_layer.weight
            for name in names:
                if name in self.lora_magnitude_vector:
                    w = weight.float()
                    factor = self.lora_magnitude_vector[name].weight.reshape(-1) / self._dora_norm(name, w)
                    merged = self._scale_rows(w + self.delta_weight(name), factor)
                    weight.copy_(merged.to(weight.dtype))
                    self._merge_undo.append(("dora", name, factor))
                else:
                    weight.add_(self.delta_weight(name).to(weight.dtype))
                    self._merge_undo.append(("add", name, None))
                self.merged_adapters.append(name)
            return None
        base = self.base_layer
        target = base.dequantize_weight(torch.float32).float()
        for name in names:
            if name in self.lora_magnitude_vector:
                factor = self.lora_magnitude_vector[name].weight.reshape(-1) / self._dora_norm(name, target)
                target = self._scale_rows(target + self.delta_weight(name), factor)
            else:
                target = target + self.delta_weight(name)
        original = copy.deepcopy(base)
        if requantize:
            base.set_float_weight(target)
            new = base.dequantize_weight(torch.float32).float()
        else:
            self.base_layer = float_layer_like(base, target.to(base.compute_dtype))
            new = self.base_layer.weight.float()
        self._merge_undo.append(("restore", tuple(names), original))
        self.merged_adapters.extend(names)
        return float(torch.linalg.norm(new - target) / torch.linalg.norm(target).clamp(min=1e-30))

    def _scale_rows(self, w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return self._w_from_2d(self._w_to_2d(w) * factor[:, None])

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (newest merge first)."""
        while self._merge_undo:
            kind, name, state = self._merge_undo.pop()
            if kind == "restore":
                self.base_layer = state
                self.merged_adapters = [a for a in self.merged_adapters if a not in name]
                continue
            weight = self.base_layer.weight
            if kind == "dora":
                w = self._scale_rows(weight.float(), 1.0 / state) - self.delta_weight(name)
                weight.copy_(w.to(weight.dtype))
            else:
                weight.sub_(self.delta_weight(name).to(weight.dtype))
            self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={self.adapter_names}, active={self.active_adapters}"


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear, transformers' Conv1D, QuantLinear and QuantConv1D."""

    kind = "linear"

    def _dims(self):
        base = self.base_layer
        if isinstance(base, QuantConv1D):
            return base.nx, base.nf
        if is_transformers_conv1d(base):
            return base.weight.shape[0], base.weight.shape[1]
        return base.in_features, base.out_features

    def _factor_shapes(self, r):
        fan_in, fan_out = self._dims()
        return (r, fan_in), (fan_out, r)

    def _w_to_2d(self, w):
        return w.t() if _is_conv1d_layout(self.base_layer) else w

    def _w_from_2d(self, w2d):
        return w2d.t() if _is_conv1d_layout(self.base_layer) else w2d

    def _lora_forward(self, name, x, *args, **kwargs):
        return F.linear(F.linear(x, self._a(name)), self._b(name))

    def _fused_forward(self, x, live):
        if not self.fuse or len(live) != 1 or live[0] in self.lora_magnitude_vector or not use_triton(x):
            return None
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None
        from .fake_quant import is_fake_quant

        if is_fake_quant(self.base_layer):  # QAT base: its forward fake-quantizes the weight, the kernel would not
            return None
        from ..ops_lora import LoraMeta, lora_linear

        name, base = live[0], self.base_layer
        dropout = self.lora_dropout[name]
        if isinstance(base, QuantizedLayer):
            weight = self._packed_base(base)
            if weight is None:
                return None
            x_c = x.to(base.compute_dtype)
        else:
            w = base.weight
            if w.requires_grad or not w.is_floating_point():
                return None
            weight = w.t() if _is_conv1d_layout(base) else w
            x_c = x
        bias = base.bias
        x_d = dropout(x_c) if isinstance(dropout, nn.Dropout) and self.training and dropout.p > 0 else None
        meta = LoraMeta(scale=self.scaling[name], dropout=x_d is not None)
        y = lora_linear(x_c, weight, bias, self._a(name), self._b(name), meta, x_dropped=x_d)
        return y.to(x.dtype)

    @staticmethod
    def _packed_base(base: QuantizedLayer):
        """The quantized weight as the fused kernel's weight object, or None when the kernel cannot take it.

        Weight-only formats only: a layer that also quantizes its activations (W8A8 / fp8 dynamic,
        ``quant_config.activation``) computes something else, so it keeps its own forward. int4 groups
        narrower than 32 columns do not fit the kernel's tiles.
        """
        from ..kernels.lora import IntQuantMeta, Packed4bit, PackedInt, Quant4bitMeta

        if getattr(base.quant_config, "activation", None) is not None:
            return None
        q = base.qweight
        fmt = getattr(q, "name", "")
        if fmt in ("nf4", "fp4"):
            w_meta = Quant4bitMeta(tuple(q.shape), q.blocksize, q.quant_type, q.double_quant)
            if q.double_quant:
                return Packed4bit(q.packed, w_meta, qabsmax=q.qabsmax, nested_absmax=q.nested_absmax, offset=q.offset)
            return Packed4bit(q.packed, w_meta, absmax=q.absmax)
        if fmt in ("int8", "fp8"):
            return PackedInt(q.qdata, q.scale, IntQuantMeta(tuple(q.shape), fmt))
        if fmt == "int4" and q.group_size >= 32:
            return PackedInt(q.packed, q.scale, IntQuantMeta(tuple(q.shape), "int4", q.group_size), zero=q.zero)
        return None


class LoraConv(LoraLayer):
    """LoRA over nn.Conv1d/2d/3d and the quantized convolutions: A is a conv with the base's geometry
    (groups 1), B a 1x1 conv with the base's groups, as PEFT."""

    kind = "conv"

    def _nd(self) -> int:
        return len(self.base_layer.kernel_size)

    def _dims(self):
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _factor_shapes(self, r):
        base = self.base_layer
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // self.groups) + (1,) * self._nd()

    def _w_to_2d(self, w):
        return w.reshape(w.shape[0], -1)

    def _w_from_2d(self, w2d):
        base = self.base_layer
        return w2d.reshape(base.out_channels, base.in_channels // self.groups, *base.kernel_size)

    def _channel_view(self, t, like):
        return t.reshape((1, -1) + (1,) * (like.dim() - 2))

    def _lora_forward(self, name, x, *args, **kwargs):
        base, conv = self.base_layer, _CONV[self._nd()]
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        h = conv(x, self._a(name), None, base.stride, padding, base.dilation, 1)
        return conv(h, self._b(name), None, 1, 0, 1, self.groups)


class LoraConvTranspose(LoraLayer):
    """LoRA over nn.ConvTranspose1d/2d/3d and QuantConvTranspose2d (not in PEFT).

    A is a transposed conv with the base's geometry from ``in`` to ``r`` channels (weight [in, r, *k]),
    B a 1x1 conv from ``r`` to ``out`` (weight [out, r, 1, ...]); the update's weight (groups=1) is
    dW[i, o] = sum_j A[i, j] B[o, j].
    """

    kind = "conv_transpose"

    @staticmethod
    def rank_of(lora_a):
        return int(lora_a.shape[1])

    def _nd(self) -> int:
        return len(self.base_layer.kernel_size)

    def _dims(self):
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _factor_shapes(self, r):
        base = self.base_layer
        return (base.in_channels, r, *base.kernel_size), (base.out_channels, r) + (1,) * self._nd()

    def _w_to_2d(self, w):  # (in, out, *k) -> (out, in * k)
        return w.transpose(0, 1).reshape(w.shape[1], -1)

    def _w_from_2d(self, w2d):
        base = self.base_layer
        return w2d.reshape(base.out_channels, base.in_channels, *base.kernel_size).transpose(0, 1)

    def a_2d(self, name):
        return self._a(name).transpose(0, 1).reshape(self.r[name], -1)

    def _set_a_2d(self, name, a2d):
        a = self._a(name)
        with torch.no_grad():
            a.copy_(a2d.reshape(a.shape[1], a.shape[0], *a.shape[2:]).transpose(0, 1))

    def _channel_view(self, t, like):
        return t.reshape((1, -1) + (1,) * (like.dim() - 2))

    def _lora_forward(self, name, x, *args, **kwargs):
        base, nd = self.base_layer, self._nd()
        output_size = kwargs.get("output_size", args[0] if args else None)
        output_padding = base.output_padding
        if output_size is not None:
            output_padding = nn.ConvTranspose2d._output_padding(
                base, x, output_size, base.stride, base.padding, base.kernel_size, nd, base.dilation
            )
        h = _CONV_T[nd](x, self._a(name), None, base.stride, base.padding, output_padding, 1, base.dilation)
        return _CONV[nd](h, self._b(name))


class LoraEmbedding(LoraLayer):
    """LoRA over nn.Embedding / QuantEmbedding: out += s * A^T[ids] B^T (PEFT's lora_embedding_A/B)."""

    kind = "embedding"

    def _dims(self):
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def _factor_shapes(self, r):
        num, dim = self._dims()
        return (r, num), (dim, r)

    def _a(self, name):
        return self.lora_embedding_A[name]

    def _b(self, name):
        return self.lora_embedding_B[name]

    def _w_to_2d(self, w):  # (num, dim) -> (dim, num): output channels are the embedding dims
        return w.t()

    def _w_from_2d(self, w2d):
        return w2d.t()

    def _lora_forward(self, name, ids, *args, **kwargs):
        base = self.base_layer
        h = F.embedding(
            ids,
            self._a(name).t(),
            base.padding_idx,
            None,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return h @ self._b(name).t()


_WRAPPERS = {"linear": LoraLinear, "conv": LoraConv, "conv_transpose": LoraConvTranspose, "embedding": LoraEmbedding}


def lora_wrapper_class(module: nn.Module) -> type[LoraLayer]:
    """The LoRA wrapper class for a supported ``module``."""
    kind = lora_kind(module)
    if kind is None:
        raise ValueError(
            f"LoRA does not support {type(module).__name__}; supported: Linear, transformers Conv1D, Conv1d/2d/3d, "
            "ConvTranspose1d/2d/3d, Embedding and their quantized versions"
        )
    return _WRAPPERS[kind]


def wrap_with_lora(module: nn.Module) -> LoraLayer:
    """A LoRA wrapper (without adapters yet) around a supported ``module``."""
    return lora_wrapper_class(module)(module)


def float_layer_like(base: QuantizedLayer, weight: torch.Tensor) -> nn.Module:
    """A float layer of the kind ``base`` replaces, holding ``weight`` (float layout) and base's bias."""
    bias = base.bias
    with torch.device("meta"):
        if isinstance(base, (QuantLinear,)):
            layer = nn.Linear(base.in_features, base.out_features, bias=bias is not None)
        elif isinstance(base, QuantConv1D):
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(base.nf, base.nx)
        elif isinstance(base, QuantEmbedding):
            layer = nn.Embedding(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx)
        else:
            cls = base.float_cls
            kwargs = dict(
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=base.groups,
                bias=bias is not None,
                padding_mode=base.padding_mode,
            )
            if isinstance(base, QuantConvTranspose2d):
                kwargs["output_padding"] = base.output_padding
            layer = cls(base.in_channels, base.out_channels, base.kernel_size, **kwargs)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if getattr(layer, "bias", None) is not None or bias is not None:
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return layer
