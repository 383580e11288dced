"""Saves never delete the user's files, refuse targets that are not ours, and recover from killed saves."""

import os
import subprocess
import sys

import pytest
import torch

import qlora_kit
from qlora_kit import LoraConfig, add_lora, models, safe_io, save_adapter
from qlora_kit.cli import main
from qlora_kit.nn.quantized import QuantizedLayer


def _quantized(seed=0, config=None):
    return qlora_kit.quantize(models.tiny_llama(seed=seed), config or qlora_kit.NF4Config())


def _adapter_model():
    return add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))


def _user_files(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "precious.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "notes.md").write_text("also mine")
    (d / "empty").mkdir()


def _assert_user_files(d):
    assert (d / "precious.txt").read_text() == "mine"
    assert (d / "sub" / "notes.md").read_text() == "also mine"
    assert (d / "empty").is_dir()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


SAVES = {
    "save_quantized": lambda d, **kw: qlora_kit.save_quantized(_quantized(), d, **kw),
    "save_adapter": lambda d, **kw: save_adapter(_adapter_model(), d, **kw),
}


@pytest.mark.parametrize("save", SAVES.values(), ids=SAVES.keys())
def test_directory_with_user_files_is_refused_and_kept(tmp_path, save):
    d = tmp_path / "d"
    _user_files(d)
    with pytest.raises(ValueError, match=r"holds files that are not a qlora-kit save.*precious\.txt.*overwrite=True"):
        save(d)
    _assert_user_files(d)
    assert sorted(p.name for p in d.iterdir()) == ["empty", "precious.txt", "sub"]
    save(d, overwrite=True)  # replaces only our files: the user's stay
    _assert_user_files(d)
    assert (d / safe_io.MANIFEST_NAME).is_file()
    save(d, overwrite=True)  # again: still kept, no leftovers
    _assert_user_files(d)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("save", SAVES.values(), ids=SAVES.keys())
def test_plain_file_at_the_path_is_never_replaced(tmp_path, save):
    f = tmp_path / "d"
    f.write_text("a file")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(ValueError, match="is a file, not a directory"):
            save(f, **kw)
    assert f.read_text() == "a file"


def test_previous_save_is_replaced_and_loads(tmp_path):
    d = tmp_path / "q"
    qlora_kit.save_quantized(_quantized(), d)
    qlora_kit.save_quantized(_quantized(seed=3, config=qlora_kit.Int8WeightConfig()), d)
    fresh = qlora_kit.load_quantized(models.tiny_llama(), d)
    assert {m.format_name for m in fresh.modules() if isinstance(m, QuantizedLayer)} == {"int8"}
    assert _leftovers(tmp_path) == []


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    d = tmp_path / "q"
    qlora_kit.save_quantized(_quantized(), d)
    pid = _dead_pid()
    tmp_left = tmp_path / f".q.tmp-{pid}-0a0a"
    tmp_left.mkdir()
    (tmp_left / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / f".other.tmp-{pid}-0b0b"  # another target's: not ours to remove
    other.mkdir()
    live = tmp_path / f".q.tmp-{os.getppid()}-0c0c"  # a live process's save in progress: left alone
    live.mkdir()
    qlora_kit.save_quantized(_quantized(seed=1), d)
    assert not tmp_left.exists() and other.exists() and live.exists()


def test_crash_between_the_renames_restores_the_previous_save(tmp_path):
    """Killed after the old save moved aside and before the new one moved in: the target is missing;
    the next load (or save) puts the old save back, whole."""
    d = tmp_path / "q"
    model = _quantized()
    qlora_kit.save_quantized(model, d)
    with torch.no_grad():
        expect = model(torch.arange(8)[None]).logits
    parked = tmp_path / f".q.old-{_dead_pid()}-1d1d"
    os.replace(d, parked)  # the state a kill between the two renames leaves
    assert not d.exists()
    fresh = qlora_kit.load_quantized(models.tiny_llama(seed=9), d)
    with torch.no_grad():
        assert torch.equal(fresh(torch.arange(8)[None]).logits, expect)
    assert _leftovers(tmp_path) == []


def test_crash_while_moving_user_files_home_loses_none(tmp_path):
    """Killed after the new save moved in, while the user's files were moving over from the old directory."""
    d = tmp_path / "a"
    _user_files(d)
    save_adapter(_adapter_model(), d, overwrite=True)
    parked = tmp_path / f".a.old-{_dead_pid()}-2e2e"
    parked.mkdir()
    os.replace(d / "precious.txt", parked / "precious.txt")  # not yet moved back when the process died
    os.replace(d / "sub", parked / "sub")
    with pytest.raises(ValueError, match="precious"):  # the next save finishes the move first, then sees them
        save_adapter(_adapter_model(), d)
    _assert_user_files(d)
    assert _leftovers(tmp_path) == []
    assert (d / "adapter_model.safetensors").is_file()


def test_cli_merge_output_with_user_files_is_refused(tmp_path, capsys):
    out = tmp_path / "merged"
    _user_files(out)
    code = main(["merge", "--model", "tiny-llama", "--adapter", str(tmp_path / "nowhere"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds files that are not a qlora-kit save" in err and "--force" in err
    assert err.count("\n") == 1
    _assert_user_files(out)
