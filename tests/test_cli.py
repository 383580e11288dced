"""The `qlora-kit` command line: quantize, ls, cp, finetune (--dry-run, user errors), eval, merge."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kit.cli import main

SMALL = ["max_documents=20", "eval_every=0", "save_every=0", "progress_bar=false", "eval_batches=2"]


def _snapshot(path: Path) -> set:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ----- quantize --------------------------------------------------------------------------------------------
def test_quantize_writes_a_loadable_directory(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    import qlora_kit
    from qlora_kit.models import tiny_llama

    out = tmp_path / "q"
    assert main(["quantize", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("layers quantized", "weights before", "weights after", "bits / quantized param",
                  "output cosine vs float", "time"):  # fmt: skip
        assert label in text
    assert "14 (QuantLinear 14)" in text
    cosine = float(text.split("output cosine vs float")[1].split()[0])
    assert 0.98 < cosine <= 1.0
    bits = float(text.split("bits / quantized param")[1].split()[0])
    assert 4.1 < bits < 4.2  # NF4 + double quant: 4 bits + ~0.13 bits of scales
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "quantization.json", "config.json",
                                               "qlora-kit-manifest.json"}  # fmt: skip
    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    loaded = qlora_kit.load_quantized(skeleton, out).eval()
    reference = qlora_kit.quantize(tiny_llama(), qlora_kit.NF4Config()).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "tiny-gpt2", "--format", "fp4", "--no-double-quant", "--blocksize", "128"],
        ["--model", "tiny-bert", "--compute-dtype", "float32"],
    ],
)
def test_quantize_other_models_and_formats(tmp_path, capsys, args):
    out = tmp_path / "q"
    assert main(["quantize", *args, "--output", str(out)]) == 0
    assert (out / "quantization.json").is_file()
    qmap = json.loads((out / "quantization.json").read_text())
    assert qmap["layers"]


def test_quantize_other_formats_when_available(tmp_path, capsys):
    from qlora_kit.formats.base import get_format

    for fmt in ("int8", "int4", "fp8"):
        try:
            get_format(fmt)
        except ValueError:
            continue
        out = tmp_path / fmt
        assert main(["quantize", "--format", fmt, "--group-size", "32", "--output", str(out)]) == 0
        assert fmt in json.dumps(json.loads((out / "quantization.json").read_text()))


# ----- user errors: exit code 2, one line, nothing written ---------------------------------------------------
def _bad_yaml(tmp: Path) -> str:
    p = tmp / "inputs" / "bad.yaml"
    p.write_text("model: tiny-llama\nlora: {r: 4\n")
    return str(p)


def _jsonl_without_text(tmp: Path) -> str:
    p = tmp / "inputs" / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": "x" * 300}) for _ in range(10)))
    return str(p)


def _write(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / "inputs" / name
    p.write_bytes(data)
    return str(p)


def _malformed_jsonl(tmp: Path) -> str:
    return _write(tmp, "m.jsonl", b'{"text": "a fine row"}\n{"text": broken\n')


def _empty_txt(tmp: Path) -> str:
    return _write(tmp, "empty.txt", b"")


def _latin1_recipe(tmp: Path) -> str:
    return _write(tmp, "latin1.yaml", "description: caf\u00e9\nmodel: tiny-llama\n".encode("latin-1"))


def _file_as_parent(tmp: Path) -> str:
    return str(Path(_write(tmp, "a_file", b"x")) / "run")


FINETUNE_ERRORS = [
    (lambda t: ["finetune", "quikstart"], ["unknown recipe", "'quickstart'"]),
    (lambda t: ["finetune", str(t / "inputs" / "none.yaml")], ["does not exist"]),
    (lambda t: ["finetune", _bad_yaml(t)], ["not valid YAML", "at line"]),
    (lambda t: ["finetune", "quickstart", "learning_rat=1e-3"], ["unknown key 'learning_rat'", "'learning_rate'"]),
    (lambda t: ["finetune", "quickstart", "lora.rank=4"], ["unknown key 'lora.rank'", "'lora.r'"]),
    (lambda t: ["finetune", "quickstart", "max_steps=ten"], ["max_steps must be an integer"]),
    (lambda t: ["finetune", "quickstart", "lora.r=0"], ["lora.r must be > 0"]),
    (lambda t: ["finetune", "quickstart", "quantization=nf5"], ["did you mean 'nf4'"]),
    (lambda t: ["finetune", "quickstart", "dataset=./missing.jsonl"], ["dataset './missing.jsonl' does not exist"]),
    (lambda t: ["finetune", "quickstart", f"dataset={_jsonl_without_text(t)}"], ["no column 'text'", "text_column"]),
    (lambda t: ["finetune", "quickstart", "model=./no-such-model"], ["model directory './no-such-model'"]),
    (lambda t: ["finetune", "quickstart", "resume=true"], ["holds no checkpoint"]),
    (lambda t: ["finetune", "quickstart", "batch_size=4000"], ["fewer than one global batch"]),
    (lambda t: ["finetune", "quickstart", "max_steps"], ["key=value"]),
    (lambda t: ["finetune", "unet_lora", "gradient_checkpointing=maybe"], ["true or false"]),
    (lambda t: ["finetune", "dcgan_qlora", "image_size=16"], ["8x8"]),
    (lambda t: ["finetun", "quickstart"], ["unknown command", "'finetune'"]),
    (lambda t: ["finetune", "quickstart", "--bogus"], ["unrecognized arguments"]),
    (lambda t: ["quantize", "--blocksize", "48"], ["blocksize", "64"]),
    (lambda t: ["quantize", "--model", "./nope"], ["model directory './nope' does not exist"]),
    (lambda t: ["cp", "quikstart", str(t / "x.yaml")], ["unknown recipe"]),
    (lambda t: ["eval", str(t / "inputs")], ["not a run directory"]),
    # options and overrides mixed in any order; lora targets that match nothing, with and without --dry-run
    (lambda t: ["finetune", "quickstart", "--dry-run", "lora.target_modules=[nomatch]"],
     ["lora.target_modules=[nomatch] matched no layer", "q_proj"]),
    (lambda t: ["finetune", "quickstart", "lora.target_modules=[nomatch]"], ["matched no layer", "q_proj"]),
    # data files datasets cannot read; templates that do not parse
    (lambda t: ["finetune", "quickstart", f"dataset={_malformed_jsonl(t)}"], ["m.jsonl", "JSON lines", "fix it"]),
    (lambda t: ["finetune", "quickstart", f"dataset={_empty_txt(t)}"], ["empty.txt", "holds no examples"]),
    (lambda t: ["finetune", "quickstart", "prompt_template={instruction"], ["prompt_template", "{{"]),
    (lambda t: ["finetune", _latin1_recipe(t)], ["latin1.yaml", "not UTF-8"]),
    (lambda t: ["finetune", "quickstart", f"output_dir={_file_as_parent(t)}"], ["a_file", "is a file", "output_dir"]),
    # foreign key names point at ours (never at the section name 'lora'); non-finite numbers
    (lambda t: ["finetune", "quickstart", "lr=1e-3"], ["'lr'", "did you mean 'learning_rate'"]),
    (lambda t: ["finetune", "quickstart", "rank=8"], ["did you mean 'lora.r'"]),
    (lambda t: ["finetune", "quickstart", "grad_clip=0.3"], ["did you mean 'max_grad_norm'"]),
    (lambda t: ["finetune", "quickstart", "learning_rate=inf"], ["learning_rate must be a finite number"]),
    (lambda t: ["finetune", "quickstart", "weight_decay=nan"], ["weight_decay must be a finite number"]),
    # numeric flags
    (lambda t: ["eval", "--batch-size", "0"], ["--batch-size", "> 0"]),
    (lambda t: ["eval", "--batch-size", "-2"], ["--batch-size", "> 0"]),
    (lambda t: ["eval", "--batches", "0"], ["--batches", "> 0"]),
    (lambda t: ["eval", "--seq-len", "0"], ["--seq-len", "> 0"]),
    (lambda t: ["quantize", "--blocksize", "0"], ["--blocksize", "32, 64, 128"]),
    (lambda t: ["quantize", "--format", "nf4", "--group-size", "48"], ["--group-size", "[32, 64, 128]"]),
    # bench / report: their own parsers, errors in one line
    (lambda t: ["report", "/nonexistent.json"], ["/nonexistent.json does not exist"]),
    (lambda t: ["bench", "--suites", "nope"], ["unknown suite"]),
]  # fmt: skip


@pytest.mark.parametrize("make_args, words", FINETUNE_ERRORS)
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, make_args, words):
    (tmp_path / "inputs").mkdir()
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path)
    if args[0] == "finetune" and len(args) > 1:
        out = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={tmp_path / 'out'}"]
        args = [*args, *out, *SMALL]
    before = _snapshot(tmp_path)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert len(lines) == 1, err
    assert lines[0].startswith("qlora-kit: error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]
    assert _snapshot(tmp_path) == before  # nothing written (no output_dir, no cwd files)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_dir_that_cannot_be_created_is_a_user_error(capsys):
    """As root os.access() says /proc is writable; the check must still catch it, before building anything."""
    assert main(["finetune", "quickstart", "output_dir=/proc/nope/run", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora-kit: error: output_dir '/proc/nope/run' cannot be created") and "\n" not in err
    assert not os.path.exists("/proc/nope") and not [p for p in os.listdir("/proc") if "qlora-kit" in p]


def test_output_dir_holding_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    import yaml

    from qlora_kit.recipe import load_recipe

    out = tmp_path / "run"
    assert main(["finetune", "quickstart", *SMALL, "max_steps=2", f"output_dir={out}"]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # the resolved config is printed at the start of the run (key: value pairs, before the banner) and saved
    text = capsys.readouterr().out
    head, _, rest = text.partition("\nqlora-kit finetune · ")
    assert head.startswith(f"resolved config (saved as {out / 'config.yaml'}):\n  ") and rest
    assert len(head.splitlines()) < 20
    pairs = [p.split(": ", 1) for line in head.splitlines()[1:] for p in line.strip().split(" · ")]
    printed = {k: yaml.safe_load(v) for k, v in pairs}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    flat_saved = {
        f"lora.{k}" if sec else k: v
        for sec, d in (("", saved), ("lora", saved["lora"]))
        for k, v in d.items()
        if not isinstance(v, dict) and k != "description"
    }
    assert printed == flat_saved
    assert printed["max_steps"] == 2 and printed["output_dir"] == str(out) and printed["lora.r"] == 16
    resolved = load_recipe("quickstart", [*SMALL, "max_steps=2", f"output_dir={out}"])
    assert load_recipe(str(out / "config.yaml")) == resolved
    assert main(["finetune", "quickstart", *SMALL, "max_steps=2", f"output_dir={out}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main(["finetune", "quickstart", *SMALL, "max_steps=2", f"output_dir={out}", "overwrite=true"]) == 0


# ----- ls, cp, console script ------------------------------------------------------------------------------
def test_ls_and_cp(tmp_path, capsys):
    assert main(["ls"]) == 0
    listing = capsys.readouterr().out
    for name in ("quickstart", "llama_qlora", "gpt2_lora", "unet_lora", "dcgan_qlora"):
        assert name in listing
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "quickstart", str(dest)]) == 0
    assert dest.read_text().splitlines()[0] == f"# qlora-kit finetune {dest}"
    import dataclasses

    from qlora_kit.recipe import load_recipe

    # the copy is the same recipe, writing to its own runs/<file name> (the README's sequence works in order)
    assert load_recipe(str(dest)) == dataclasses.replace(load_recipe("quickstart"), output_dir="runs/mine")
    assert load_recipe("quickstart").output_dir == "runs/quickstart"
    assert main(["cp", "quickstart", str(dest)]) == 2  # exists: needs --force
    assert main(["cp", "quickstart", str(dest), "--force"]) == 0


def test_bench_and_report_take_their_own_options(capsys):
    """`bench` / `report` hand their arguments to qlora_kit.report's parsers (leading dashes included)."""
    assert main(["bench", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["report", "--help"]) == 0
    assert "results" in capsys.readouterr().out
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "bench" in listing and "report" in listing


def test_options_and_overrides_mix_in_any_order(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", "--print-config", "quickstart", "max_steps=3", "--dry-run", f"output_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "max_steps: 3\n" in text and f"output_dir: {out}\n" in text
    assert not out.exists()


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "qlora-kit"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qlora_kit.cli"]
    proc = subprocess.run([*cmd, "finetune", "quickstart", "lora.r=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "qlora-kit: error: lora.r must be > 0, got 0; pass a positive value such as lora.r=8"


# ----- finetune --dry-run ----------------------------------------------------------------------------------
def test_dry_run_prints_sizes_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", "quickstart", f"output_dir={out}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "output_dir: " + str(out) in text  # the resolved config
    for label in ("parameters", "trainable", "quantized", "peak memory"):
        assert label in text
    assert "14 layers" in text
    assert not out.exists()


def test_dry_run_of_a_real_architecture_needs_no_weights(tmp_path, capsys):
    """A local directory with only config.json (as for an 8B model before download): counts are exact."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
    cfg.save_pretrained(tmp_path / "llama")
    assert main(["finetune", "llama_qlora", f"model={tmp_path / 'llama'}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    r, h, ffn, kv = 64, 512, 1376, 512 * 4 // 8
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + ffn) * 3)  # q,o ; k,v ; gate,up,down
    assert f"trainable {4 * per_layer:,}" in text
    assert "4 x 7 = 28" not in text and "28 layers" in text
    assert {p.name for p in (tmp_path / "llama").iterdir()} == {"config.json"}


def test_keys_lists_every_recipe_key(capsys):
    assert main(["finetune", "--keys"]) == 0
    keys = capsys.readouterr().out.split()
    assert "learning_rate" in keys and "lora.r" in keys and "output_dir" in keys


# ----- eval and merge on a finished run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "run"
    assert main(["finetune", "gpt2_lora", *SMALL, "max_steps=6", f"output_dir={out}"]) == 0
    return out


def test_eval_reports_base_and_adapter_perplexity(gpt2_run, capsys):
    assert main(["eval", str(gpt2_run), "--batches", "2", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    base = float(text.split("base ")[1].split("loss")[1].split()[0])
    tuned = float(text.split("base + adapter")[1].split("loss")[1].split()[0])
    assert tuned < base


def test_merge_writes_a_model_equal_to_base_plus_adapter(gpt2_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from qlora_kit.recipe import load_recipe
    from qlora_kit.train.export import model_with_adapter

    out = tmp_path / "merged"
    assert main(["merge", str(gpt2_run), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "from_pretrained loads it" in printed and "tokenizer beside it" in printed
    assert "merged LoRA into" in printed and "output drift" in printed  # the drift summary
    from transformers import AutoTokenizer

    from qlora_kit.data import ByteTokenizer

    text = "def f(x):\n    return 'héllo'\t"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == list(ByteTokenizer().encode(text))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = model_with_adapter(load_recipe(str(gpt2_run / "config.yaml")), gpt2_run / "adapter")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    assert main(["merge", str(gpt2_run), "--output", str(out)]) == 0  # our previous save: replaced
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(gpt2_run), "--output", str(out)]) == 2  # holds a user's file: needs --force
    assert "--force" in capsys.readouterr().err
    assert main(["merge", str(gpt2_run), "--output", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces only the saved files


def test_merge_a_quantized_run(tmp_path, capsys):
    """quickstart's adapter merged into its NF4 base: adapted layers become float, the rest stay NF4."""
    run = tmp_path / "run"
    assert main(["finetune", "quickstart", *SMALL, "max_steps=3", f"output_dir={run}",
                 "lora.target_modules=[q_proj, v_proj]"]) == 0  # fmt: skip
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out)]) == 0
    assert "(quantized: " in capsys.readouterr().out
    qmap = json.loads((out / "quantization.json").read_text())
    assert len(qmap["layers"]) == 14 - 4  # q_proj and v_proj of 2 layers merged into float
    assert os.path.isfile(out / "config.json")


def test_bench_rejects_non_positive_threads(capsys):
    assert main(["bench", "--threads", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--threads" in err and "Traceback" not in err
