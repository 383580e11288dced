"""Hostile and careless input to the real `qlora-kit` entry point (a subprocess with a timeout each):
no hang, no kill by the kernel, no traceback; one sentence on stderr and exit code 2 for every user error,
and a traceback with exit code 1 for an unknown internal error (issue 14)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMEOUT_S = 120  # far above any case's time on 2 busy cores; a billion-laughs hang would run for hours
SMALL = ["max_documents=20", "eval_every=0", "save_every=0", "progress_bar=false", "max_steps=2"]


def _entry() -> list[str]:
    script = Path(sys.executable).with_name("qlora-kit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qlora_kit.cli"]


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = TIMEOUT_S):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*_entry(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    return proc, time.perf_counter() - t0


# ----- inputs -------------------------------------------------------------------------------------------------
def _laughs(levels: int = 9, width: int = 9) -> str:
    """A YAML flow sequence whose aliases expand to width ** levels values ("billion laughs")."""
    expr = "&a0 [" + ",".join(["lol"] * width) + "]"
    for i in range(1, levels):
        expr = f"&a{i} [{expr}, " + ",".join([f"*a{i - 1}"] * (width - 1)) + "]"
    return expr


def _file(tmp: Path, name: str, text: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _pickle_only_model(tmp: Path) -> str:
    """A model directory with config.json and pytorch_model.bin only (written without pickling anything
    executable: a plain state dict)."""
    import torch

    from qlora_kit.models import tiny_llama

    path = tmp / "pickled"
    model = tiny_llama()
    model.config.save_pretrained(path)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    return str(path)


CASES = {
    # YAML bombs: in a value, in lora.target_modules, in a key, in an override; a huge file; deep nesting
    "laughs in a value": (lambda t: ["finetune", _file(t, "v.yaml", f"description: {_laughs()}\n")],
                          ["v.yaml", "expands to more than"]),
    "laughs in target_modules": (lambda t: ["finetune", _file(t, "l.yaml", f"lora:\n  target_modules: {_laughs()}\n")],
                                 ["l.yaml", "expands to more than"]),
    "laughs in a key": (lambda t: ["finetune", _file(t, "k.yaml", f"x: {_laughs()}\n? *a8\n: 1\n")],
                        ["k.yaml", "expands to more than"]),
    "laughs in an override": (lambda t: ["finetune", "quickstart", f"lora.target_modules=[{_laughs()}]"],
                              ["override lora.target_modules", "expands to more than"]),
    "laughs in a number override": (lambda t: ["finetune", "quickstart", f"seed={_laughs()}"],
                                    ["override seed", "expands to more than"]),
    "huge recipe file": (lambda t: ["finetune", _file(t, "big.yaml", "description: " + "x" * 3_000_000 + "\n")],
                         ["big.yaml", "bytes", "more than"]),
    "deeply nested yaml": (lambda t: ["finetune", _file(t, "deep.yaml", "lora:\n  target_modules: "
                                                         + "[" * 20_000 + "]" * 20_000 + "\n")],
                           ["deep.yaml", "levels deep"]),
    "deeply nested override": (lambda t: ["finetune", "quickstart", "lora.target_modules=" + "[" * 5000 + "]" * 5000],
                               ["levels deep"]),
    # numbers out of range
    "huge seed": (lambda t: ["finetune", "quickstart", "seed=100000000000000000000000"],
                  ["seed must be between 0 and"]),
    "negative seed": (lambda t: ["finetune", "quickstart", "seed=-1"], ["seed must be between 0 and"]),
    "huge cpu_threads": (lambda t: ["finetune", "quickstart", "cpu_threads=100000"],
                         ["cpu_threads=100000", "per CPU core"]),
    "huge lora.r": (lambda t: ["finetune", "quickstart", "lora.r=1000000"], ["lora.r=1000000", "larger than"]),
    "huge num_train_timesteps": (lambda t: ["finetune", "unet_lora", "num_train_timesteps=10000000000"],
                                 ["num_train_timesteps", "larger than"]),
    # paths the machine refuses
    "output_dir name too long": (lambda t: ["finetune", "quickstart", f"output_dir={t / ('a' * 300)}"],
                                 ["output_dir", "255"]),
    "cp into /proc": (lambda t: ["cp", "quickstart", "/proc/qlora-kit-test.yaml"], ["cannot write", "/proc/"]),
    "cp under a file": (lambda t: ["cp", "quickstart", str(Path(_file(t, "f", "x")) / "x.yaml")], ["does not exist"]),
    "report on a binary file": (lambda t: ["report", _file(t, "r.json", bytes(range(256)) * 8)],
                                ["r.json", "not valid JSON"]),
    "report on deep JSON": (lambda t: ["report", _file(t, "d.json", "[" * 100_000 + "]" * 100_000)],
                            ["d.json", "nested"]),
    "report on a directory": (lambda t: ["report", str(t)], ["cannot read"]),
    "report on the wrong JSON": (lambda t: ["report", _file(t, "w.json", '{"sections": 5, "env": 1}')], ["w.json"]),
}  # fmt: skip

SLOW_CASES = {
    # these build a model (meta device) or read one: seconds each on a busy machine
    "lora.r above every layer": (lambda t: ["finetune", "quickstart", "lora.r=60000", *SMALL, f"output_dir={t / 'o'}"],
                                 ["lora.r=60000", "r <= 64"]),
    "run that cannot fit in memory": (lambda t: ["finetune", "quickstart", "seq_len=4096", "batch_size=65536", *SMALL,
                                                 f"output_dir={t / 'o'}"], ["this run needs about", "GB", "available"]),
    "quantize a pickle-only model": (lambda t: ["quantize", "--model", _pickle_only_model(t), "--output", str(t / "q")],
                                     ["pytorch_model.bin", "safetensors"]),
    "finetune a pickle-only model": (lambda t: ["finetune", "quickstart", f"model={_pickle_only_model(t)}", *SMALL,
                                                f"output_dir={t / 'o'}"], ["pytorch_model.bin", "safetensors"]),
}  # fmt: skip


def _check_user_error(tmp_path: Path, make_args, words) -> None:
    args = make_args(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    proc, seconds = run_cli(args, tmp_path)
    err = proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("qlora-kit: error: "), err[-2000:]
    assert len(lines[0]) < 600, lines[0][:600]  # one readable sentence, never a dump of the input
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written
    assert seconds < TIMEOUT_S


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_sentence_exit_2(tmp_path, name):
    if "/proc" in name and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc")
    _check_user_error(tmp_path, *CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_hostile_input_needing_a_model_is_one_sentence_exit_2(tmp_path, name):
    _check_user_error(tmp_path, *SLOW_CASES[name])


@pytest.mark.parametrize(
    "error",
    ["RuntimeError('internal bug')", "OSError(5, 'Input/output error', 'x')", "KeyError('k')"],
)
def test_unknown_internal_errors_keep_their_traceback_exit_1(tmp_path, error):
    code = (
        "import sys, qlora_kit.cli as c\n"
        f"def boom(args):\n    raise {error}\n"
        "c._cmd_ls = boom\n"
        "sys.exit(c.main(['ls']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and error.split("(")[0] in proc.stderr
