"""The training loop: golden losses, exact resume, data parallel == one process, gradient accumulation,
the adapter it saves, and the diffusion / GAN recipes on the CPU."""

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kit.recipe import load_recipe
from qlora_kit.train import finetune

GOLDEN = Path(__file__).parent / "golden" / "quickstart_losses.json"
# a small, fast slice of the quickstart recipe (same model, quantization, adapters, optimizer, data source)
SMALL = ["max_documents=20", "eval_every=0", "save_every=0", "progress_bar=false", "eval_batches=2"]


def _run(tmp_path, name="run", recipe="quickstart", extra=()):
    out = tmp_path / name
    return finetune(load_recipe(recipe, [*SMALL, f"output_dir={out}", *extra])), out


def _metric_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ----- golden losses ---------------------------------------------------------------------------------------
def test_quickstart_golden_losses(tmp_path):
    """quickstart (NF4 base, LoRA, byte-level stdlib text) for 6 steps at seed 0 on the CPU reproduces the
    stored losses. Regenerate with QLORA_KIT_UPDATE_GOLDEN=1 after an intended numerical change."""
    summary, out = _run(tmp_path, extra=["max_steps=6"])
    losses = [summary["losses"][k] for k in sorted(summary["losses"])]
    assert losses == [pytest.approx(v) for v in _metric_losses(out).values()]
    assert losses[-1] < losses[0] - 0.1  # the loss falls
    if os.environ.get("QLORA_KIT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "command": "qlora-kit finetune quickstart " + " ".join([*SMALL, "max_steps=6"]),
            "losses": losses,
            "data_fingerprint": summary["data_fingerprint"],
            "recorded_with": {"python": platform.python_version(), "torch": torch.__version__},
        }, indent=2) + "\n")  # fmt: skip
    golden = json.loads(GOLDEN.read_text())
    if golden["data_fingerprint"] != summary["data_fingerprint"]:
        pytest.skip(
            f"this Python's stdlib source differs from the one the golden losses were recorded on "
            f"({golden['recorded_with']}); the data differ, so the losses must"
        )
    assert losses == pytest.approx(golden["losses"], rel=0, abs=2e-5)


# ----- exact resume ----------------------------------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["max_steps=7", "batch_size=4", "eval_every=3", "keep_checkpoints=1"]  # lora dropout stays on
    full, full_dir = _run(tmp_path, "full", extra=common)
    part, part_dir = _run(tmp_path, "part", extra=[*common, "save_every=2", "stop_after_steps=5"])
    assert sorted(part["losses"]) == [1, 2, 3, 4, 5]
    ckpts = sorted(p.name for p in (part_dir / "checkpoints").iterdir())
    assert ckpts == ["step-000005"]  # keep_checkpoints=1 pruned step 2 and 4; no temporary directories left
    ck = part_dir / "checkpoints" / "step-000005"
    assert {p.name for p in ck.iterdir()} >= {"adapter", "optimizer.pt", "state.json", "trainable.safetensors",
                                              "rng-rank0.json"}  # fmt: skip
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 5 and state["data_position"]["batch_in_epoch"] == 5
    assert not (part_dir / "adapter").exists()  # interrupted runs leave no final adapter
    resumed, _ = _run(tmp_path, "part", extra=[*common, "resume=true"])
    assert sorted(resumed["losses"]) == [6, 7]
    for step in range(1, 8):
        assert _metric_losses(part_dir)[step] == pytest.approx(full["losses"][step], rel=1e-6, abs=0)
    assert resumed["eval"]["eval_loss"] == pytest.approx(full["eval"]["eval_loss"], rel=1e-6)
    assert (part_dir / "adapter" / "adapter_model.safetensors").is_file()


