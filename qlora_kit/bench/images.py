"""The image-generator sections: a DDPM UNet and a DCGAN generator on digits, quality as PSNR against the
float generator from the same noise and a Frechet distance in a digits classifier's feature space."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .lm import QAT_NAME
from .measure import median_time
from .methods import F32, Method, Section, methods_for, run_method

IMAGE_COLUMNS = [
    ("method", "method", "s"),
    ("psnr_db", "PSNR dB", ".2f"),
    ("frechet_digits", "Frechet (digits CNN)", ".3f"),
    ("bits", "bits/param", ".2f"),
    ("size_bytes", "weights", "bytes"),
    ("peak_mem_bytes", "peak mem", "bytes"),
    ("quant_seconds", "quant time s", ".2f"),
    ("images_s", "images/s", ".1f"),
]
IMAGE_PLOTS = [
    {
        "kind": "quality_vs_bits",
        "title": "PSNR vs bits per parameter",
        "x": "bits",
        "y": "psnr_db",
        "xlabel": "bits per quantized parameter",
        "ylabel": "PSNR vs float (dB)",
    }
]


def _image_evaluator(float_model, sample: Callable, noise, classifier, real, device):
    """evaluate(model) -> PSNR vs the float model's images from ``noise``, Frechet distance, images/s."""
    from ..eval.images import frechet_classifier_distance, psnr

    with torch.no_grad():
        ref_images = sample(float_model, noise)

    def evaluate(m):
        with torch.no_grad():
            imgs = sample(m, noise)
            ips = noise.shape[0] / median_time(lambda: sample(m, noise), device, 1)
        return {
            "psnr_db": round(psnr(imgs, ref_images), 2) if not torch.equal(imgs, ref_images) else None,
            "frechet_digits": round(frechet_classifier_distance(classifier, imgs, real), 3),
            "images_s": round(ips, 1),
        }

    return evaluate


def _image_notes(has_linear: bool, caught, extra_methods) -> list[str]:
    notes = [
        "the default filter keeps the first and last convolution in high precision; GPTQ and AWQ calibrate "
        "Linear layers and ungrouped Conv2d / ConvTranspose2d layers (a convolution as a matmul over unfolded input "
        "patches; AWQ folds its scales into a preceding BatchNorm / GroupNorm / convolution, through a ReLU, "
        "where there is one, else it only searches the clipping)"
    ]
    fallback = sorted({str(w.message) for w in caught if "round-to-nearest instead" in str(w.message)})
    notes += [f"warning while quantizing: {m}" for m in fallback]
    if has_linear:
        notes.append(
            "W8A8 rows: W8A8 (and SmoothQuant's smoothing) covers the Linear layers only; the convolutions of "
            "these rows get int8 weight-only quantization (quantize() warns so)"
        )
    else:
        notes.append(
            "no W8A8 / SmoothQuant rows: W8A8 covers Linear layers only and this model has none (SmoothQuant "
            "would give int8 weight-only convolutions, with a warning)"
        )
    notes.append("the peers (bitsandbytes, torchao, quanto) are compared on the transformers above")
    return notes + [f"{m.name}: {m.note}" for m in extra_methods if m.note]


def _image_section(
    key,
    title,
    float_model,
    sample: Callable,
    calib,
    classifier,
    real,
    device,
    log,
    quick,
    extra_protocol: list[str],
    extra_methods: tuple[Method, ...] = (),
) -> Section:
    n = 64 if quick else 256
    evaluate = _image_evaluator(float_model, sample, sample.noise(n), classifier, real, device)
    protocol = [
        f"PSNR (dB) of {n} generated images vs the float model's from the same noise (range [-1, 1]); "
        "empty for the float model itself",
        f"frechet_digits: Frechet distance between {n} generated images and {real.shape[0]} held-out real "
        "digits in the feature space of a small digits CNN (not FID: another feature network)",
    ]
    section = Section(key=key, title=title, protocol=protocol + extra_protocol, columns=list(IMAGE_COLUMNS))
    ctx = {"calib": calib, "device_arg": None, "float": float_model}
    has_linear = any(type(m) is nn.Linear for m in float_model.modules())
    methods = [m for m in methods_for(device, [], peers=False) if has_linear or m.family != "activation"]
    methods += list(extra_methods)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in methods:
            row, _ = run_method(method, float_model, ctx, device, evaluate, log)
            section.rows.append(row)
    section.notes += _image_notes(has_linear, caught, extra_methods)
    section.plots = copy.deepcopy(IMAGE_PLOTS)
    return section


