"""Token perplexity of a causal LM on held-out documents: fixed context, non-overlapping windows.

Protocol (stated with every number, see :attr:`PerplexityResult.protocol`): each document is tokenized
on its own and cut into consecutive windows of ``context`` tokens (the last, shorter window is kept when
it holds at least 2 tokens); windows never overlap and never span two documents. Inside a window every
token but the first is predicted from the tokens before it in that window, so each token is scored once
with between 1 and ``context - 1`` tokens of history. Perplexity = exp(total NLL / scored tokens).

One scoring for every perplexity the project prints: :func:`window_nll` scores a batch of windows;
:func:`perplexity` (the method comparison of ``qlora-kit bench``) feeds it the windows of each held-out
document, and ``qlora-kit eval`` (:func:`qlora_kit.train.export.perplexity`) feeds it the held-out blocks
of ``seq_len`` tokens the data pipeline packed, the windows the training-time evaluation scores.

Example:
    >>> docs = [torch.tensor(list(open(p, "rb").read())) for p in held_out_files]
    >>> perplexity(model, docs, context=128).ppl
    3.41
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with what it was computed on.

    Attributes:
        ppl: exp(mean token NLL).
        nll: mean token negative log-likelihood (nats).
        tokens: number of scored tokens.
        windows: number of windows.
        context: window length in tokens.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    context: int

    @property
    def protocol(self) -> str:
        return (
            f"token perplexity, non-overlapping windows of {self.context} tokens per held-out document, "
            f"{self.windows} windows, {self.tokens} scored tokens"
        )


def windows_of(docs: Sequence[torch.Tensor], context: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Cut each 1-D token tensor into consecutive non-overlapping windows of at most ``context`` tokens.

    Windows shorter than 2 tokens score nothing and are dropped. ``max_windows`` keeps the first ones
    (in document order), which makes quick runs deterministic.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    out: list[torch.Tensor] = []
    for doc in docs:
        doc = torch.as_tensor(doc).reshape(-1).long()
        for start in range(0, doc.numel(), context):
            w = doc[start : start + context]
            if w.numel() >= 2:
                out.append(w)
            if max_windows is not None and len(out) >= max_windows:
                return out
    return out


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids) if _accepts_input_ids(model) else model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__} without logits; pass a causal LM")
    return logits


def _accepts_input_ids(model: nn.Module) -> bool:
    import inspect

    try:
        return "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and scored-token count of a batch of equal-length windows.

    Every token but the first of each window is predicted from the tokens before it in that window; the
    logits are scored in fp32 and summed in float64 (thousands of tokens).

    Args:
        model: a causal LM (see :func:`perplexity`).
        ids: token ids (B, T) on the model's device, T >= 2.

    Returns:
        (total NLL in nats, number of scored tokens B * (T - 1)).
    """
    logits = _logits(model, ids).float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return float(nll.double().sum()), ids[:, 1:].numel()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    docs: Sequence[torch.Tensor],
    *,
    context: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Token perplexity of ``model`` on ``docs`` (see the module docstring for the protocol).

    Args:
        model: a causal LM: ``model(input_ids=ids)`` returns logits (B, T, V) or an output with ``.logits``.
        docs: held-out documents as 1-D token tensors.
        context: window length in tokens.
        batch_size: windows per forward pass (windows of equal length are batched together).
        max_windows: use only the first this many windows.
        device: where the windows go (default: the model's first parameter's device).

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: no document gives a window of at least 2 tokens.
    """
    wins = windows_of(docs, context, max_windows)
    if not wins:
        raise ValueError("the documents hold no window of 2 or more tokens; pass longer held-out documents")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    by_len: dict[int, list[torch.Tensor]] = {}
    for w in wins:
        by_len.setdefault(w.numel(), []).append(w)
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        for i in range(0, len(group), batch_size):
            nll, scored = window_nll(model, torch.stack(group[i : i + batch_size]).to(device))
            total += nll
            count += scored
    model.train(was_training)
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(wins), context=context)
