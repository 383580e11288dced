"""A process killed (SIGKILL) while saving: the target always holds a complete save, the user's files
survive, and the next save leaves no leftovers."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

import qlora_kit
from qlora_kit import models
from qlora_kit.nn.quantized import QuantizedLayer

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import qlora_kit
    from qlora_kit import models

    target, mode = sys.argv[1], sys.argv[2]
    model = qlora_kit.quantize(models.tiny_llama(seed=1), qlora_kit.Int8WeightConfig())
    if mode == "window":  # stop right after the old save moved aside, before the new one moves in
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            if ".old-" in os.fspath(dst):
                print("in-window", flush=True)
                time.sleep(120)

        os.replace = replace
    print("ready", flush=True)
    while True:
        qlora_kit.save_quantized(model, target, overwrite=True)
    """
)


def _kill_during_save(target, mode: str, delay: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target), mode], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        if mode == "window":
            assert proc.stdout.readline().strip() == "in-window"
        else:
            import time

            time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _check_after_kill(tmp_path, target):
    fresh = qlora_kit.load_quantized(models.tiny_llama(), target)  # recovers first when needed
    formats = {m.format_name for m in fresh.modules() if isinstance(m, QuantizedLayer)}
    assert formats in ({"nf4"}, {"int8"})  # the old save or the new one, complete
    assert (target / "precious.txt").read_text() == "mine"
    qlora_kit.save_quantized(qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config()), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no .tmp-* / .old-* left
    assert (target / "precious.txt").read_text() == "mine"


@pytest.mark.slow
def test_kill_during_save_never_loses_the_save_or_user_files(tmp_path):
    target = tmp_path / "q"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    qlora_kit.save_quantized(qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config()), target, overwrite=True)
    _kill_during_save(target, "window", 0.0)  # the worst instant: the target directory is missing
    assert not target.exists() and any(".q.old-" in p.name for p in tmp_path.iterdir())
    _check_after_kill(tmp_path, target)
    rng = random.Random(0)
    for _ in range(3):  # and at arbitrary instants of a save loop
        _kill_during_save(target, "loop", rng.uniform(0.05, 0.6))
        _check_after_kill(tmp_path, target)
