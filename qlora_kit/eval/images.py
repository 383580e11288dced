"""Image quality for generators: PSNR against the float model, and a Frechet distance in a digits classifier's
feature space.

* PSNR: the quantized and the float generator start from the same noise (deterministic sampling), and
  10 log10(range^2 / MSE) is taken over all pixels of the batch; images live in [-1, 1] (range 2).
* Frechet digits-classifier distance (FDD): the Frechet distance between Gaussians fitted to the
  penultimate-layer features of :class:`DigitsClassifier` (a small CNN trained on scikit-learn's 8x8
  digits) for two image sets. It is the FID formula with a different feature network, so its values are
  not comparable with FID and it is not called that.

Example:
    >>> psnr(quant_images, float_images)
    31.2
    >>> frechet_classifier_distance(classifier, generated, real_digits)
    4.7
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio (dB) of ``images`` against ``reference`` over all pixels (inf if equal)."""
    if images.shape != reference.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(images.shape)} and {tuple(reference.shape)}")
    mse = float(F.mse_loss(images.double(), reference.double()))
    if mse == 0:
        return float("inf")
    return 10.0 * float(np.log10(data_range**2 / mse))


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 single-channel digits in [-1, 1]; ``features`` is the 64-d penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4 -> 2
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples).

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), computed in float64 with
    symmetric square roots (eigendecomposition), which keeps it real and non-negative.
    """
    a = feats_a.detach().double().cpu().numpy()
    b = feats_b.detach().double().cpu().numpy()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    d2 = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))
    return max(d2, 0.0)


@torch.no_grad()
def frechet_classifier_distance(classifier: DigitsClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between two image sets in ``classifier``'s feature space (see the module docstring)."""
    classifier.eval()
    return frechet_distance(classifier.features(images_a.float()), classifier.features(images_b.float()))
