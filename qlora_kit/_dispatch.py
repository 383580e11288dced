"""Which implementation runs: the Triton kernel or the pure-PyTorch reference.

Rule: CUDA tensors run the Triton kernels, CPU tensors the reference. The environment variable
QLORA_KIT_BACKEND overrides it: ``triton`` forces the Triton kernels (on CPU they need
TRITON_INTERPRET=1, set by the tests), ``reference`` forces the reference everywhere.
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "reference")


def backend() -> str:
    """The backend requested through QLORA_KIT_BACKEND ("auto" when unset)."""
    value = os.environ.get("QLORA_KIT_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"QLORA_KIT_BACKEND={value!r} is not valid; use one of {list(_CHOICES)}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel should process ``tensor``."""
    choice = backend()
    if choice == "auto":
        return tensor.is_cuda
    return choice == "triton"
