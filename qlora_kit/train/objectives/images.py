"""What the image objectives share: one example forward per role, activation estimates, a sample grid."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...recipe import Recipe
from .base import Objective


def example_forward(model: nn.Module, recipe: Recipe, role: str, batch: int, side: int) -> None:
    """Run ``model`` once on zeros shaped like its inputs: latents for a generator, images for a
    discriminator, images and timesteps for a denoiser."""
    if role == "generator":
        model(torch.zeros(batch, recipe.latent_dim))
        return
    x = torch.zeros(batch, recipe.image_channels, side, side)
    model(x) if role == "discriminator" else model(x, torch.zeros(batch, dtype=torch.long))


@torch.no_grad()
def meta_activation_bytes(model: nn.Module, recipe: Recipe, role: str, a: int) -> int:
    """Every leaf module's output for one image at up to 32 x 32 (on meta: shapes only), scaled to the
    recipe's image size and batch, doubled for the gradients."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    side = recipe.image_size if role != "model" else min(recipe.image_size, 32)
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.device("meta"):
            example_forward(model, recipe, role, 1, side)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return 0  # an architecture the meta device cannot run: no activation estimate
    finally:
        for h in handles:
            h.remove()
    return int(2 * total * a * recipe.batch_size * (recipe.image_size / side) ** 2)


@torch.no_grad()
def hooked_activation_bytes(model: nn.Module, recipe: Recipe, role: str) -> int:
    """Sum of every leaf module's output size for one batch (float32), doubled for their gradients."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        example_forward(model, recipe, role, recipe.batch_size, recipe.image_size)
    finally:
        for h in handles:
            h.remove()
    return 2 * total


@torch.no_grad()
def save_grid(make_images, recipe: Recipe, path: Path) -> str | None:
    """``make_images()`` (16 images in [-1, 1]) as a 4 x 4 PNG grid upscaled to about 128 pixels; None
    without PIL (checked first, so nothing is generated for nothing)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    images = make_images()
    shape = (recipe.image_channels, recipe.image_size, recipe.image_size)
    grid = images.reshape(4, 4, *shape).permute(0, 3, 1, 4, 2).reshape(4 * shape[1], 4 * shape[2], shape[0])
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    img = Image.fromarray(pixels[..., 0] if shape[0] == 1 else pixels)
    scale = max(1, 128 // img.width)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
    return str(path)


def samples_line(out_dir: Path) -> list[tuple[str, str]]:
    """The summary line naming samples.png, when the run wrote one."""
    if (out_dir / "samples.png").is_file():
        return [("samples", f"{out_dir / 'samples.png'} (16 generated images, fixed seed)")]
    return []


class ImageObjective(Objective):
    """What the image objectives (diffusion, GAN) share: images as data and unit, their memory estimates
    and the samples line of the summary."""

    unit = "images"
    data_kind = "image"
    makes_samples = True

    def activation_bytes(self, model: nn.Module, role: str, a: int) -> int:
        return meta_activation_bytes(model, self.recipe, role, a)

    def dry_run_activation_bytes(self, model: nn.Module, role: str, a: int, builtin: bool) -> float:
        return hooked_activation_bytes(model, self.recipe, role) * (a / 4) if builtin else 0  # built-ins only

    def next_steps(self, out_dir) -> list[tuple[str, str]]:
        return samples_line(out_dir)
