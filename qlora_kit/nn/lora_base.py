"""The LoRA wrapper's body, shared by every layer kind: adapters, initialisation, forward, merge.

:class:`LoraLayer` keeps the original layer as ``base_layer`` and computes on the 2-D (output channels x
reduction) view of its weight (``geometry.py``), in which an adapter's update is ``s * B2d @ A2d``: merging,
PiSSA, LoftQ and DoRA norms are written once on that view. The per-kind wrappers (linear, conv, transposed
conv, embedding) are in ``lora_layers.py``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .geometry import from_2d, to_2d
from .quantized import QuantizedLayer, float_layer_like


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
        """The base weight (float layout) as (output channels x reduction): the geometry table's view."""
        return to_2d(self.base_layer, w)

    def _w_from_2d(self, w2d: torch.Tensor) -> torch.Tensor:
        return from_2d(self.base_layer, w2d, self._base_shape())

    def _base_shape(self) -> tuple[int, ...]:
        """The base weight's shape in the float layer's layout (without dequantizing)."""
        base = self.base_layer
        return base.logical_weight_shape() if isinstance(base, QuantizedLayer) else tuple(base.weight.shape)

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
