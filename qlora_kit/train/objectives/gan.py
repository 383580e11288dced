"""GAN: a DCGAN generator and discriminator trained in alternation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...recipe import Recipe, RecipeError
from .base import global_randn, step_generator
from .images import ImageObjective, save_grid


class GAN(ImageObjective):
    """Non-saturating GAN: D maximises log D(x) + log(1 - D(G(z))); G maximises log D(G(z))."""

    name = "gan"
    supports_gradient_checkpointing = False

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.model != "dcgan":
            raise RecipeError(
                f"objective=gan trains the built-in dcgan only, got model={recipe.model!r}; set model=dcgan"
            )
        if recipe.grad_accum_steps != 1:
            raise RecipeError("objective=gan alternates D and G updates every batch; set grad_accum_steps=1")

    @classmethod
    def builtin(cls, recipe: Recipe, vocab_size: int | None) -> dict[str, nn.Module]:
        from ... import models

        if recipe.image_size != 8:
            raise RecipeError(
                f"the built-in dcgan makes 8x8 images, got image_size={recipe.image_size}; set image_size=8"
            )
        gen = models.dcgan_generator(nz=recipe.latent_dim, nc=recipe.image_channels).train()
        torch.manual_seed(1)
        disc = models.DCGANDiscriminator(nc=recipe.image_channels).train()
        return {"generator": gen, "discriminator": disc}

    def latents(self, g, offset, n, global_n, device) -> torch.Tensor:
        """Rows [offset, offset + n) of the global batch's latent draw."""
        return global_randn((global_n, self.recipe.latent_dim), g, offset, n).to(device)

    @staticmethod
    def d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            d_real.float(), torch.ones_like(d_real, dtype=torch.float32)
        ) + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32))

    @staticmethod
    def g_loss(d_fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32))

    def train_step(self, run, step: int, idx: list[int]) -> dict:
        """A discriminator step on real and generated images, then a generator step through the new D."""
        from .. import guard

        gen, disc = run.wrapped["generator"], run.wrapped["discriminator"]
        real = run.micro_batch(idx, 0)
        g = step_generator(run.recipe.seed, step, 0)
        z = self.latents(g, run.rank * run.B, run.B, run.world * run.B, run.device)
        with run.acc.autocast():
            fake = gen(z)
            out = disc(torch.cat([real, fake.detach().to(real.dtype)]))
            d_loss = self.d_loss(out[: len(real)], out[len(real) :])
        run.acc.backward(d_loss)
        if guard.step_is_finite(run, "discriminator", step, d_loss, run.clip("discriminator")):
            run.finish("discriminator")
        with run.acc.autocast():  # the unwrapped D: its gradients are not wanted (and DDP must not wait for them)
            g_loss = self.g_loss(run.models["discriminator"](fake))
        run.acc.backward(g_loss, inputs=run.params["generator"])
        grad_norm = run.clip("generator")
        if guard.step_is_finite(run, "generator", step, g_loss, grad_norm):
            run.finish("generator")
        run.optimizers["discriminator"].zero_grad(set_to_none=True)
        return {"loss": g_loss.detach().float(), "d_loss": d_loss.detach().float(), "grad_norm": grad_norm}

    def evaluate(self, run) -> dict:
        """Mean D and G losses on held-out real images and fresh latents."""
        sums = torch.zeros(2, dtype=torch.float64, device=run.device)
        gan_sums = torch.zeros(2, dtype=torch.float64, device=run.device)
        span = run.B * run.world
        for batch, g, _ in self.eval_batches(run):
            n = len(batch)
            with run.acc.autocast():
                z = self.latents(g, run.rank * run.B, n, span, run.device)
                fake = run.models["generator"](z)
                out = run.models["discriminator"](torch.cat([batch, fake.to(batch.dtype)])).float()
                gan_sums[0] += self.d_loss(out[:n], out[n:]).double() * n
                gan_sums[1] += self.g_loss(out[n:]).double() * n
                sums[1] += n
        sums, gan_sums = run.acc.reduce(sums, "sum"), run.acc.reduce(gan_sums, "sum")
        count = max(float(sums[1]), 1.0)
        return {"eval_d_loss": float(gan_sums[0]) / count, "eval_g_loss": float(gan_sums[1]) / count}

    def save_samples(self, run, path) -> str | None:
        """16 images G(z) for fixed latents as a 4 x 4 grid."""
        recipe = self.recipe

        def make():
            gen = run.models["generator"].eval()
            z = torch.randn((16, recipe.latent_dim), generator=torch.Generator().manual_seed(0)).to(run.device)
            images = gen(z).float().clamp(-1, 1)
            gen.train()
            return images

        return save_grid(make, recipe, path)
