"""Reference models for quality measurements, trained here (no pretrained generative weights can be downloaded).

* ``reference_lm``: a small Llama-architecture causal LM on Python's own standard-library source, byte-level
  tokens (vocabulary 256). Whole files are held out for evaluation: a file is held out when
  ``crc32(file name) % 10 == 0`` (16 of the 147 top-level modules of CPython 3.11).
* ``reference_unet``: a DDPM noise-prediction UNet (diffusers ``UNet2DModel``) on scikit-learn's 8x8 digits,
  sampled with deterministic DDIM (eta = 0) so that two models can start from the same noise.
* ``reference_dcgan``: a DCGAN generator (``qlora_kit.models.DCGANGenerator``) on the same digits.
* ``digits_classifier``: the small CNN (``qlora_kit.eval.images.DigitsClassifier``) whose features define
  the Frechet digits-classifier distance.
* ``reference_minilm``: the real pretrained all-MiniLM-L6-v2 (``qlora_kit.models.minilm``).

Training is seeded and cached: weights go to ``<cache>/<name>-<hash of the spec>/model.safetensors`` with an
``info.json`` (spec, final loss, wall time, versions); the cache directory is ``$QLORA_KIT_CACHE`` or
``~/.cache/qlora_kit``, under ``reference_models``. ``quick=True`` gives the small CPU versions (a few
minutes on 2 cores in all); ``quick=False`` the larger versions meant for a GPU (minutes on one GPU).

Usage:
    python -m qlora_kit.bench.reference_models [--quick] [--device cpu|cuda]     # train (or load) all of them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..eval.images import DigitsClassifier

_CACHE_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where reference models are cached."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("QLORA_KIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_kit")
    return Path(base) / "reference_models"


def _key(name: str, spec) -> str:
    payload = json.dumps(
        {"name": name, "spec": asdict(spec), "v": _CACHE_VERSION, "python": platform.python_version()[:4]},
        sort_keys=True,
    )
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _cached(name: str, spec, build: Callable[[], nn.Module], train: Callable[[nn.Module], dict], cache_dir, device):
    """Load ``name`` trained with ``spec`` from the cache, or train it (seeded) and store it."""
    from safetensors.torch import load_file, save_file

    folder = cache_root(cache_dir) / _key(name, spec)
    weights, info_path = folder / "model.safetensors", folder / "info.json"
    torch.manual_seed(spec.seed)
    model = build()
    if weights.is_file() and info_path.is_file():
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval(), json.loads(info_path.read_text())
    model.to(device).train()
    print(f"  training the reference model {name} (once: saved to {folder} when done)", flush=True)
    t0 = time.perf_counter()
    info = train(model)
    info.update(
        name=name,
        spec=asdict(spec),
        train_seconds=round(time.perf_counter() - t0, 1),
        device=str(device),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    info_path.write_text(json.dumps(info, indent=2))
    return model, info


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ------------------------------------------------------------------------------------------ text / LM


@dataclass(frozen=True)
class StdlibCorpus:
    """Byte-level token documents from the standard library, split by whole files."""

    train_names: tuple[str, ...]
    eval_names: tuple[str, ...]
    train_docs: tuple[torch.Tensor, ...] = field(repr=False)
    eval_docs: tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def eval_texts(self) -> list[str]:
        return [bytes(d.tolist()).decode("utf-8", errors="replace") for d in self.eval_docs]


def stdlib_corpus(max_train_bytes: int | None = None) -> StdlibCorpus:
    """Top-level ``.py`` modules of the running Python's standard library (4 kB .. 400 kB each, sorted by
    name); a file is held out for evaluation when ``crc32(name) % 10 == 0``. ``max_train_bytes`` keeps
    the first training files up to that many bytes (quick runs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 4_000 <= p.stat().st_size <= 400_000)
    if not files:
        raise RuntimeError(f"found no standard-library sources under {root}; this Python installation lacks them")
    train_names, eval_names, train_docs, eval_docs = [], [], [], []
    used = 0
    for p in files:
        data = torch.tensor(list(p.read_bytes().replace(b"\x00", b"")), dtype=torch.uint8)
        if zlib.crc32(p.name.encode()) % 10 == 0:
            eval_names.append(p.name)
            eval_docs.append(data)
        elif max_train_bytes is None or used < max_train_bytes:
            train_names.append(p.name)
            train_docs.append(data)
            used += data.numel()
    return StdlibCorpus(tuple(train_names), tuple(eval_names), tuple(train_docs), tuple(eval_docs))