def _dcgan_qat(nz: int, quick: bool, device: str) -> Method:
    """QAT for the generator by distillation (no discriminator): int4 g128 fake-quant layers trained to
    reproduce the float generator's images on fresh latents, then converted."""
    from ..qat import QATConfig, convert_qat, prepare_qat

    steps, lr, batch = (200, 3e-5, 64) if quick else (2000, 3e-5, 128)

    def apply(model, ctx):
        import qlora_kit

        teacher = ctx["float"]
        prepare_qat(model, QATConfig(qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=F32)))
        model.eval()  # BatchNorm keeps its statistics; the weights train
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # to 0: a settled end point
        g = torch.Generator().manual_seed(7)
        for _ in range(steps):
            z = torch.randn((batch, nz), generator=g).to(device)
            with torch.no_grad():
                target = teacher(z)
            loss = torch.nn.functional.mse_loss(model(z), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return convert_qat(model)

    return Method(
        QAT_NAME,
        "qat",
        apply,
        note=f"prepare_qat(int4 g128, straight-through) trained by distillation: {steps} Adam steps (lr {lr}, "
        f"linear decay to 0) of the MSE to the float generator's images on fresh batches of {batch} latents (not "
        "the evaluation noise), BatchNorm statistics fixed, then convert_qat; quant time includes the training",
    )


class _Sampler:
    def __init__(self, fn, shape, device):
        self.fn, self.shape, self.device = fn, shape, device

    def noise(self, n):
        return torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(123))

    def __call__(self, model, noise):
        return self.fn(model, noise.to(self.device)).float().cpu()


def bench_images(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> list[Section]:
    """The DDPM UNet and DCGAN sections (arguments as :func:`qlora_kit.bench.lm.bench_lm`)."""
    classifier, cinfo = rm.digits_classifier(cache_dir, "cpu")
    real, _ = rm.digits_images("test")
    sections = []
    unet = rm.reference_unet(quick, cache_dir, device)
    sampler = _Sampler(lambda m, z: unet.sample(m, z), (1, 8, 8), device)
    calib = [tuple(t.to(device) for t in b) for b in unet.calib_batches(batches=4 if quick else 16)]
    sections.append(
        _image_section(
            "unet",
            f"DDPM UNet on digits (diffusers UNet2DModel, "
            f"{sum(p.numel() for p in unet.model.parameters()) / 1e6:.2f}M parameters)",
            unet.model,
            sampler,
            calib,
            classifier,
            real,
            device,
            log,
            quick,
            [
                f"sampling: DDIM, {unet.spec.sample_steps} steps, eta 0 (deterministic)",
                f"calibration: {len(calib)} batches of noisy digits with timesteps stratified over [0, "
                f"{unet.spec.train_timesteps}) (activation statistics across diffusion timesteps)",
                f"digits classifier test accuracy: {cinfo.get('test_accuracy')}",
            ],
        )
    )
    sections[-1].info = unet.info
    gen, ginfo = rm.reference_dcgan(quick, cache_dir, device)
    gsampler = _Sampler(lambda m, z: m(z), (gen.nz,), device)
    gcalib = [torch.randn((64, gen.nz), generator=torch.Generator().manual_seed(i)).to(device) for i in range(4)]
    sections.append(
        _image_section(
            "dcgan",
            f"DCGAN generator on digits ({sum(p.numel() for p in gen.parameters()) / 1e6:.2f}M parameters)",
            gen,
            gsampler,
            gcalib,
            classifier,
            real,
            device,
            log,
            quick,
            ["calibration: 4 batches of 64 latent vectors"],
            (_dcgan_qat(gen.nz, quick, device),),
        )
    )
    sections[-1].info = ginfo
    return sections
