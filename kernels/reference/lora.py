"""Pure-PyTorch reference for the fused LoRA linear in ``kernels/lora.py``.

Shapes: x [M, K] (rows are tokens), base weight W [N, K], bias [N], A [r, K], B [N, r], s the LoRA scale.
``x_dropped`` is dropout(x); without dropout it is x itself.

Forward:
    y = x W^T + bias + s * (x_dropped A^T) B^T

Backward (the base weight and bias are frozen):
    G       = dY B                                   [M, r]
    dX      = dY W            (+ s G A when x_dropped is x)
    dX_drop = s G A           (only with dropout; autograd carries it back through the dropout mask)
    dA      = s G^T x_dropped                        [r, K]
    dB      = s dY^T (x_dropped A^T)                 [N, r]

These functions are the CPU path of the LoRA layers and what the Triton kernels are tested against
(in fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias + s * (x_dropped A^T) B^T, in the dtype of ``x`` (autograd-capable)."""
    x_dropped = x if x_dropped is None else x_dropped
    base = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    low_rank = F.linear(F.linear(x_dropped, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + scale * low_rank


def lora_linear_backward(
    grad_out: torch.Tensor,
    x_dropped: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The backward formulas above.

    Returns:
        (dX, dX_drop, dA, dB); ``dX`` already includes ``s G A`` and ``dX_drop`` is None when ``dropout``
        is False (x_dropped is x).
    """
    g = grad_out @ lora_b.to(grad_out.dtype)
    low = scale * (g @ lora_a.to(grad_out.dtype))
    grad_x = grad_out @ weight.to(grad_out.dtype)
    grad_x_dropped = None
    if dropout:
        grad_x_dropped = low
    else:
        grad_x = grad_x + low
    grad_a = scale * (g.t() @ x_dropped.to(grad_out.dtype))
    grad_b = scale * (grad_out.t() @ (x_dropped.to(grad_out.dtype) @ lora_a.to(grad_out.dtype).t()))
    return grad_x, grad_x_dropped, grad_a, grad_b
