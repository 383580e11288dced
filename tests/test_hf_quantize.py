"""The quantize-on-load NF4 path of qlora_kit.hf: the same bytes as the reference quantizer, and releasing a
memory-mapped shard's pages leaves every value intact."""

import mmap

import pytest
import torch

import qlora_kit
from qlora_kit import functional as F
from qlora_kit.hf_quantize import fill_nf4, quantize_nf4_fast, release_pages


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_fast_nf4_equals_the_reference_bytes(dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    w = (torch.randn(96, 512, generator=g) * torch.rand(96, 1, generator=g) * 3).to(dtype)
    w[0, :blocksize] = 0  # an all-zero block
    w[1, 3] = w[1].abs().max() * -1  # a value on the block's -absmax
    w[2, :blocksize] = torch.linspace(-1, 1, blocksize)  # values on and around NF4 midpoints
    packed, absmax = quantize_nf4_fast(w, blocksize)
    ref_packed, ref_absmax = F.quantize_nf4(w, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)


def test_fast_nf4_falls_back_and_raises_like_the_reference():
    odd = torch.randn(3, 70)
    assert all(torch.equal(a, b) for a, b in zip(quantize_nf4_fast(odd, 64), F.quantize_nf4(odd, 64), strict=True))
    bad = torch.randn(4, 128)
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4_fast(bad, 64)
    with pytest.raises(ValueError, match="layers.3.q_proj.weight"):
        quantize_nf4_fast(bad, 64, name="layers.3.q_proj.weight")


@pytest.mark.parametrize("double_quant", [False, True])
def test_fill_nf4_gives_the_state_of_from_float(double_quant):
    lin = torch.nn.Linear(256, 64).to(torch.bfloat16)
    cfg = qlora_kit.NF4Config(blocksize=64, double_quant=double_quant)
    ref = qlora_kit.quantize(torch.nn.Sequential(lin), cfg)[0].qweight
    fresh = qlora_kit.quantize(torch.nn.Sequential(torch.nn.Linear(256, 64).to(torch.bfloat16)), cfg)[0].qweight
    fill_nf4(fresh, lin.weight.detach(), 64)
    a, b = ref.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_release_pages_keeps_file_backed_values(tmp_path):
    from safetensors.torch import load_file, save_file

    t = torch.randn(1024, 1024)
    save_file({"w": t}, tmp_path / "s.safetensors")
    with open(tmp_path / "s.safetensors", "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = torch.frombuffer(mm, dtype=torch.uint8)
        assert view.sum() > 0  # touch every page
        release_pages(view)
        assert torch.equal(view, torch.frombuffer(bytearray(mm[:]), dtype=torch.uint8))
        del view
        mm.close()
    anon = t.clone()
    release_pages(anon)  # anonymous memory: nothing is lost either
    assert torch.equal(anon, t) and torch.equal(load_file(tmp_path / "s.safetensors")["w"], t)