@dataclass(frozen=True)
class LMSpec:
    """Size and training of the reference LM (Llama architecture, byte vocabulary)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    context: int = 128
    steps: int = 400
    batch: int = 12
    lr: float = 3e-3
    max_train_bytes: int | None = 2_000_000
    seed: int = 0


QUICK_LM = LMSpec()
FULL_LM = LMSpec(
    hidden=512,
    layers=8,
    heads=8,
    kv_heads=4,
    intermediate=1408,
    context=512,
    steps=3000,
    batch=32,
    lr=1e-3,
    max_train_bytes=None,
)


def random_windows(docs, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens from the concatenated documents (byte 0 between them)."""
    stream = torch.cat([torch.cat([d, torch.zeros(1, dtype=d.dtype)]) for d in docs]).long()
    starts = torch.randint(0, stream.numel() - length, (count,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def build_lm(spec: LMSpec) -> nn.Module:
    return models.tiny_llama(
        vocab_size=256,
        hidden_size=spec.hidden,
        layers=spec.layers,
        intermediate_size=spec.intermediate,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(512, spec.context),
        seed=None,
    )


@dataclass
class ReferenceLM:
    """The trained LM plus its data."""

    model: nn.Module
    corpus: StdlibCorpus
    spec: LMSpec
    info: dict

    def calib_batches(self, batches: int = 4, batch_size: int = 4, seed: int = 1) -> list[torch.Tensor]:
        """Calibration inputs (token-id batches of ``context`` tokens) drawn from the training files."""
        g = torch.Generator().manual_seed(seed)
        w = random_windows(self.corpus.train_docs, self.spec.context, batches * batch_size, g)
        return list(w.reshape(batches, batch_size, -1))


def train_lm(
    model: nn.Module,
    spec: LMSpec,
    corpus: StdlibCorpus,
    *,
    steps: int | None = None,
    lr: float | None = None,
    log_every: int = 0,
) -> dict:
    """Next-token training on random windows of the training files (AdamW, warmup + cosine); returns info."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr or spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = steps or spec.steps
    g = torch.Generator().manual_seed(spec.seed + 7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, max(1, steps // 20)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    losses = []
    model.train()
    t_start = time.perf_counter()
    for step in range(steps):
        ids = random_windows(corpus.train_docs, spec.context + 1, spec.batch, g).to(device)
        with autocast:
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            spent = time.perf_counter() - t_start
            left = spent / (step + 1) * (steps - step - 1)
            print(
                f"  training the reference LM (cached once trained): step {step + 1}/{steps} loss "
                f"{sum(losses[-log_every:]) / log_every:.3f} · {spent:.0f} s, ~{left:.0f} s left",
                flush=True,
            )
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"final_loss": round(sum(tail) / len(tail), 4), "steps": steps}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def reference_lm(quick: bool = True, cache_dir=None, device: str = "cpu", spec: LMSpec | None = None) -> ReferenceLM:
    """The reference Llama LM on the stdlib corpus (trained once, then loaded from the cache)."""
    spec = spec or (QUICK_LM if quick else FULL_LM)
    corpus = stdlib_corpus(spec.max_train_bytes)
    model, info = _cached(
        "llama-stdlib",
        spec,
        lambda: build_lm(spec),
        lambda m: train_lm(m, spec, corpus, log_every=max(1, spec.steps // 10)),
        cache_dir,
        device,
    )
    return ReferenceLM(model, corpus, spec, info)


# ----------------------------------------------------------------------------------------------- digits


def digits_images(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) floats in [-1, 1] and labels; split "train" (first 80% after
    a fixed shuffle), "test" (the rest) or "all"."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * x.shape[0])
    if split == "train":
        return x[:cut], y[:cut]
    if split == "test":
        return x[cut:], y[cut:]
    return x, y


@dataclass(frozen=True)
class ClassifierSpec:
    epochs: int = 30
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0


def digits_classifier(cache_dir=None, device: str = "cpu", spec: ClassifierSpec = ClassifierSpec()):
    """The digits CNN behind the Frechet digits-classifier distance; info holds its test accuracy."""

    def train(model):
        x, y = digits_images("train")
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
        g = torch.Generator().manual_seed(spec.seed)
        for _ in range(spec.epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], spec.batch):
                idx = perm[i : i + spec.batch]
                loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        xt, yt = digits_images("test")
        with torch.no_grad():
            acc = (model(xt.to(device)).argmax(-1).cpu() == yt).float().mean()
        return {"test_accuracy": round(float(acc), 4)}

    return _cached("digits-classifier", spec, DigitsClassifier, train, cache_dir, device)


@dataclass(frozen=True)
class UNetSpec:
    """DDPM training of ``qlora_kit.models.tiny_unet`` (8x8, 1 channel) on the digits."""

    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    train_timesteps: int = 1000
    sample_steps: int = 20
    block_out_channels: tuple[int, ...] = (32, 64)
    seed: int = 0


QUICK_UNET = UNetSpec()
FULL_UNET = UNetSpec(steps=8000, batch=128, block_out_channels=(64, 128), sample_steps=50)


def _unet_scheduler(spec: UNetSpec, kind: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = dict(num_train_timesteps=spec.train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return DDPMScheduler(**cfg) if kind == "ddpm" else DDIMScheduler(**cfg)


@dataclass
class ReferenceUNet:
    model: nn.Module
    spec: UNetSpec
    info: dict

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM sampling (eta 0) from ``noise`` with ``model``: images in [-1, 1]."""
        sched = _unet_scheduler(self.spec, "ddim")
        sched.set_timesteps(self.spec.sample_steps)
        x = noise.clone()
        device = next(model.parameters()).device
        x = x.to(device)
        for t in sched.timesteps:
            eps = model(x, t.to(device).expand(x.shape[0])).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x.clamp(-1, 1).float().cpu()

    def calib_batches(self, batches: int = 4, batch_size: int = 16, seed: int = 1) -> list[tuple]:
        """Calibration inputs ``(noisy images, timesteps)`` spread over the diffusion timesteps."""
        sched = _unet_scheduler(self.spec, "ddpm")
        g = torch.Generator().manual_seed(seed)
        x0, _ = digits_images("train")
        out = []
        for _ in range(batches):
            idx = torch.randint(0, x0.shape[0], (batch_size,), generator=g)
            # timesteps stratified over [0, T): every batch covers early, middle and late steps
            t = (
                (
                    (torch.arange(batch_size) + torch.rand(batch_size, generator=g))
                    * self.spec.train_timesteps
                    / batch_size
                )
                .long()
                .clamp(max=self.spec.train_timesteps - 1)
            )
            noise = torch.randn(x0[idx].shape, generator=g)
            out.append((sched.add_noise(x0[idx], noise, t), t))
        return out


def reference_unet(quick: bool = True, cache_dir=None, device: str = "cpu") -> ReferenceUNet:
    spec = QUICK_UNET if quick else FULL_UNET

    def build():
        return models.tiny_unet(seed=None, block_out_channels=spec.block_out_channels)

    def train(model):
        sched = _unet_scheduler(spec, "ddpm")
        x0, _ = digits_images("train")
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
        lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, spec.steps, spec.steps // 20))
        g = torch.Generator().manual_seed(spec.seed + 1)
        losses = []
        for _ in range(spec.steps):
            idx = torch.randint(0, x0.shape[0], (spec.batch,), generator=g)
            noise = torch.randn((spec.batch, 1, 8, 8), generator=g)
            t = torch.randint(0, spec.train_timesteps, (spec.batch,), generator=g)
            noisy = sched.add_noise(x0[idx], noise, t)
            pred = model(noisy.to(device), t.to(device)).sample
            loss = F.mse_loss(pred, noise.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr.step()
            losses.append(float(loss.detach()))
        tail = losses[-max(1, spec.steps // 10) :]
        return {"final_loss": round(sum(tail) / len(tail), 4)}

    model, info = _cached("ddpm-unet-digits", spec, build, train, cache_dir, device)
    return ReferenceUNet(model, spec, info)


@dataclass(frozen=True)
class DCGANSpec:
    epochs: int = 50
    batch: int = 64
    nz: int = 16
    ngf: int = 32
    ndf: int = 32
    lr: float = 2e-4
    seed: int = 0


QUICK_DCGAN = DCGANSpec()
FULL_DCGAN = DCGANSpec(epochs=300, ngf=64, ndf=64)


def reference_dcgan(quick: bool = True, cache_dir=None, device: str = "cpu"):
    """The DCGAN generator trained on the digits; returns (generator, info)."""
    spec = QUICK_DCGAN if quick else FULL_DCGAN

    def build():
        return models.DCGANGenerator(nz=spec.nz, ngf=spec.ngf)

    def train(gen):
        disc = models.DCGANDiscriminator(ndf=spec.ndf).to(device)
        x, _ = digits_images("train")
        opt_g = torch.optim.Adam(gen.parameters(), lr=spec.lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=spec.lr, betas=(0.5, 0.999))
        g = torch.Generator().manual_seed(spec.seed + 2)
        bce = nn.BCEWithLogitsLoss()
        ld = lg = 0.0
        for _ in range(spec.epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - spec.batch + 1, spec.batch):
                real = x[perm[i : i + spec.batch]].to(device)
                z = torch.randn((spec.batch, spec.nz), generator=g).to(device)
                fake = gen(z)
                ones = torch.full((spec.batch,), 0.9, device=device)  # one-sided label smoothing
                zeros = torch.zeros(spec.batch, device=device)
                loss_d = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                loss_g = bce(disc(fake), torch.ones(spec.batch, device=device))
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                ld, lg = float(loss_d.detach()), float(loss_g.detach())
        # BatchNorm statistics for eval mode: the exact average over many batches of the final generator
        # (the running averages lag behind a generator that changed every step)
        for m in gen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            for _ in range(50):
                gen(torch.randn((256, spec.nz), generator=g).to(device))
        for m in gen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        return {"final_loss_d": round(ld, 4), "final_loss_g": round(lg, 4)}

    return _cached("dcgan-digits", spec, build, train, cache_dir, device)


def reference_minilm():
    """(BertModel, tokenizer) of the real pretrained all-MiniLM-L6-v2."""
    return models.minilm()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU versions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    for name, fn in [
        ("lm", lambda: reference_lm(args.quick, args.cache_dir, args.device).info),
        ("classifier", lambda: digits_classifier(args.cache_dir, args.device)[1]),
        ("unet", lambda: reference_unet(args.quick, args.cache_dir, args.device).info),
        ("dcgan", lambda: reference_dcgan(args.quick, args.cache_dir, args.device)[1]),
    ]:
        t0 = time.perf_counter()
        info = fn()
        print(f"{name}: {json.dumps(info)} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
