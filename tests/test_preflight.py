"""A newcomer's first hour: the dry run catches what the run would hit, names get "did you mean", small outputs
read well (issue 17)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from qlora_kit.cli import main

SMALL = ["max_documents=20", "eval_every=0", "save_every=0", "progress_bar=false", "eval_batches=2"]


def _one_sentence(err: str) -> str:
    line = err.strip()
    assert line.startswith("qlora-kit: error: ") and "\n" not in line and "Traceback" not in line, err
    return line


def _instruction_file(path, rows=40):
    path.write_text(
        "".join(json.dumps({"instruction": f"add {i} and 2", "output": str(i + 2)}) + "\n" for i in range(rows))
    )
    return path


# ----- the two cases of "Done when": exit 2, one sentence, nothing written ---------------------------------
@pytest.mark.parametrize("dry", [True, False])
def test_seq_len_past_a_learned_position_table_is_refused_before_writing(tmp_path, monkeypatch, capsys, dry):
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "gpt2_lora", "seq_len=512"] + (["--dry-run"] if dry else [])
    assert main(argv) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert "seq_len=512" in err and "256 positions" in err and "seq_len=256 or less" in err
    assert list(tmp_path.iterdir()) == []  # no runs/, no config.yaml: the next attempt is not blocked


@pytest.mark.parametrize("dry", [True, False])
def test_dataset_without_the_text_column_is_refused_before_writing(tmp_path, monkeypatch, capsys, dry):
    monkeypatch.chdir(tmp_path)
    _instruction_file(tmp_path / "instr.jsonl")
    assert main(["finetune", "quickstart", "dataset=instr.jsonl"] + (["--dry-run"] if dry else [])) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert "no column 'text'" in err and "instruction" in err and "prompt_template" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instr.jsonl"]


def test_dry_run_prints_one_formatted_tokenized_example_with_escapes_as_meant(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _instruction_file(tmp_path / "instr.jsonl")
    template = r"### Instruction:\n{instruction}\n### Response:\n{output}"  # as typed in a shell
    argv = ["finetune", "quickstart", "dataset=instr.jsonl", f"prompt_template={template}", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    formatted = "### Instruction:\nadd 0 and 2\n### Response:\n2"
    assert repr(formatted) in out  # real newlines, shown escaped on one line
    ids = ", ".join(str(b) for b in formatted.encode()[:16])
    assert f"{len(formatted)} tokens [{ids}, ...]" in out
    # max_documents: 200 is inherited from quickstart; 40 rows: nothing capped, no note
    assert "max_documents=200 uses" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instr.jsonl"]


def test_inherited_values_that_shape_the_run_are_noted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _instruction_file(tmp_path / "instr.jsonl", rows=30)
    argv = ["finetune", "quickstart", "dataset=instr.jsonl", "prompt_template={instruction} {output}"]
    assert main([*argv, "max_documents=10", "epochs=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: max_documents=10 uses 10 of the 30 documents" in out
    assert "note: max_steps=300 sets the run's length; epochs=3 is not used" in out


def test_rotary_positions_past_the_trained_length_are_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "quickstart", "seq_len=1024", "--dry-run"]) == 0
    assert (
        "note: seq_len=1024 is past tiny-llama's trained length (max_position_embeddings=512)"
        in capsys.readouterr().out
    )


def test_dry_run_reports_the_output_dir_collision_the_run_would_hit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "config.yaml").write_text("seed: 0\n")
    assert main(["finetune", "quickstart", "--dry-run"]) == 2
    assert "already holds a run" in _one_sentence(capsys.readouterr().err)
    assert main(["finetune", "quickstart", "overwrite=true", "--dry-run"]) == 0


# ----- output_dir from the recipe's file name ---------------------------------------------------------------
def test_copied_recipe_writes_to_its_own_runs_dir(tmp_path, monkeypatch, capsys):
    from qlora_kit.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    assert main(["cp", "quickstart", "my.yaml"]) == 0
    assert load_recipe("my.yaml").output_dir == "runs/my"
    assert load_recipe("quickstart").output_dir == "runs/quickstart"
    (tmp_path / "explicit.yaml").write_text("output_dir: somewhere\n")
    assert load_recipe("explicit.yaml").output_dir == "somewhere"
    (tmp_path / "old.yaml").write_text("# qlora-kit finetune old.yaml\noutput_dir: runs/old\nseed: 1\n")
    assert main(["cp", "old.yaml", "new.yaml"]) == 0  # a copy of a recipe naming its own runs dir gets its own
    assert load_recipe("new.yaml").output_dir == "runs/new"


# ----- keys and escapes -------------------------------------------------------------------------------------
def test_keys_list_type_default_and_a_description_for_every_key(capsys):
    from qlora_kit.recipe import valid_keys

    assert main(["finetune", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("override")}
    assert set(rows) == set(valid_keys())
    for key, line in rows.items():
        assert len(line.split(None, 3)) == 4, f"{key} lacks a type, default or description: {line!r}"
    assert rows["seq_len"].split()[1:3] == ["int", "512"]
    assert "{instruction}" in rows["prompt_template"] and rows["prompt_template"].split()[1:3] == ["str", "|"]


def test_override_escapes_are_unescaped_only_where_meant():
    from qlora_kit.recipe import load_recipe

    r = load_recipe("quickstart", [r"prompt_template=Q:\n{text}\tA:\\n", r"dataset=C:\new\table.txt"])
    assert r.prompt_template == "Q:\n{text}\tA:\\n"
    assert r.dataset == r"C:\new\table.txt"  # paths keep their backslashes


# ----- names: close matches before any network attempt ------------------------------------------------------
def test_model_typo_suggests_the_builtin_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["finetune", "quickstart", "model=tiny-lama", "--dry-run"]) == 2
    assert time.perf_counter() - t0 < 10  # no hub retries (they took 40-70 s)
    err = _one_sentence(capsys.readouterr().err)
    assert "did you mean 'tiny-llama'?" in err and "tiny-gpt2" in err


def test_missing_dataset_file_suggests_the_close_file_and_builtins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _instruction_file(tmp_path / "instr.jsonl")
    assert main(["finetune", "quickstart", "dataset=instr.json", "--dry-run"]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert "did you mean 'instr.jsonl'?" in err and "stdlib" in err
    assert main(["finetune", "quickstart", "dataset=stdlb", "--dry-run"]) == 2
    assert "did you mean 'stdlib'?" in capsys.readouterr().err


def test_unreachable_hub_fails_fast_with_one_sentence(monkeypatch):
    from qlora_kit import names
    from qlora_kit.recipe import RecipeError

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setattr(names, "_reachable", {})
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="unreachable and it is not in the local cache"):
        names.check_model_name("someone/some-model")
    assert time.perf_counter() - t0 < 5
    assert os.environ.get("HF_HUB_OFFLINE") is None


def test_unreachable_hub_with_a_cached_model_goes_offline(tmp_path, monkeypatch, capsys):
    from qlora_kit import names

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(names, "_reachable", {})
    (tmp_path / "models--someone--cached" / "snapshots" / "abc").mkdir(parents=True)
    names.check_model_name("someone/cached")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the libraries load the cached copy without retries
    assert "unreachable; using the cached 'someone/cached' offline" in capsys.readouterr().out


# ----- small outputs ----------------------------------------------------------------------------------------
def test_closed_pipe_exits_quietly():
    code = "import sys; from qlora_kit.cli import main; sys.exit(main(['finetune', '--keys']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == "", err


def test_memory_footprint_lists_only_the_formats_present():
    import qlora_kit
    from qlora_kit import models

    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())
    assert list(qlora_kit.memory_footprint(model)) == ["nf4", "float"]
    assert list(qlora_kit.memory_footprint(models.tiny_llama())) == ["float"]


def test_merge_report_prints_readably():
    import qlora_kit
    from qlora_kit import models

    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())
    qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, target_modules=["q_proj"], init="gaussian"))
    with pytest.warns(UserWarning, match="requantized"):
        report = qlora_kit.merge_lora(model)
    text = str(report)
    assert text.startswith("merged LoRA into 2 layers · output drift ")
    assert "largest layer drifts: model.layers." in text and "weight drift from requantizing: up to" in text
    assert len(text.splitlines()) == 3 and "MergeReport(" in repr(report)


def test_prepare_for_kbit_training_warns_about_nothing_the_user_did(recwarn):
    import logging

    import qlora_kit
    from qlora_kit import models

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())
        qlora_kit.prepare_for_kbit_training(model)
        qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, target_modules="all-linear"))
        model.train()
        ids = torch.randint(0, 256, (2, 16))
        model(ids, labels=ids).loss.backward()
        gpt2 = models.tiny_gpt2()
        gpt2(ids, labels=ids)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [str(w.message) for w in recwarn] == []
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert model.model.gradient_checkpointing and model.config.use_cache is False


# ----- one perplexity protocol ------------------------------------------------------------------------------
def test_eval_measures_what_the_training_time_eval_measured(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "quickstart", *SMALL, "max_steps=3", "save_every=0", f"output_dir={out}"]) == 0
    trained = capsys.readouterr().out
    eval_line = next(line for line in trained.splitlines() if line.strip().startswith("eval ") and "ppl" in line)
    assert "(first 16 held-out sequences x 128 tokens)" in eval_line  # eval_batches=2 x batch_size 8
    ppl = float(eval_line.split("ppl ")[1].split()[0])
    assert main(["eval", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "first 16 held-out sequences x 128 tokens" in shown
    tuned = float(shown.split("base + adapter")[1].split("perplexity ")[1].split()[0])
    assert tuned == pytest.approx(ppl, rel=1e-3)


def test_eval_clips_seq_len_to_a_learned_position_table():
    from qlora_kit.recipe import recipe_from_dict
    from qlora_kit.train.preflight import clip_seq_len

    said = []
    recipe = recipe_from_dict({"model": "tiny-gpt2", "quantization": "none"})  # seq_len defaults to 512
    assert clip_seq_len(recipe, said.append).seq_len == 256
    assert said == ["note: seq_len 512 -> 256: tiny-gpt2 has 256 positions (n_positions)"]
    llama = recipe_from_dict({"model": "tiny-llama", "seq_len": 1024})
    assert clip_seq_len(llama, said.append) is llama  # rotary positions: nothing to clip
