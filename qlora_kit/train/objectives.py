"""Training objectives: causal language modelling, diffusion denoising (DDPM) and GAN.

Every random draw an objective makes (diffusion noise and timesteps, GAN latents) comes from a
generator seeded by (seed, step, micro-step) and is drawn for the *global* micro-batch, of which each
process takes its own slice. So the numbers do not depend on how many processes share the batch, and
a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def step_generator(seed: int, step: int, micro: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for (seed, step, micro-step); independent of the global RNG."""
    # modulo 2**64 (what manual_seed accepts): unchanged for every seed that fitted before, defined for all seeds
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 1_009 + micro) * 31 + salt) % (1 << 64))


def global_randn(shape, g: torch.Generator, offset: int, n: int) -> torch.Tensor:
    """Rows [offset, offset + n) of a (global_rows, ...) standard normal draw."""
    return torch.randn(shape, generator=g)[offset : offset + n]


class CausalLM:
    """Next-token cross-entropy on packed token blocks; labels are the inputs (the model shifts them)."""

    unit = "tokens"

    def __init__(self, recipe):
        self.recipe = recipe

    def loss(self, model: nn.Module, batch: torch.Tensor, g: torch.Generator, offset: int, global_n: int):
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: torch.Tensor, g: torch.Generator, offset: int, global_n: int):
        """(sum of per-token losses, number of predicted tokens)."""
        loss = model(input_ids=batch, labels=batch).loss.float()
        n = batch.shape[0] * (batch.shape[1] - 1)
        return loss * n, n


class Diffusion:
    """DDPM epsilon prediction: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps; loss = MSE(model(x_t, t), eps)."""

    unit = "images"

    def __init__(self, recipe):
        from diffusers import DDPMScheduler

        self.recipe = recipe
        self.scheduler = DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps)

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


class GAN:
    """Non-saturating GAN: D maximises log D(x) + log(1 - D(G(z))); G maximises log D(G(z))."""

    unit = "images"

    def __init__(self, recipe):
        self.recipe = recipe

    def latents(self, g, offset, n, global_n, device) -> torch.Tensor:
        return global_randn((global_n, self.recipe.latent_dim), g, offset, n).to(device)

    @staticmethod
    def d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            d_real.float(), torch.ones_like(d_real, dtype=torch.float32)
        ) + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32))

    @staticmethod
    def g_loss(d_fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32))


def make_objective(recipe):
    return {"causal_lm": CausalLM, "diffusion": Diffusion, "gan": GAN}[recipe.objective](recipe)
