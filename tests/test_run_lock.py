"""One run per output_dir (an flock held for the run; stale locks of killed runs taken over with a note) and
removal of the temporary files killed runs leave behind (issue 14)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.recipe import RecipeError, load_recipe
from qlora_kit.train import lock as run_lock

SMALL = ["max_documents=20", "eval_every=0", "save_every=0", "progress_bar=false", "seq_len=32", "batch_size=2"]

_HOLDER = """
import sys, time
from pathlib import Path
from qlora_kit.train import lock
lock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def _spawn_holder(out_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_lock_is_refused_naming_the_holder_then_released(tmp_path):
    out = tmp_path / "run"
    first = run_lock.acquire(out, say=lambda s: None)
    with pytest.raises(RecipeError, match=f"in use by another qlora-kit run \\(pid {os.getpid()}"):
        run_lock.acquire(out, say=lambda s: None)
    first.release()
    assert not (out / run_lock.LOCK_NAME).exists()  # a clean release leaves nothing behind
    run_lock.acquire(out, say=lambda s: None).release()


def test_lock_held_by_another_live_process_is_refused(tmp_path):
    out = tmp_path / "run"
    proc = _spawn_holder(out)
    try:
        with pytest.raises(RecipeError, match=f"pid {proc.pid}"):
            run_lock.acquire(out, say=lambda s: None)
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "run"
    proc = _spawn_holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / run_lock.LOCK_NAME).read_text())["pid"] == proc.pid  # left behind by the kill
    notes = []
    lock = run_lock.acquire(out, say=notes.append)
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "no longer running" in notes[0]
    assert json.loads((out / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_releases_locks_decorator_releases_on_error(tmp_path):
    out = tmp_path / "run"

    @run_lock.releases_locks
    def run():
        run_lock.acquire(out, say=lambda s: None)
        raise RuntimeError("crash mid-run")

    with pytest.raises(RuntimeError):
        run()
    run_lock.acquire(out, say=lambda s: None).release()  # free again


def test_stale_tmp_files_are_removed_everywhere_but_nothing_else(tmp_path):
    out = tmp_path / "run"
    keep = [out / "adapter" / "adapter_model.safetensors", out / "config.yaml", out / "checkpoints" / "step-000004"
            / "adapter" / "adapter_config.json", out / ".hidden-but-not-tmp"]  # fmt: skip
    stale = [out / ".tmp-abc123adapter_model.safetensors", out / "adapter" / ".tmp-x9adapter_model.safetensors",
             out / "checkpoints" / ".tmp-step-000008" / "optimizer.pt", out / ".adapter.tmp-k2j3" / "w.safetensors",
             out / ".config.yaml.tmp", out / "checkpoints" / "step-000004" / "adapter" / ".tmp-qq"]  # fmt: skip
    for p in keep + stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    notes = []
    removed = run_lock.remove_stale_tmp(out, say=notes.append)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in stale)
    assert not (out / "checkpoints" / ".tmp-step-000008").exists() and not (out / ".adapter.tmp-k2j3").exists()
    assert len(removed) == 6 and "removed 6 temporary file(s)" in notes[0]


@pytest.mark.slow
def test_finetune_refuses_a_locked_output_dir_and_cleans_stale_tmp(tmp_path, capsys):
    from qlora_kit.train import finetune

    out = tmp_path / "run"
    recipe = load_recipe("quickstart", [*SMALL, "max_steps=2", f"output_dir={out}"])
    proc = _spawn_holder(out)  # then killed: its lock file stays
    try:
        with pytest.raises(RecipeError, match="in use by another qlora-kit run"):
            finetune(recipe)
        assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_NAME]  # the refused run wrote nothing
    finally:
        proc.kill()
        proc.wait()
    finetune(load_recipe("quickstart", [*SMALL, "max_steps=2", "stop_after_steps=1", f"output_dir={out}"]))
    assert "taking over the lock" in capsys.readouterr().out
    # what kills during the final adapter write and a checkpoint write leave behind
    leftovers = [out / "adapter" / ".tmp-k1adapter_model.safetensors", out / "checkpoints" / ".tmp-step-000002"]
    for p in leftovers:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    finetune(load_recipe("quickstart", [*SMALL, "max_steps=2", "resume=true", f"output_dir={out}"]))
    text = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in text and "taking over" not in text
    assert not any(p.exists() for p in leftovers) and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / run_lock.LOCK_NAME).exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_two_cli_runs_started_together_on_one_output_dir(tmp_path):
    """The issue's case: two `qlora-kit finetune` at the same moment; one runs, the other is refused in one
    sentence, and metrics.jsonl holds each step once."""
    out = tmp_path / "run"
    script = Path(sys.executable).with_name("qlora-kit")
    cmd = [str(script), "finetune", "quickstart", *SMALL, "max_steps=40", f"output_dir={out}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    deadline = time.time() + 300
    for p in procs:
        stdout, stderr = p.communicate(timeout=max(1, deadline - time.time()))
        results.append((p.returncode, stderr))
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "in use by another qlora-kit run" in refused and "Traceback" not in refused
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))  # each step once, in order
