"""Resume after damage: every checkpoint file is checked before anything is restored or written; a damaged
checkpoint falls back to the newest intact one with a message (or the run stops with one sentence), and
metrics.jsonl is never truncated before the new run has taken a step. A non-finite loss stops the run."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.cli import main
from qlora_kit.recipe import RecipeError, load_recipe
from qlora_kit.train import finetune, objectives
from qlora_kit.train.guard import NonFiniteLossError

SMALL = ["max_documents=20", "eval_every=0", "progress_bar=false", "eval_batches=2", "batch_size=4", "seq_len=64"]
COMMON = [*SMALL, "max_steps=5", "save_every=2", "keep_checkpoints=3"]


def _finetune(out: Path, *extra):
    return finetune(load_recipe("quickstart", [*COMMON, f"output_dir={out}", *extra]))


def _metric_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]  # training lines (the final evaluation adds one more)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped after step 4: checkpoints step-2 and step-4, metrics for steps 1-4."""
    out = tmp_path_factory.mktemp("base") / "run"
    _finetune(out, "stop_after_steps=4")
    return out


@pytest.fixture
def run_dir(tmp_path, interrupted):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


def _ck(out, step):
    return out / "checkpoints" / f"step-{step:06d}"


def _state_edit(**fields):
    def edit(out):
        path = _ck(out, 4) / "state.json"
        state = json.loads(path.read_text())
        state.update(fields)
        path.write_text(json.dumps(state))

    return edit


def _write(name, data: bytes):
    def edit(out):
        (_ck(out, 4) / name).write_bytes(data)

    return edit


def _truncate(name):
    def edit(out):
        path = _ck(out, 4) / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return edit


def _stray_step(out):
    stray = out / "checkpoints" / "step-999999"
    stray.mkdir()
    (stray / "state.json").write_text(json.dumps({"step": 999999}))


def _nan_trainable_no_manifest(out):
    from safetensors.torch import save_file

    ck = _ck(out, 4)
    (ck / "qlora-kit-manifest.json").unlink(missing_ok=True)  # no manifest (older runs): the values are checked
    tensors = load_file(str(ck / "trainable.safetensors"))
    next(iter(tensors.values())).view(-1)[0] = math.nan
    save_file(tensors, str(ck / "trainable.safetensors"))


DAMAGE = [  # (id, damage to step-4, where the message points)
    ("truncated-trainable", _truncate("trainable.safetensors"), "trainable.safetensors"),
    ("broken-state-json", _write("state.json", b'{"step": 4,'), "state.json"),
    ("step-negative", _state_edit(step=-5), "state.json"),
    ("step-fraction", _state_edit(step=7.5), "state.json"),
    ("step-huge", _state_edit(step=10**9), "state.json"),
    ("optimizer-missing", lambda out: (_ck(out, 4) / "optimizer.pt").unlink(), "optimizer.pt"),
    ("optimizer-truncated", _truncate("optimizer.pt"), "optimizer.pt"),
    (
        "rng-garbled",
        _write("rng-rank0.json", b'{"python": [3, [1, 2], null], "numpy": [], "torch": [999]}'),
        "rng-rank0",
    ),
    ("stray-step-dir", _stray_step, "step-999999"),
    ("nan-trainable-no-manifest", _nan_trainable_no_manifest, "NaN"),
]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize(("damage", "where"), [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(run_dir, capsys, damage, where, manifest):
    if not manifest:  # checkpoints of older versions have none: the field and tensor checks must hold alone
        for step in (2, 4):
            (_ck(run_dir, step) / "qlora-kit-manifest.json").unlink()
    damage(run_dir)
    summary = _finetune(run_dir, "resume=true")
    out = capsys.readouterr().out
    assert "is damaged" in out and where in out
    if where == "step-999999":  # the stray directory is skipped: step-4 is the newest intact checkpoint
        assert sorted(summary["losses"]) == [5]
        assert _metric_steps(run_dir) == [1, 2, 3, 4, 5]
    else:
        assert f"resuming from {_ck(run_dir, 2)}" in out
        assert sorted(summary["losses"]) == [3, 4, 5]
        assert _metric_steps(run_dir) == [1, 2, 3, 4, 5]  # the lines after step 2 were replaced, not duplicated
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_reproduces_the_losses_after_a_fallback(tmp_path, run_dir):
    full = _finetune(tmp_path / "full")
    _truncate("trainable.safetensors")(run_dir)
    resumed = _finetune(run_dir, "resume=true")
    for step in (3, 4, 5):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6, abs=0)


def test_no_intact_checkpoint_stops_in_one_sentence_and_touches_nothing(run_dir, capsys):
    for step in (2, 4):
        (_ck(run_dir, step) / "optimizer.pt").write_bytes(b"garbage")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    config = (run_dir / "config.yaml").read_bytes()
    code = main(["finetune", "quickstart", *COMMON, f"output_dir={run_dir}", "resume=true"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no checkpoint" in err and "is intact" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # 0 truncated lines
    assert (run_dir / "config.yaml").read_bytes() == config
    assert not (run_dir / "adapter").exists()


def test_partial_last_metrics_line_is_dropped_with_a_message(run_dir, capsys):
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # killed mid-write
    _finetune(run_dir, "resume=true")
    assert "dropped its partial last line" in capsys.readouterr().out
    assert _metric_steps(run_dir) == [1, 2, 3, 4, 5]


def test_metrics_untouched_when_the_resumed_run_fails_before_its_first_step(run_dir, monkeypatch):
    metrics = (run_dir / "metrics.jsonl").read_bytes()

    def broken(*args, **kwargs):
        raise RecipeError("the model does not build")

    monkeypatch.setattr("qlora_kit.train.objectives.CausalLM.train_step", broken)
    with pytest.raises(RecipeError):
        _finetune(run_dir, "resume=true")
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


# ----- non-finite loss ------------------------------------------------------------------------------------------
def _nan_loss_at(monkeypatch, bad_step: int):
    """The objective's loss becomes NaN at one step (what a diverging run produces)."""
    real = objectives.make_objective

    def make(recipe):
        obj = real(recipe)
        loss, calls = obj.loss, [0]

        def nan_loss(*args, **kwargs):
            calls[0] += 1
            value = loss(*args, **kwargs)
            return value * math.nan if calls[0] == bad_step else value

        obj.loss = nan_loss
        return obj

    monkeypatch.setattr(objectives, "make_objective", make)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*step-000002 is kept.*skip_nonfinite"):
        _finetune(out)
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    state = load_file(str(_ck(out, 2) / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_nan_loss_step_is_skipped_when_the_recipe_says_so(tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, 3)
    out = tmp_path / "run"
    summary = _finetune(out, "skip_nonfinite_steps=true")
    assert "step 3: the loss is nan; skipped this model update" in capsys.readouterr().out
    assert math.isnan(summary["losses"][3]) and all(math.isfinite(summary["losses"][s]) for s in (1, 2, 4, 5))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_huge_learning_rate_exits_2_in_one_sentence_without_saving(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "quickstart", *COMMON, f"output_dir={out}", "learning_rate=1e300"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "NaN/Inf" in err and "learning_rate" in err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
