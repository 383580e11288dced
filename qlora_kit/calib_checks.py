"""Calibration data checked at the API boundary (GPTQ, AWQ, SmoothQuant), one sentence per mistake.

Wrong calibration data used to reach the model and fail deep inside it (``embedding(): argument 'indices'
must be Tensor``). Checked here, before any layer runs: the container (a list of batches, not one tensor or
a string), each batch's type (tensors, or tuples / lists / dicts of them), and for models with an input
embedding the token ids' dtype (integer), shape ((batch, seq_len) for transformers models) and range
(0 <= id < vocabulary size).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn


class CalibrationDataError(ValueError, TypeError):
    """Calibration data of the wrong type, dtype, shape or range (a ValueError and a TypeError)."""


def check_container(calib_data: Any, algorithm: str) -> None:
    """Refuse a ``calib_data`` that iterates into the wrong things: one tensor (its rows), a string (its
    characters), a mapping (its keys)."""
    if isinstance(calib_data, torch.Tensor):
        raise CalibrationDataError(
            f"{algorithm}: calib_data is one tensor of shape {tuple(calib_data.shape)}, not a list of batches; "
            "pass a list of model inputs, e.g. list(ids.split(4)) for token ids of shape (n, seq_len)"
        )
    if isinstance(calib_data, (str, bytes)):
        raise CalibrationDataError(
            f"{algorithm}: calib_data is a {type(calib_data).__name__}; tokenize the text and pass a list of "
            "token-id tensors of shape (batch, seq_len)"
        )
    if isinstance(calib_data, dict):
        raise CalibrationDataError(
            f"{algorithm}: calib_data is one dict; pass a list of batches, e.g. [{{'input_ids': ids}}, ...]"
        )


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _leaves(batch: Any, path: str):
    if isinstance(batch, dict):
        for k, v in batch.items():
            if not isinstance(k, str):
                raise CalibrationDataError(f"has a dict key {k!r}; keys must be the model's argument names")
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, batch


def _token_ids(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, dict):
        return None if "inputs_embeds" in batch else batch.get("input_ids")
    if isinstance(batch, (tuple, list)):
        return batch[0] if batch else None
    return batch


def _check_ids(ids: Any, vocab: int, transformers_model: bool) -> None:
    if not isinstance(ids, torch.Tensor):
        raise CalibrationDataError(f"has token ids of type {type(ids).__name__}; pass an integer tensor")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationDataError(f"has token ids of dtype {ids.dtype}; pass integer ids (e.g. ids.long())")
    if transformers_model and ids.dim() != 2:
        raise CalibrationDataError(
            f"has token ids of shape {tuple(ids.shape)}; they need shape (batch, seq_len), e.g. ids[None] for one "
            "sequence"
        )
    if ids.numel() == 0:
        raise CalibrationDataError("has no token ids; every batch needs at least one token")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise CalibrationDataError(
            f"has token id {bad}, outside the model's vocabulary of {vocab} ids (0..{vocab - 1}); tokenize with "
            "the model's own tokenizer"
        )


def check_batches(model: nn.Module, batches: list, algorithm: str) -> None:
    """CalibrationDataError naming the first bad batch and what is wrong with it."""
    vocab = _vocab_size(model)
    transformers_model = hasattr(model, "config") and hasattr(model, "get_input_embeddings")
    for i, batch in enumerate(batches):
        try:
            for path, leaf in _leaves(batch, ""):
                if isinstance(leaf, (str, bytes)):
                    raise CalibrationDataError(
                        f"holds a {type(leaf).__name__}{' at ' + path if path else ''}; tokenize text first and "
                        "pass token-id tensors"
                    )
                if not (isinstance(leaf, torch.Tensor) or leaf is None or isinstance(leaf, numbers.Number)):
                    raise CalibrationDataError(
                        f"holds a {type(leaf).__module__}.{type(leaf).__name__}{' at ' + path if path else ''}; "
                        "pass torch tensors (torch.as_tensor converts arrays)"
                    )
            if vocab is not None:
                ids = _token_ids(batch)
                if ids is not None:
                    _check_ids(ids, vocab, transformers_model)
        except CalibrationDataError as e:
            raise CalibrationDataError(f"{algorithm}: calibration batch {i} {e}") from None