# ----- gradient accumulation and data parallel -------------------------------------------------------------
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a, _ = _run(tmp_path, "a", extra=["max_steps=4", "batch_size=4", "lora.dropout=0"])
    b, _ = _run(tmp_path, "b", extra=["max_steps=4", "batch_size=2", "grad_accum_steps=2", "lora.dropout=0"])
    assert [b["losses"][k] for k in range(1, 5)] == pytest.approx([a["losses"][k] for k in range(1, 5)], rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """`accelerate launch` with two CPU processes (gloo) and 2 sequences each == one process with 4."""
    common = [*SMALL, "max_steps=4", "lora.dropout=0", "eval_every=2"]
    single, _ = _run(tmp_path, "one", extra=["max_steps=4", "batch_size=4", "lora.dropout=0", "eval_every=2"])
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "qlora_kit.cli", "finetune", "quickstart", *common, "batch_size=2", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu x 2" in proc.stdout and "2 proc = 4" in proc.stdout
    two = _metric_losses(out)
    assert [two[k] for k in range(1, 5)] == pytest.approx([single["losses"][k] for k in range(1, 5)], rel=1e-5)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert evals[-1]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ----- the saved adapter -----------------------------------------------------------------------------------
def test_final_adapter_reloads_into_a_fresh_quantized_base(tmp_path):
    from qlora_kit.data import ByteTokenizer, load_data
    from qlora_kit.train.export import model_with_adapter, perplexity

    summary, out = _run(tmp_path, extra=["max_steps=5", "batch_size=4", "eval_batches=3"])
    recipe = load_recipe(str(out / "config.yaml"))  # the resolved config saved by the run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == recipe.lora.r
    data = load_data(recipe, ByteTokenizer())
    model = model_with_adapter(recipe, out / "adapter")
    res = perplexity(model, data.eval, recipe.batch_size, recipe.eval_batches)
    assert res["loss"] == pytest.approx(summary["eval"]["eval_loss"], rel=1e-5)
    base = perplexity(model_with_adapter(recipe, None), data.eval, recipe.batch_size, recipe.eval_batches)
    assert base["loss"] > res["loss"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(train_rows[0])
    assert rows[-1]["eval_ppl"] == pytest.approx(torch.tensor(rows[-1]["eval_loss"]).exp().item(), rel=1e-5)


# ----- diffusion and GAN recipes ---------------------------------------------------------------------------
def test_unet_lora_runs_on_cpu(tmp_path):
    summary, out = _run(tmp_path, recipe="unet_lora", extra=["max_steps=4", "batch_size=8", "eval_every=2"])
    losses = list(summary["losses"].values())
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert "eval_loss" in summary["eval"]
    files = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"} <= files
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") and "conv1.lora_A" in k for k in keys)  # convolutions adapted too
    assert any("to_q.lora_A" in k for k in keys)


def test_dcgan_qlora_runs_on_cpu_with_lora_on_transposed_convs(tmp_path):
    from safetensors.torch import load_file

    summary, out = _run(tmp_path, recipe="dcgan_qlora", extra=["max_steps=4", "batch_size=16", "eval_every=2"])
    assert len(summary["losses"]) == 4 and all(torch.isfinite(torch.tensor(list(summary["losses"].values()))))
    assert {"eval_d_loss", "eval_g_loss"} == set(summary["eval"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("d_loss" in r for r in rows if "loss" in r)
    gen = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # ConvTranspose2d(64, 32, 4, 2, 1) at net.3: lora_A is [in, r, k, k], lora_B [out, r, 1, 1]
    assert tuple(gen["base_model.model.net.3.lora_A.weight"].shape) == (64, 4, 4, 4)
    assert tuple(gen["base_model.model.net.3.lora_B.weight"].shape) == (32, 4, 1, 1)
    assert (out / "discriminator_adapter" / "adapter_model.safetensors").is_file()


def test_dcgan_full_discriminator_resumes_exactly(tmp_path):
    """GAN state includes BatchNorm statistics and a fully trained discriminator: resume is still exact."""
    common = ["max_steps=4", "batch_size=16", "discriminator=full"]
    full, _ = _run(tmp_path, "full", recipe="dcgan_qlora", extra=common)
    _run(tmp_path, "part", recipe="dcgan_qlora", extra=[*common, "stop_after_steps=2"])
    resumed, part_dir = _run(tmp_path, "part", recipe="dcgan_qlora", extra=[*common, "resume=true"])
    assert resumed["losses"][3] == pytest.approx(full["losses"][3], rel=1e-6)
    assert resumed["losses"][4] == pytest.approx(full["losses"][4], rel=1e-6)
    assert (part_dir / "discriminator.safetensors").is_file()


def test_unet_lora_on_an_rgb_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    summary, out = _run(tmp_path, recipe="unet_lora",
                        extra=[f"dataset={folder}", "image_channels=3", "max_steps=2", "batch_size=4"])  # fmt: skip
    assert len(summary["losses"]) == 2 and (out / "samples.png").is_file()


def test_gradient_checkpointing_is_non_reentrant_and_changes_no_loss(tmp_path):
    from qlora_kit.train.build import build

    model = build(load_recipe("quickstart", ["gradient_checkpointing=true"])).models["model"]
    funcs = {
        getattr(m, "_gradient_checkpointing_func", None)
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False)
    }
    funcs.discard(None)
    assert funcs and all(f.keywords == {"use_reentrant": False} for f in funcs)
    plain, _ = _run(tmp_path, "plain", extra=["max_steps=3"])
    ckpt, _ = _run(tmp_path, "ckpt", extra=["max_steps=3", "gradient_checkpointing=true"])
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6)


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tmp_path):
    fp32, _ = _run(tmp_path, "fp32", extra=["max_steps=3"])
    bf16, _ = _run(tmp_path, "bf16", extra=["max_steps=3", "mixed_precision=bf16", "compute_dtype=bfloat16"])
    assert [bf16["losses"][k] for k in (1, 2, 3)] == pytest.approx([fp32["losses"][k] for k in (1, 2, 3)], abs=0.02)


def test_local_model_directory_and_local_tokenizer(tmp_path):
    """Real users pass hub ids or local paths; the loading code is the same, tested here on local dirs:
    a saved LlamaForCausalLM and the real all-MiniLM-L6-v2 WordPiece tokenizer (a built-in tiny Llama is
    resized to its 30,522-token vocabulary)."""
    from qlora_kit.cli import main
    from qlora_kit.models import minilm_path, tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    local, out = _run(tmp_path, "local", extra=["max_steps=3", f"model={tmp_path / 'llama'}"])
    builtin, _ = _run(tmp_path, "builtin", extra=["max_steps=3"])
    assert local["losses"] == pytest.approx(builtin["losses"], rel=1e-6)  # same weights either way
    tok, out = _run(tmp_path, "tok", extra=["max_steps=3", f"tokenizer={minilm_path()}", "seq_len=64"])
    assert tok["losses"][1] == pytest.approx(float(torch.log(torch.tensor(30522.0))), abs=0.3)
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0


@pytest.mark.parametrize(
    "variant",
    [
        ["lora.init=loftq", "lora.exclude_modules=[embed_tokens]"],
        ["lora.init=pissa", "lora.exclude_modules=[embed_tokens, lm_head]"],
        ["lora.use_dora=true", "lora.exclude_modules=[embed_tokens]"],
        ["quantization=fp4", "double_quant=false", "lora.use_rslora=true"],
        ["quantization=none", "lora.target_modules=all-linear"],
    ],
)
def test_lora_variants_train(tmp_path, variant):
    from qlora_kit.nn.quantized import QuantizedLayer
    from qlora_kit.train.build import build

    summary, out = _run(tmp_path, extra=["max_steps=3", "batch_size=4", *variant])
    losses = list(summary["losses"].values())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    model = build(load_recipe(str(out / "config.yaml"))).models["model"]
    n_quant = sum(isinstance(m, QuantizedLayer) for m in model.modules())
    assert n_quant == (0 if "quantization=none" in variant else 14)  # loftq: the head stays float as usual
    if any(v in variant for v in ("lora.init=loftq", "lora.init=pissa")):
        from qlora_kit.cli import main

        assert main(["eval", str(out), "--batches", "1"]) == 2  # their adapters need the changed base


# ----- output_dir checks before anything is built -----------------------------------------------------------
def test_output_dir_writability_is_checked_without_leaving_anything(tmp_path, monkeypatch):
    from qlora_kit.recipe import RecipeError
    from qlora_kit.train.loop import _check_writable

    (tmp_path / "existing").mkdir()
    _check_writable(tmp_path / "existing")  # the probe directory is made and removed
    _check_writable(tmp_path / "a" / "b" / "c")  # created later from the nearest existing parent
    assert [p.name for p in tmp_path.rglob("*")] == ["existing"]
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a directory we may not write (root may anyway)
    with pytest.raises(RecipeError, match="is not writable"):
        _check_writable(tmp_path / "new")
    with pytest.raises(RecipeError, match="is not writable"):
        finetune(load_recipe("quickstart", [*SMALL, f"output_dir={tmp_path / 'new'}"]))
    assert [p.name for p in tmp_path.rglob("*")] == ["existing"]
