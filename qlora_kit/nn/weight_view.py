"""``QuantizedLayer.weight``: what model code that reads ``layer.weight`` gets from a quantized layer.

Model code reads weights directly: T5 checks ``self.wo.weight.dtype``, PEFT reads ``base_layer.weight``
for its device and dtype, tying code reads ``lm_head.weight``. A :class:`DequantizedWeight` answers
``.dtype`` (the compute dtype), ``.shape`` (the float layer's layout) and ``.device`` without touching
the packed codes; any torch operation on it (``.float()``, ``w @ x``, ``w.sum()``, printing) sees the
dequantized float weight. It holds no memory of its own and is rebuilt on each access, so it always
reflects the layer's current codes. Writing into it changes nothing: quantized layers are changed with
``set_float_weight``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


class DequantizedWeight(torch.Tensor):
    """A storage-less tensor whose values are the dequantized weight of one quantized layer.

    Example:
        >>> w = qlayer.weight              # cheap: no dequantization
        >>> w.dtype, w.shape               # (compute dtype, float layout)
        >>> w.float()                      # dequantizes (a plain fp32 tensor)
    """

    @staticmethod
    def __new__(cls, layer):
        q = layer.qweight
        device = next(q.parameters()).device
        return torch.Tensor._make_wrapper_subclass(
            cls, layer.logical_weight_shape(), dtype=layer.compute_dtype, device=device, requires_grad=False
        )

    def __init__(self, layer):
        self._layer = layer

    # torch functions fall through to __torch_dispatch__, whose results are plain tensors
    __torch_function__ = torch._C._disabled_torch_function_impl

    def materialize(self) -> torch.Tensor:
        """The dequantized weight, a plain tensor in ``self.dtype`` and the float layer's layout."""
        return self._layer.dequantize_weight(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.materialize() if isinstance(t, DequantizedWeight) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

    def __repr__(self) -> str:
        return (
            f"DequantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"format={self._layer.format_name})"
        )
