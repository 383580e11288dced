"""Directory saves that never lose a file: a manifest per save, a crash-safe swap, leftovers recovered.

Every save (quantized model, adapter, merged model, checkpoint) is written into a fresh directory beside
the target, ``.<name>.tmp-<pid>-<random>``; the manifest ``qlora-kit-manifest.json`` (format version, each
file's size and SHA-256, each safetensors tensor's name, dtype and shape) is written last. Then:

1. the target (if any) is renamed to ``.<name>.old-<pid>-<random>``,
2. the new directory is renamed to the target,
3. files of the old directory that the save did not write and its manifest does not list (the user's own
   files, kept with ``overwrite=True``) are moved into the new directory, and the old one is removed.

A kill at any instant leaves either the target (old or new save, complete) or, between steps 1 and 2, an
``.old-*`` directory holding the previous save: :func:`recover` (run by every save and load of the target)
puts it back, moves stray user files home and removes the leftovers of killed saves (``.tmp-*`` / ``.old-*``
of processes that no longer run).

A target is replaced only when it is new, empty, or a previous save of ours (its manifest lists every file
in it); anything else needs ``overwrite=True``, and then only the files the save writes are replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

MANIFEST_NAME = "qlora-kit-manifest.json"
FORMAT = "qlora-kit-save"
VERSION = 1
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_ACTIVE: set[str] = set()  # temporary directories of saves running in this process
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class UnsafeTargetError(ValueError):
    """A save would replace files that are not a qlora-kit save (or a plain file)."""


# ----- manifest ---------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_header(path: Path) -> dict:
    """``{name: {"dtype": "F32", "shape": [..]}}`` read from a safetensors file's header (no tensor data)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path} has a {n}-byte header; the file is corrupt")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{path} has an unreadable safetensors header; the file is corrupt") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a malformed safetensors header; the file is corrupt")
    return {k: {"dtype": v.get("dtype"), "shape": v.get("shape")} for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}  # fmt: skip


def _files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file (and symlink) under ``directory``, sorted."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(p for p in out if p != MANIFEST_NAME)


def build_manifest(directory: Path, kind: str) -> dict:
    files = {}
    for rel in _files(directory):
        path = directory / rel
        entry = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if rel.endswith(".safetensors"):
            entry["tensors"] = safetensors_header(path)
        files[rel] = entry
    return {"format": FORMAT, "version": VERSION, "kind": kind, "files": files}


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened on some platforms
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(directory: Path, kind: str) -> None:
    """Write the manifest of ``directory`` (call it after every other file is written)."""
    manifest = build_manifest(directory, kind)
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, directory / MANIFEST_NAME)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``; None when there is none; ValueError when it is malformed."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}); the save is damaged, save it again") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(files, dict)
        or not all(
            isinstance(k, str) and isinstance(v, dict) and _is_int(v.get("size")) and isinstance(v.get("sha256"), str)
            for k, v in files.items()
        )
    ):
        raise ValueError(f"{path} is not a valid qlora-kit manifest; the save is damaged, save it again")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')!r}; this qlora-kit reads version {VERSION}")
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def verify(directory: Path, required: tuple[str, ...] = ()) -> dict | None:
    """Check every file the manifest lists (size, SHA-256, safetensors header) and that ``required`` are listed.

    Returns:
        The manifest, or None for a directory without one (saved by another tool or an older qlora-kit).

    Raises:
        ValueError: naming the first file that is missing, changed or not listed.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    files = manifest["files"]
    for name in required:
        if name not in files:
            raise ValueError(f"{directory / MANIFEST_NAME} does not list {name}; the save is damaged, save it again")
    for rel, entry in files.items():
        path = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"{directory / MANIFEST_NAME} lists a path outside the save ({rel!r}); it is damaged")
        if not path.is_file():
            raise ValueError(f"{path} is missing (the manifest lists it); the save is incomplete, save it again")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ValueError(
                f"{path} is truncated or corrupt ({size} bytes, the manifest says {entry['size']}); save it again"
            )
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path} is corrupt or was changed (its SHA-256 is not the manifest's); save it again")
        if "tensors" in entry and safetensors_header(path) != entry["tensors"]:
            raise ValueError(f"{path}: tensor names, dtypes or shapes differ from the manifest; the file was changed")
    return manifest


# ----- what a target holds ----------------------------------------------------------------------------------
def foreign_files(directory: Path) -> list[str]:
    """Files in ``directory`` that its manifest does not list (all of them when it has no valid manifest)."""
    try:
        manifest = read_manifest(directory)
    except ValueError:
        manifest = None
    listed = set(manifest["files"]) if manifest else set()
    out = [p for p in _files(directory) if p not in listed]
    if manifest is None and (directory / MANIFEST_NAME).exists():
        out.append(MANIFEST_NAME)
    empty_dirs = [(Path(r).relative_to(directory)).as_posix() for r, d, f in os.walk(directory) if not d and not f]
    return sorted(out + [d + "/" for d in empty_dirs if d != "."])


def check_target(target: Path, what: str, overwrite: bool) -> None:
    """Raise UnsafeTargetError unless ``target`` may take a new save (see the module docstring)."""
    target = Path(target)
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise UnsafeTargetError(
            f"{what}: {str(target)!r} is a file, not a directory; choose another path (nothing was written)"
        )
    foreign = foreign_files(target)
    if foreign and not overwrite:
        raise UnsafeTargetError(
            f"{what}: {str(target)!r} holds files that are not a qlora-kit save (e.g. {foreign[:3]}); choose a new "
            "or empty directory, or pass overwrite=True to replace only the saved files and keep the others"
        )


# ----- the swap and its recovery ----------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own: stale unless listed in _ACTIVE (checked by the caller)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _leftovers(target: Path) -> list[tuple[str, Path]]:
    """(kind, path) of stale ``.tmp-*`` / ``.old-*`` directories of ``target``: their process is gone."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # a missing or unreadable parent holds nothing we left
        return []
    out = []
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m or m.group("name") != target.name or str(p) in _ACTIVE or _pid_alive(int(m.group("pid"))):
            continue
        out.append((m.group("kind"), p))
    return sorted(out, key=lambda kp: (kp[0] != "old", kp[1].stat().st_mtime if kp[1].exists() else 0))


