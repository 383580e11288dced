"""qlora-kit bench: progress with an ETA, finished parts saved and reused after a kill (issue 17)."""

import json
from pathlib import Path

import pytest

from qlora_kit.bench.progress import BenchProgress, default_out, fmt_duration

PARTS = [("lm", "Llama LM"), ("minilm", "all-MiniLM-L6-v2"), ("images", "image generators")]
KEY = {"quick": True, "device": "cpu", "suites": ["images", "lm", "minilm"], "commit": "abc", "torch": "x"}


def _bench(tmp_path, lines, key=KEY):
    return BenchProgress(PARTS, key, tmp_path / "out.partial.json", tmp_path / "timings.json", lines.append)


def test_a_killed_run_resumes_at_the_first_unfinished_part(tmp_path):
    calls, lines = [], []
    progress = _bench(tmp_path, lines)

    def part(name):
        def fn(log):
            calls.append(name)
            log(f"  {name}: measured")
            if name == "minilm":
                raise KeyboardInterrupt  # killed halfway
            return {"sections": [{"key": name}], "missing": []}

        return fn

    assert progress.run("lm", part("lm")) == {"sections": [{"key": "lm"}], "missing": []}
    with pytest.raises(KeyboardInterrupt):
        progress.run("minilm", part("minilm"))
    assert json.loads((tmp_path / "out.partial.json").read_text())["parts"] == {
        "lm": {"sections": [{"key": "lm"}], "missing": []}
    }

    calls.clear()
    again = _bench(tmp_path, lines)
    results = [
        again.run(name, lambda log, name=name: {"sections": [{"key": name}]} if not calls.append(name) else None)
        for name, _ in PARTS
    ]
    assert calls == ["minilm", "images"]  # lm came from the partial file
    assert [r["sections"][0]["key"] for r in results] == ["lm", "minilm", "images"]
    assert any("reusing the results an interrupted run saved" in line for line in lines)
    again.finish()
    assert not (tmp_path / "out.partial.json").exists()


def test_a_partial_file_of_another_commit_is_not_reused(tmp_path):
    lines = []
    _bench(tmp_path, lines).run("lm", lambda log: {"sections": []})
    other = _bench(tmp_path, lines, {**KEY, "commit": "def"})
    assert other.done == {} and any("ignoring" in line for line in lines)


def test_every_line_carries_elapsed_time_and_eta_and_timings_feed_the_next_run(tmp_path):
    lines = []
    progress = _bench(tmp_path, lines)
    progress.run("lm", lambda log: log("  int8: ok"))
    assert lines[0].startswith("== [1/3] Llama LM  [0:00 elapsed · this part ~")
    assert "eta ~" in lines[1] and lines[1].startswith("  int8: ok  [")
    saved = json.loads((tmp_path / "timings.json").read_text())["cpu_quick"]
    assert set(saved) == {"lm"} and saved["lm"] < 5
    nxt = _bench(tmp_path, [])
    assert nxt.estimates["lm"] == saved["lm"]  # the last run's duration is the next estimate
    _, total = nxt.left()
    assert total == pytest.approx(sum(nxt.estimates[name] for name, _ in PARTS))


def test_a_part_past_its_estimate_says_so_instead_of_zero_left(tmp_path):
    lines = []
    progress = _bench(tmp_path, lines)
    progress.estimates["lm"] = 0.0  # any time spent is past the estimate

    def part(log):
        log("  step")

    progress.run("lm", part)
    assert "this part past its ~0:00 estimate" in lines[1] and "this part ~" not in lines[1]


def test_fmt_duration():
    assert (fmt_duration(0), fmt_duration(61.4), fmt_duration(3725)) == ("0:00", "1:01", "1:02:05")


def test_default_out_is_outside_the_source_tree(monkeypatch):
    source = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("QLORA_KIT_CACHE", raising=False)
    out = default_out().resolve()
    assert source not in out.parents and out != source


def test_help_states_the_measured_quick_time_and_the_default_out(capsys):
    from qlora_kit.bench import QUICK_TIME_HELP
    from qlora_kit.cli import main

    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert QUICK_TIME_HELP in text and "~/.cache/qlora_kit/bench" in text


# ----- bench runs from an installed package (issue 12) ---------------------------------------------------------
def test_setup_installs_every_package_under_qlora_kit(monkeypatch):
    """A wheel holds only the packages setup.py lists: one left out (qlora_kit.bench) breaks `qlora-kit bench`.
    setup.py runs with ``setuptools.setup`` captured, so what is checked is the list it really passes."""
    import runpy

    import setuptools

    root = Path(__file__).resolve().parents[1]
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(root)
    runpy.run_path(str(root / "setup.py"))
    listed = set(captured["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "qlora_kit").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk <= listed, on_disk - listed
    assert all((root / d / "__init__.py").is_file() for d in captured["package_dir"].values())
    assert {"qlora_kit.kernels", "qlora_kit.kernels.reference", "qlora_kit.recipes"} <= listed


def test_bench_reads_nothing_from_the_source_checkout():
    """The reference models and the report code are modules of the package, not files beside it."""
    import qlora_kit
    from qlora_kit.bench import command, reference_models

    package = Path(qlora_kit.__file__).resolve().parent
    assert Path(reference_models.__file__).resolve().parent == package / "bench"
    for path in (package / "bench").glob("*.py"):
        text = path.read_text()
        assert "parents[1]" not in text and "spec_from_file_location" not in text, path.name
    assert command.run_bench.__module__ == "qlora_kit.bench.command"


def test_rtn_rows_follow_the_weight_format_registry():
    from qlora_kit import registry
    from qlora_kit.bench.methods import methods_for

    names = [m.name for m in methods_for("cpu", [], peers=False)]
    rtn = [n for n in names if n.endswith(" RTN")]
    assert [n.split()[0] for n in rtn] == [f for f in registry.format_names() if registry.get_format(f).available()]
    # the rows the committed comparison and its checked bars name
    assert {"int8 RTN", "fp8 RTN", "nf4 RTN", "int4 g128 RTN"} <= set(rtn)


def test_benchmark_format_lists_come_from_the_registry():
    from qlora_kit import registry
    from qlora_kit.bench.formats import format_variants

    variants = format_variants(blocksize=64, group_size=128)
    assert [fmt for _, fmt, _ in variants] == list(registry.format_names())
    labels = {label: opts for label, _, opts in variants}
    assert labels["nf4-dq"] == {"blocksize": 64, "double_quant": True}
    assert labels["int4-g128"] == {"group_size": 128} and labels["int8"] == {}
    both = [label for label, fmt, _ in format_variants(double_quant=(False, True)) if fmt == "nf4"]
    assert both == ["nf4", "nf4-dq"]


def test_a_suite_whose_packages_are_missing_stops_before_running(monkeypatch, capsys):
    """An installed qlora-kit without the test extras: one sentence naming the package, nothing trained."""
    from qlora_kit.bench import command
    from qlora_kit.cli import main

    monkeypatch.setattr(command, "SUITE_NEEDS", {"images": (("no_such_module_q", "no-such-package"),)})
    monkeypatch.setattr(command, "run_bench", lambda **kw: pytest.fail("ran without its packages"))
    assert main(["bench", "--quick", "--device", "cpu", "--suites", "lm,images"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install no-such-package" in err[0] and "--suites lm" in err[0]
    assert command.missing_packages(["lm"]) == []
