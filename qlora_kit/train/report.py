"""What a run shows and records: start banner, progress bar, metrics JSONL, end summary."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}"


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(label, MiB) of the peak memory so far: CUDA allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        return "gpu", torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return "rss", float("nan")


class Metrics:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only).

    The file is rewritten only on the first new line, so a run that fails before its first step leaves
    it as it was: a fresh run then empties it, a resumed run drops what the interrupted run logged after
    its checkpoint, and lines that do not parse (a partial last line of a killed write) with a message.
    """

    def __init__(self, path: Path | None, resume_step: int | None, say=print):
        self.path, self.resume_step, self.say = path, resume_step, say
        self._ready = path is None

    def _prepare(self) -> None:
        self._ready = True
        if self.resume_step is None or not self.path.is_file():
            self.path.write_text("", encoding="utf-8")
            return
        keep, bad = [], []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
                bad.append(number)
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                if record.get("step", 0) <= self.resume_step:
                    keep.append(line)
            elif record is not None:
                bad.append(number)
        if bad:
            where = "its partial last line" if bad == [len(lines)] else f"{len(bad)} unreadable line(s), e.g. {bad[0]}"
            self.say(f"note: {self.path}: dropped {where} (an interrupted write)")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        if not self._ready:
            self._prepare()
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class Progress:
    """A tqdm bar on terminals (step, epoch, loss, lr, throughput, peak memory, ETA); on pipes and log
    files, a plain line every ~10% of the run instead of carriage-return updates."""

    def __init__(self, total: int, initial: int, enabled: bool, unit: str):
        self.total, self.enabled, self.unit = total, enabled, unit
        self.bar = None
        self.start_step, self.start_time = initial, time.perf_counter()
        self.every = max(1, total // 10)
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                width = 0
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="step",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=width > 0,
                # terminals that report a 0 x 0 size (some CI runners, emulators) would get no bar at all
                ncols=None if width > 0 else 120,
                nrows=None if width > 0 else 24,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}",
            )

    def update(self, step: int, info: dict) -> None:
        if not self.enabled:
            return
        text = (
            f"epoch {info['epoch']} · loss {info['loss']:.4f} · lr {info['lr']:.2e} · "
            f"{fmt_rate(info['rate'])} {self.unit}/s · {info['mem_label']} {info['mem_mb']:.0f} MB"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.every == 0 or step == self.total or step == self.start_step + 1:
            elapsed = time.perf_counter() - self.start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(f"step {step:>{len(str(self.total))}}/{self.total} · {text} · eta {fmt_eta(eta)}", flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def banner(lines: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in lines)
    return "\n".join([title, *[f"  {k:<{width}}  {v}" for k, v in lines]])