def _move_foreign(old: Path, new: Path) -> None:
    """Move files of ``old`` that its manifest does not list and ``new`` lacks into ``new`` (user files)."""
    try:
        manifest = read_manifest(old)
    except ValueError:
        manifest = None
    listed = set(manifest["files"]) if manifest else set()
    listed.add(MANIFEST_NAME)
    for root, dirs, files in os.walk(old):
        rel_root = Path(root).relative_to(old)
        for d in list(dirs):
            rel = (rel_root / d).as_posix()
            if not any(p.startswith(rel + "/") for p in listed) and not os.path.lexists(new / rel):
                os.replace(old / rel, new / rel)
                dirs.remove(d)
        for f in files:
            rel = (rel_root / f).as_posix()
            if rel in listed or os.path.lexists(new / rel):
                continue
            (new / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(old / rel, new / rel)


def recover(target: Path) -> list[str]:
    """Finish or undo what killed saves of ``target`` left behind; returns what was done (for messages).

    A previous save parked as ``.old-*`` comes back when the target is missing; user files parked there move
    back into the target; ``.tmp-*`` directories of dead processes are removed.
    """
    target = Path(os.path.abspath(os.path.realpath(os.fspath(target))))
    done = []
    for kind, path in _leftovers(target):
        if kind == "old" and not os.path.lexists(target):
            os.replace(path, target)
            done.append(f"restored {target} from an interrupted save")
            continue
        if kind == "old" and target.is_dir():
            _move_foreign(path, target)
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by an interrupted save")
    return done


def _swap(tmp: Path, target: Path) -> None:
    """Put the complete save ``tmp`` at ``target``; keep the user's files of the old target."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        _fsync(target.parent)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    _ACTIVE.add(str(old))
    try:
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)  # put the previous save back: nothing is lost
            raise
        _fsync(target.parent)
        _move_foreign(old, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _ACTIVE.discard(str(old))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, kind: str, what: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside ``target``; on success write its manifest and swap it into place.

    Args:
        target: the directory to save to.
        kind: what the save holds ("quantized", "adapter", "merged", ...), recorded in the manifest.
        what: the caller's name for messages ("save_quantized").
        overwrite: replace the files this save writes even when ``target`` holds other files (kept).

    Raises:
        UnsafeTargetError: ``target`` is a file, or holds files that are not ours and ``overwrite`` is False.
    """
    target = Path(os.path.abspath(os.path.realpath(os.fspath(target))))
    recover(target)
    check_target(target, what, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    _ACTIVE.add(str(tmp))
    try:
        tmp.mkdir()
        yield tmp
        write_manifest(tmp, kind)
        _swap(tmp, target)
    finally:
        _ACTIVE.discard(str(tmp))
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path, kind: str) -> None:
    """Write the manifest of the complete directory ``tmp`` and swap it into ``target`` (checkpoints)."""
    write_manifest(tmp, kind)
    _swap(Path(tmp), Path(target))
