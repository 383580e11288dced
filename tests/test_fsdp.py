"""FSDP2 sharding of quantized bases (distributed: fsdp), 2 processes over gloo on the CPU.

Every format's packed codes and scales shard along dim 0 and are all-gathered as stored (never as floats);
a 2-process QLoRA run equals the 1-process run with the same global batch (losses and adapter), each rank
holds its half of the packed base (local shards, matching benchmarks/bench_fsdp.py's model), and a run
killed after a checkpoint resumes to the same losses through `accelerate launch -m qlora_kit.cli`.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from qlora_kit.recipe import RecipeError, load_recipe
from qlora_kit.train import finetune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_fsdp  # noqa: E402

SMALL = ["max_documents=20", "eval_every=0", "save_every=0", "progress_bar=false", "eval_batches=2",
         "lora.dropout=0", "cpu_threads=1"]  # fmt: skip
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # fmt: skip


def _spawn(fn, args, world=2):
    ctx = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {TIMEOUT} s")


# ----- every format shards, gathers packed bytes, computes the same ----------------------------------------
FORMATS = ("nf4", "fp4", "int4", "int8", "fp8")


def _formats_worker(rank, world, port, out):
    _dist_env(rank, world, port)
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import qlora_kit
    from qlora_kit import configs
    from qlora_kit.train.fsdp import local_bytes

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfgs = {"nf4": configs.NF4Config(double_quant=True, compute_dtype=torch.float32),
            "fp4": configs.FP4Config(double_quant=True, compute_dtype=torch.float32),
            "int4": configs.Int4WeightConfig(group_size=32, compute_dtype=torch.float32),
            "int8": configs.Int8WeightConfig(compute_dtype=torch.float32),
            "fp8": configs.FP8WeightConfig(compute_dtype=torch.float32)}  # fmt: skip
    gathered = []
    real_all_gather = dist.all_gather_single

    def recording(output_tensor, input_tensor, *a, **k):
        gathered.append(input_tensor.numel() * input_tensor.element_size())
        return real_all_gather(output_tensor, input_tensor, *a, **k)

    dist.all_gather_single = recording
    results = {}
    for fmt, cfg in cfgs.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(200, 67), nn.ReLU(), nn.Linear(67, 5, bias=False))  # odd row counts
        model = qlora_kit.quantize(model, cfg, filter_fn=lambda m, n: True)
        model = qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, target_modules=["0", "2"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        x = torch.randn(3, 200, requires_grad=True)
        ref = model(x)
        ref.square().sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        ref_gx, x.grad = x.grad.clone(), None
        full_packed = local_bytes(model)["base"]
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        held = local_bytes(model)["base"]
        shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        gathered.clear()
        y = model(x)
        y.square().sum().backward()
        grads_equal = all(
            torch.allclose(p.grad.full_tensor(), ref_grads[n], rtol=1e-6, atol=1e-6)
            for n, p in model.named_parameters()
            if p.requires_grad
        )
        results[fmt] = {"out_equal": torch.equal(y, ref), "gx_equal": torch.equal(x.grad, ref_gx),
                        "grads_equal": grads_equal, "full": full_packed, "held": held,
                        "gathered": gathered[:], "shard_bytes": shard_bytes}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_every_format_shards_and_all_gathers_its_packed_bytes(tmp_path):
    _spawn(_formats_worker, (str(tmp_path),))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for fmt in FORMATS:
        r0, r1 = ranks[0][fmt], ranks[1][fmt]
        for r in (r0, r1):
            assert r["out_equal"] and r["gx_equal"] and r["grads_equal"], fmt
        # each rank holds its dim-0 chunk of every packed tensor: about half, together all (the 0-dim
        # NF4 / FP4 offset is a replicated buffer, not counted here)
        assert r0["held"] + r1["held"] == r0["full"], fmt
        assert 0.4 < r1["held"] / r0["full"] <= 0.5 <= r0["held"] / r0["full"] < 0.6, fmt
        # forward (2 groups + root) and backward re-gather: every all-gather carries the stored shards (padded to
        # equal size), never dequantized floats: a float32 weight would be 8x (4-bit) or 4x (8-bit) larger
        assert r0["gathered"] and sum(r0["gathered"]) <= 2 * r0["shard_bytes"] + 64, (fmt, r0)
        float_bytes = 4 * (200 * 67 + 67 * 5)
        assert max(r0["gathered"]) * 2 < float_bytes, fmt


# ----- a QLoRA run on 2 processes == 1 process ---------------------------------------------------------------
def _finetune_worker(rank, world, port, overrides, out):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    _dist_env(rank, world, port)
    calls = []  # forwards through accelerate's activation-checkpoint wrappers (fsdp_activation_checkpointing)
    forward = CheckpointWrapper.forward
    CheckpointWrapper.forward = lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    summary = finetune(load_recipe("quickstart", overrides))
    record = {k: summary[k] for k in ("losses", "local_bytes", "eval")}
    Path(out, f"rank{rank}.json").write_text(json.dumps({**record, "checkpointed": len(calls)}))


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("quant", [["quantization=nf4", "double_quant=true"], ["quantization=int4", "group_size=32"],
                                   ["quantization=nf4", "double_quant=true", "model=LOCAL"],
                                   ["quantization=nf4", "double_quant=true", "fsdp_cpu_offload=true",
                                    "fsdp_activation_checkpointing=true"]],
                         ids=["nf4_dq", "int4", "nf4_dq_from_disk", "nf4_dq_offload_checkpointing"])  # fmt: skip
def test_two_fsdp_processes_match_one_process(tmp_path, quant):
    """nf4_dq_from_disk: every rank reads a saved Llama quantizing layer by layer (tests/test_build_load.py), so
    no rank holds the float model; then shards it. nf4_dq_offload_checkpointing: accelerate's CPU offload of the
    shards and its activation checkpointing of every decoder layer (the 1-process run has neither)."""
    if "model=LOCAL" in quant:
        from qlora_kit.models import tiny_llama

        tiny_llama().save_pretrained(tmp_path / "llama")
        quant = [q.replace("LOCAL", str(tmp_path / "llama")) for q in quant]
    common = [*SMALL, *quant, "max_steps=3", "eval_every=3"]
    one = finetune(load_recipe("quickstart", [*common, "batch_size=4", "distributed=fsdp",  # 1 process: no sharding
                                              f"output_dir={tmp_path / 'one'}"]))  # fmt: skip
    two_dir = tmp_path / "two"
    overrides = [*common, "batch_size=2", "distributed=fsdp", f"output_dir={two_dir}"]
    _spawn(_finetune_worker, (overrides, str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert [r["losses"][str(k)] for k in (1, 2, 3)] == pytest.approx(
            [one["losses"][k] for k in (1, 2, 3)], rel=1e-5
        )
        assert r["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], rel=1e-5)
    assert all(bool(r["checkpointed"]) == ("fsdp_activation_checkpointing=true" in quant) for r in ranks)
    a, b = _adapter(tmp_path / "one"), _adapter(two_dir)
    assert a.keys() == b.keys() and len(a) == 32  # the checkpoint wrappers' names are not in the adapter's
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # each rank holds about half of the packed base, measured from its local shards, and exactly what the
    # memory model (benchmarks/bench_fsdp.py) predicts from the format classes' own tensors
    full = one["local_bytes"]["base"]
    held = [r["local_bytes"]["base"] for r in ranks]
    assert sum(held) == full and all(0.45 < h / full < 0.55 for h in held)
    from qlora_kit.models import tiny_llama

    shape = bench_fsdp.shape_of(tiny_llama().config)
    recipe = load_recipe("quickstart", overrides)
    kw = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant, group_size=recipe.group_size)
    for rank, h in enumerate(held):
        model = bench_fsdp.base_bytes(shape, recipe.quantization, 2, rank, **kw)["packed"]
        replicated = sum(bench_fsdp.quantized_linear_bytes(recipe.quantization, s, **kw)["replicated"]
                         for s in shape.linears().values()) * shape.layers  # fmt: skip
        assert model - replicated == h


# ----- accelerate launch, kill, resume ---------------------------------------------------------------------
def _launch(out: Path, extra=()) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "qlora_kit.cli", "finetune", "quickstart", *SMALL,
           "max_steps=12", "batch_size=2", "save_every=2", "keep_checkpoints=1", "distributed=fsdp",
           f"output_dir={out}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_accelerate_launch_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path):
    full = finetune(
        load_recipe("quickstart", [*SMALL, "max_steps=12", "batch_size=4", f"output_dir={tmp_path / 'one'}"])
    )
    out = tmp_path / "killed"
    proc = _launch(out)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "step-000004" / "state.json").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.05)
    import psutil

    # the launcher and both ranks (torch's launcher starts them in sessions of their own), mid-run
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "adapter").exists()  # killed before the end
    resumed = _launch(out, ["resume=true"])
    stdout, stderr = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, stderr[-20000:]
    assert "FSDP2: packed base" in stdout and "cpu x 2" in stdout
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert [losses[k] for k in range(1, 13)] == pytest.approx([full["losses"][k] for k in range(1, 13)], rel=1e-5)
    a, b = _adapter(tmp_path / "one"), _adapter(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "trainable.safetensors", "optimizer.pt"}
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["model"]["state"]
    assert state and all(not hasattr(t, "to_local") for s in state.values() for t in s.values())


# ----- recipe, options, memory model -----------------------------------------------------------------------
def test_llama70b_recipe_starts_with_its_launch_command_and_shards():
    from importlib.resources import files

    text = (files("qlora_kit.recipes") / "llama70b_fsdp_qlora.yaml").read_text()
    assert text.splitlines()[0] == (
        "# accelerate launch --multi_gpu --num_processes 2 -m qlora_kit.cli finetune llama70b_fsdp_qlora"
    )
    r = load_recipe("llama70b_fsdp_qlora")
    assert (r.distributed, r.quantization, r.double_quant, r.gradient_checkpointing) == ("fsdp", "nf4", True, True)
    assert load_recipe("llama70b_fsdp_qlora", ["fsdp_cpu_offload=true"]).fsdp_cpu_offload


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["distributed=zero3"], "distributed"),
        (["fsdp_cpu_offload=true"], "distributed=fsdp"),
        (["fsdp_activation_checkpointing=true"], "distributed=fsdp"),
        (["distributed=fsdp", "fsdp_activation_checkpointing=true", "gradient_checkpointing=true"], "set one of them"),
        (["distributed=fsdp", "merge_adapter=true"], "qlora-kit merge"),
        (["distributed=fsdp", "optimizer=paged_adamw_8bit"], "adamw"),
    ],
)
def test_fsdp_recipe_mistakes_are_named(overrides, words):
    with pytest.raises(RecipeError, match=words):
        load_recipe("quickstart", overrides)


def test_memory_model_says_whether_70b_fits(capsys):
    assert bench_fsdp.main(["--model", "llama-70b", "--gpus", "2", "--gpu-mem", "48"]) == 0
    text = capsys.readouterr().out
    assert "**fits**" in text and "peak on each GPU" in text
    bench_fsdp.main(["--model", "llama-70b", "--gpus", "2", "--gpu-mem", "24"])
    assert "does NOT fit" in capsys.readouterr().out
    bench_fsdp.main(["--model", "llama-70b", "--gpus", "2", "--gpu-mem", "24", "--cpu-offload"])
    assert "**fits**" in capsys.readouterr().out
    # 70B NF4 + double quant: ~4.13 bits per linear weight, split in two
    m = bench_fsdp.MODELS["llama-70b"]
    linear = m.layers * sum(o * i for o, i in m.linears().values())
    packed = bench_fsdp.base_bytes(m, "nf4", 2, 0, blocksize=64, double_quant=True)["packed"]
    assert packed * 2 * 8 / linear == pytest.approx(4.127, abs=0.01)
