"""Registry of real model dimensions for the benchmarks.

Linear layers as (N, K) = (out_features, in_features): attention q/o, fused qkv, MLP up/gate and down.
"""

from __future__ import annotations

# model -> {layer: (N, K)}
LINEAR_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "llama3-8b": {
        "attn.o": (4096, 4096),
        "mlp.up": (14336, 4096),
        "mlp.down": (4096, 14336),
        "attn.qkv": (6144, 4096),
    },
    "llama2-7b": {
        "mlp.up": (11008, 4096),
    },
}

# rows of the activation matrix: decode (1..16), small batches, prefill / training
M_VALUES = (1, 4, 16, 64, 256, 2048)

# CPU smoke runs: small enough for the PyTorch reference path and bitsandbytes' CPU backend
QUICK_SHAPES: dict[str, dict[str, tuple[int, int]]] = {"tiny": {"square": (512, 512), "up": (1376, 512)}}
QUICK_M_VALUES = (1, 16)


def linear_cases(quick: bool = False, models: list[str] | None = None, m_values=None) -> list[dict]:
    """Benchmark cases ``{"model", "layer", "m", "n", "k"}`` over the registry (or the quick set)."""
    shapes = QUICK_SHAPES if quick else LINEAR_SHAPES
    if models:
        unknown = sorted(set(models) - set(shapes))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(shapes)}")
        shapes = {name: shapes[name] for name in models}
    m_values = m_values or (QUICK_M_VALUES if quick else M_VALUES)
    return [
        {"model": model, "layer": layer, "m": m, "n": n, "k": k}
        for model, layers in shapes.items()
        for layer, (n, k) in layers.items()
        for m in m_values
    ]
