"""Sentence-embedding agreement: cosine similarity of a (quantized) encoder's embeddings with the float model's.

Protocol: sentence-transformers' recipe for all-MiniLM-L6-v2 (mean pooling of the last hidden state over
non-padding tokens, then L2 normalisation); for each sentence the cosine between the two models'
embeddings; the result is the mean (and the minimum) over the sentences.

Example:
    >>> ref, tok = qlora_kit.models.minilm()
    >>> quant = qlora_kit.quantize(copy.deepcopy(ref), qlora_kit.NF4Config())
    >>> embedding_cosine(quant, ref, tok, SENTENCES).mean
    0.998
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# fixed evaluation sentences (varied topics and lengths); not from any benchmark
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores neural network weights with fewer bits.",
    "A cup of coffee in the morning helps me think clearly.",
    "The train to Berlin leaves from platform seven at noon.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She played the violin at the concert last night.",
    "Interest rates rose for the third time this year.",
    "How do I reset my password if I forgot my email address?",
    "The museum displays paintings from the seventeenth century.",
    "Heavy rain caused flooding in several coastal towns.",
    "Python lists can hold values of different types.",
    "The patient was given antibiotics for the infection.",
    "Our team won the football match by two goals.",
    "Volcanoes form where tectonic plates meet or separate.",
    "He forgot his umbrella and got soaked on the way home.",
    "The recipe calls for two eggs, flour and a pinch of salt.",
    "Solar panels are cheaper today than ten years ago.",
    "The cat slept on the warm windowsill all afternoon.",
    "Matrix multiplication dominates the cost of transformer inference.",
    "Please send the report before Friday evening.",
    "The ancient city was buried under ash for centuries.",
    "Children learn languages faster than most adults.",
    "The stock market fell sharply after the announcement.",
    "A good night's sleep improves memory and mood.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The committee postponed the vote until next week.",
    "Glaciers are retreating in many mountain ranges.",
    "I would like to book a table for four people tonight.",
    "The algorithm sorts the list in logarithmic time per insertion.",
    "Birds migrate south when the days grow shorter.",
    "The new library opens on Monday with extended hours.",
)


@dataclass(frozen=True)
class CosineResult:
    """Mean and minimum cosine similarity over the sentences, and how many there were."""

    mean: float
    min: float
    sentences: int

    @property
    def protocol(self) -> str:
        return f"mean-pooled, L2-normalised sentence embeddings vs the float model, {self.sentences} sentences"


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (N, hidden) of ``sentences`` (sentence-transformers' recipe)."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def embedding_cosine(
    model: nn.Module, reference: nn.Module | torch.Tensor, tokenizer, sentences: Sequence[str] = SENTENCES
) -> CosineResult:
    """Cosine similarity of ``model``'s sentence embeddings with ``reference``'s.

    Args:
        model: the encoder under test (e.g. quantized).
        reference: the float encoder, or its embeddings of ``sentences`` computed before.
        tokenizer: the encoder's tokenizer.
        sentences: evaluation sentences (default: :data:`SENTENCES`).
    """
    a = sentence_embeddings(model, tokenizer, sentences)
    b = reference if isinstance(reference, torch.Tensor) else sentence_embeddings(reference, tokenizer, sentences)
    cos = (a.double() * b.double()).sum(-1)
    return CosineResult(mean=float(cos.mean()), min=float(cos.min()), sentences=len(sentences))
