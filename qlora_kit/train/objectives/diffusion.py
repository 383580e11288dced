"""Diffusion: DDPM epsilon prediction on a UNet."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...recipe import Recipe
from .base import global_randn
from .images import ImageObjective, save_grid


class Diffusion(ImageObjective):
    """DDPM epsilon prediction: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps; loss = MSE(model(x_t, t), eps)."""

    name = "diffusion"

    @functools.cached_property
    def scheduler(self):
        """The DDPM noise schedule (made on first use: the memory estimate needs no diffusers scheduler)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.recipe.num_train_timesteps)

    @classmethod
    def builtin(cls, recipe: Recipe, vocab_size: int | None) -> dict[str, nn.Module]:
        from ... import models

        return {"model": models.tiny_unet(sample_size=recipe.image_size, channels=recipe.image_channels).train()}

    @classmethod
    def pretrained(cls, recipe: Recipe, source: str, dtype: torch.dtype, meta: bool) -> dict[str, nn.Module]:
        from diffusers import UNet2DModel

        sub = "unet" if os.path.isdir(os.path.join(source, "unet")) else None
        if meta:
            from accelerate import init_empty_weights

            with init_empty_weights():
                return {"model": UNet2DModel.from_config(UNet2DModel.load_config(source, subfolder=sub))}
        return {
            "model": UNet2DModel.from_pretrained(source, subfolder=sub, torch_dtype=dtype, use_safetensors=True).train()
        }

    def _noised(self, batch, g, offset, global_n):
        n = batch.shape[0]
        noise = global_randn((global_n, *batch.shape[1:]), g, offset, n)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (global_n,), generator=g)[offset : offset + n]
        noise, t = noise.to(batch.device, batch.dtype), t.to(batch.device)
        return self.scheduler.add_noise(batch, noise, t), noise, t

    def loss(self, model, batch, g, offset, global_n):
        noisy, noise, t = self._noised(batch, g, offset, global_n)
        pred = model(noisy, t).sample
        return F.mse_loss(pred.float(), noise.float())

    @torch.no_grad()
    def eval_sums(self, model, batch, g, offset, global_n):
        noisy, noise, t = self._noised(batch, g, offset, global_n)
        pred = model(noisy, t).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="sum"), noise.numel()

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, shape, device, seed: int, steps: int = 50) -> torch.Tensor:
        """n images from pure noise with ``steps`` DDPM steps (fixed seed)."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(min(steps, self.recipe.num_train_timesteps))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((n, *shape), generator=g).to(device)
        for t in sched.timesteps:
            eps = model(x, t.to(device).expand(n)).sample
            x = sched.step(eps, t, x, generator=g).prev_sample
        return x.clamp(-1, 1)

    def save_samples(self, run, path) -> str | None:
        """16 images by DDPM sampling (fixed seed) as a 4 x 4 grid."""
        recipe = self.recipe
        shape = (recipe.image_channels, recipe.image_size, recipe.image_size)

        def make():
            model = run.models["model"].eval()
            images = self.sample(model, 16, shape, run.device, seed=0).float()
            model.train()
            return images

        return save_grid(make, recipe, path)
