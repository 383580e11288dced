"""Progress, ETA and resume for ``qlora-kit bench`` (the measuring itself is :mod:`qlora_kit.bench`).

The comparison runs in parts (the Llama LM, the QLoRA adapters, MiniLM, the image generators). Every log
line carries the elapsed time and an estimate of what is left, for the part and for the whole run; each
part's results are saved to ``<out>/<stem>.partial.json`` as soon as the part finishes, so a run that was
killed resumes at the first unfinished part (reference models are cached by
:mod:`qlora_kit.bench.reference_models` as soon as each is trained). The partial file is removed when the run
completes; its key (quick, device, suites, commit, torch) must match, or it is ignored.

Estimates: each part's duration in the last completed run with the same (device, quick), kept in
``<cache>_bench_timings.json``; before any run, rough priors (:data:`QUICK_CPU_SECONDS`). Once a part
has finished, the remaining estimates are scaled by how fast this run has been so far.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# (part, title, suite option that includes it)
PARTS = (
    ("lm", "Llama LM", "lm"),
    ("adapters", "QLoRA adapters", "lm"),
    ("minilm", "all-MiniLM-L6-v2", "minilm"),
    ("images", "image generators", "images"),
)
# priors (seconds) for `bench --quick --device cpu` from an empty cache on 2 CPU cores, used until a run has
# measured its own. Measured 2026-12-02 (823 s in all, load 1-7): the LM part 136 s (training the reference LM:
# 65 s of it), adapters 21 s, MiniLM 56 s, images 610 s (training the UNet and the DCGAN reference models, then
# the methods); rounded up.
QUICK_CPU_SECONDS = {"lm": 150.0, "adapters": 30.0, "minilm": 60.0, "images": 620.0}


def default_out() -> Path:
    """``qlora-kit bench``'s default --out: beside the reference-model cache, outside any source tree."""
    base = os.environ.get("QLORA_KIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_kit")
    return Path(base) / "bench"


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class BenchProgress:
    """Runs the bench parts in order with ETA lines and per-part results saved for a resume.

    Args:
        parts: (name, title) of the parts to run, in order.
        key: what identifies the run (a partial file with another key is not reused).
        partial_path: where finished parts are saved (None: no resume).
        timings_path: where the parts' durations are kept for the next run's estimates (None: not kept).
        log: prints a line.
    """

    def __init__(self, parts, key: dict, partial_path=None, timings_path=None, log: Callable[[str], None] = print):
        self.parts = list(parts)
        self.key = key
        self.partial_path = Path(partial_path) if partial_path else None
        self.timings_path = Path(timings_path) if timings_path else None
        self._print = log
        self.t0 = time.perf_counter()
        self.done: dict[str, object] = self._load_partial()
        self.estimates = self._load_estimates()
        self.measured: dict[str, float] = {}  # parts run (not reused) in this process: seconds
        self.current: tuple[str, float] | None = None  # (part, start time)

    # ----- persistence ---------------------------------------------------------------------------------
    def _load_partial(self) -> dict[str, object]:
        if self.partial_path is None or not self.partial_path.is_file():
            return {}
        try:
            saved = json.loads(self.partial_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            self._print(f"(ignoring {self.partial_path}: it belongs to another configuration or commit)")
            return {}
        parts = saved.get("parts")
        return dict(parts) if isinstance(parts, dict) else {}

    def _save_partial(self) -> None:
        if self.partial_path is None:
            return
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.partial_path.with_name(self.partial_path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "parts": self.done}))
        os.replace(tmp, self.partial_path)

    def _timings_slot(self) -> str:
        return f"{self.key.get('device')}{'_quick' if self.key.get('quick') else ''}"

    def _load_estimates(self) -> dict[str, float]:
        estimates = dict(QUICK_CPU_SECONDS)
        if not (self.key.get("quick") and self.key.get("device") == "cpu"):
            estimates = {k: 4 * v for k, v in estimates.items()}  # full / GPU runs: no prior worth the name
        if self.timings_path is not None and self.timings_path.is_file():
            try:
                saved = json.loads(self.timings_path.read_text()).get(self._timings_slot(), {})
                estimates.update({k: float(v) for k, v in saved.items() if k in estimates})
            except (OSError, ValueError, AttributeError, TypeError):
                pass
        return estimates

    def _save_timings(self) -> None:
        if self.timings_path is None or not self.measured:
            return
        try:
            data = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        slot = data.setdefault(self._timings_slot(), {})
        slot.update({k: round(v, 1) for k, v in self.measured.items()})
        self.timings_path.parent.mkdir(parents=True, exist_ok=True)
        self.timings_path.write_text(json.dumps(data, indent=2))

    # ----- estimates -----------------------------------------------------------------------------------
    def _speed(self) -> float:
        """This run's time / the estimate, over the parts it ran (1.0 before any finished)."""
        if not self.measured:
            return 1.0
        return sum(self.measured.values()) / sum(self.estimates[k] for k in self.measured)

    def left(self) -> tuple[float | None, float]:
        """(seconds left in the current part or None, seconds left in the whole run)."""
        speed = self._speed()
        pending = [n for n, _ in self.parts if n not in self.done and (self.current is None or n != self.current[0])]
        rest = speed * sum(self.estimates[n] for n in pending)
        if self.current is None:
            return None, rest
        name, start = self.current
        part_left = max(speed * self.estimates[name] - (time.perf_counter() - start), 0.0)
        return part_left, part_left + rest

    def _overrun(self) -> float | None:
        """The current part's estimate when it has already run longer than that, else None."""
        if self.current is None:
            return None
        name, start = self.current
        estimate = self._speed() * self.estimates[name]
        return estimate if time.perf_counter() - start > estimate else None

    def _stamp(self) -> str:
        part_left, total_left = self.left()
        elapsed = fmt_duration(time.perf_counter() - self.t0)
        overrun = self._overrun()
        if overrun is not None:  # say so, instead of a "~0:00 left" that stays on screen for minutes
            here = f" · this part past its ~{fmt_duration(overrun)} estimate"
        else:
            here = f" · this part ~{fmt_duration(part_left)}" if part_left is not None else ""
        return f"[{elapsed} elapsed{here} · eta ~{fmt_duration(total_left)}]"

    # ----- running -------------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        """A progress line with the elapsed time and what is estimated to be left (flushed: logs to files)."""
        self._print(f"{line}  {self._stamp()}")
        sys.stdout.flush()

    def run(self, name: str, fn: Callable[[Callable[[str], None]], object]) -> object:
        """Part ``name``'s results (JSON data): reused from the partial file, or ``fn(log)``'s, then saved."""
        index = [n for n, _ in self.parts].index(name) + 1
        title = dict(self.parts)[name]
        if name in self.done:
            self._print(f"== [{index}/{len(self.parts)}] {title}: reusing the results an interrupted run saved")
            return self.done[name]
        self.current = (name, time.perf_counter())
        self.log(f"== [{index}/{len(self.parts)}] {title}")
        result = fn(self.log)
        self.measured[name] = time.perf_counter() - self.current[1]
        self.current = None
        self.done[name] = result
        self._save_partial()
        self._save_timings()
        return result

    def finish(self) -> None:
        """The run completed: its partial file is no longer needed."""
        if self.partial_path is not None and self.partial_path.exists():
            self.partial_path.unlink()
