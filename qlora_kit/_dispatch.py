"""Which implementation runs: the Triton kernel, the CPU kernels of ``kernels/cpu.py``, or the pure-PyTorch reference.

Rule: CUDA tensors run the Triton kernels; CPU tensors the CPU kernels where they apply (``use_cpu_kernels``; the
kernels themselves fall back to the reference for small weights), else the reference. The environment variable
QLORA_KIT_BACKEND overrides it: ``triton`` forces the Triton kernels (on CPU they need
TRITON_INTERPRET=1, set by the tests), ``reference`` forces the reference everywhere.

``custom_op`` / ``call``: the forward matmul ops are ``torch.library`` custom ops (for torch.compile, autograd,
FakeTensor), and their callers go through ``call``, which runs the op's own function directly where the dispatcher
has nothing to do. The dispatcher costs about 0.2 ms a call on the 2-core EPYC this project runs on (measured,
int8 4096x4096 GEMV at one row, no_grad: 0.86 ms in the kernel, 1.11 ms through the op), a fifth of a decode
step's layer; the direct call is bit-identical (the same function runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

_CHOICES = ("auto", "triton", "reference")


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read where it is cheap. Right after a layer has streamed its weight, ``os.environ.get``
    costs about 30 us (its key encoding runs in Python from cold caches; measured on the 2-core EPYC, a sixth of a
    1 MB layer's call). On POSIX, CPython keeps os.environ in a bytes dict that every ``os.environ`` write (pytest's
    monkeypatch included) updates; one lookup there costs a few microseconds."""
    data = getattr(os.environ, "_data", None) if os.name == "posix" else None
    if type(data) is not dict:
        return os.environ.get(name)
    value = data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def backend() -> str:
    """The backend requested through QLORA_KIT_BACKEND ("auto" when unset)."""
    value = (_getenv("QLORA_KIT_BACKEND") or "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"QLORA_KIT_BACKEND={value!r} is not valid; use one of {list(_CHOICES)}")
    return value


def use_cpu_kernels(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` may go to the CPU kernels of ``kernels/cpu.py`` (None from them: the reference runs):
    a CPU tensor, the "auto" backend, and QLORA_KIT_CPU_KERNELS not "0"."""
    return tensor.is_cpu and backend() == "auto" and (_getenv("QLORA_KIT_CPU_KERNELS") or "1").strip() != "0"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel should process ``tensor``."""
    choice = backend()
    if choice == "auto":
        return tensor.is_cuda
    return choice == "triton"


_FUNCTIONS: dict[object, Callable] = {}


def custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` that also remembers the function for :func:`call`."""

    def wrap(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _FUNCTIONS[op] = fn
        return op

    return wrap


def call(op, *args):
    """``op(*args)``; for an op made with :func:`custom_op`, its function directly when the dispatcher has nothing
    to do: x (the first argument) a plain CPU Tensor, nothing to record for autograd, and no compiling, tracing,
    functorch transform, or dispatch / function mode. (One function, no helpers: right after a layer has streamed
    its weight the interpreter runs from cold caches, and every call here costs microseconds.)"""
    fn = _FUNCTIONS.get(op)
    if fn is None or torch.compiler.is_compiling():  # first: Dynamo folds it, and would break the graph below
        return op(*args)
    x = args[0]
    if (
        type(x) is not torch.Tensor
        or not x.is_cpu
        or (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._is_tracing()
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return op(*args)
    return fn(*args)
