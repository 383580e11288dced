"""One run per output_dir: an exclusive advisory lock held for the whole run, and cleanup of killed runs.

``acquire(out_dir)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<out_dir>/.qlora-kit.lock`` and writes
the holder (pid, host, start time) into it. A second run on the same directory is refused at once in one
sentence naming the holder. The kernel drops a flock when its process dies (even by ``kill -9``), so a
lock file left by a killed run is free: the next run takes it over and says so. A clean release deletes
the file; the inode check after locking makes that deletion safe against a run opening the old file
just before it.

:func:`remove_stale_tmp` deletes the temporary files and directories (``.tmp-*``, ``.<name>.tmp*``) a
killed run leaves behind in output_dir, its checkpoints and adapter directories. It runs under the lock,
so no live writer owns them.

``@releases_locks`` on the run function releases whatever it acquired when it returns or raises.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = ".qlora-kit.lock"
_TMP_NAME = re.compile(r"^\.tmp-|^\..+\.tmp(-.*)?$")
_HELD: list[RunLock] = []


class RunLock:
    """A held lock: an open file descriptor with ``flock(LOCK_EX)`` on ``path``."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still locked: nobody else can be holding this inode
        os.close(self.fd)  # closing drops the flock
        self.fd = -1


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        info = json.loads(text) if text.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    started = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def acquire(out_dir: Path, say=print) -> RunLock | None:
    """Lock ``out_dir`` (created if needed) for this process until the lock is released.

    Returns:
        The lock, or None where the filesystem has no flock (a warning is printed; the run goes on unlocked).

    Raises:
        RecipeError: another live process holds the lock.
    """
    import fcntl

    from ..recipe import RecipeError

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_holder(fd))
            os.close(fd)
            raise RecipeError(
                f"output_dir {str(out_dir)!r} is in use by another qlora-kit run ({holder}); wait for it to "
                "finish or choose another output_dir"
            ) from None
        except OSError as e:  # e.g. ENOLCK on some network filesystems
            os.close(fd)
            say(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run on this output_dir")
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder deleted the file between our open and flock: retry on the new one
            os.close(fd)
            continue
        previous = _holder(fd)
        if previous:
            state = "still running: pid reused?" if _alive(previous.get("pid")) else "no longer running"
            say(
                f"note: taking over the lock of an earlier run in {out_dir} that ended without releasing it "
                f"({_describe(previous)}, {state})"
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": int(time.time())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        lock = RunLock(fd, path)
        _HELD.append(lock)
        return lock
    raise RecipeError(f"could not lock output_dir {str(out_dir)!r}: other runs keep replacing its lock; retry")


def releases_locks(fn):
    """Decorator: release every lock ``fn`` acquired (with :func:`acquire`) when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_HELD) > mark:
                _HELD.pop().release()

    return wrapper


def remove_stale_tmp(out_dir: Path, say=print, depth: int = 4) -> list[Path]:
    """Delete leftovers of killed writers (``.tmp-*``, ``.<name>.tmp*``) under ``out_dir``, ``depth`` levels
    deep (output_dir/checkpoints/step-N/adapter), never following symbolic links. Returns what was removed."""
    removed: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            if _TMP_NAME.match(entry.name) and entry.name != LOCK_NAME:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(path)
            elif level < depth and entry.is_dir(follow_symlinks=False):
                walk(path, level + 1)

    walk(out_dir, 1)
    if removed:
        shown = ", ".join(str(p.relative_to(out_dir)) for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        say(f"removed {len(removed)} temporary file(s) left by an interrupted run in {out_dir}: {shown}")
    return removed
