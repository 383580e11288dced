"""Model and dataset names: built-ins, local paths and hub ids, checked before any network attempt.

A name that is neither a built-in nor an existing local path is read as a Hugging Face Hub id. Before that
goes to the network (where a typo costs a minute of retries), :func:`check_model_name` and
:func:`check_dataset_name` say "did you mean ...?" for a close built-in or a close file next to a missing
path, and :func:`hub_reachable` makes one short connection attempt: when the hub cannot be reached and the
name is not in the local Hugging Face cache, the user gets one sentence at once; when it is cached, the
process switches the Hugging Face libraries to offline mode (``HF_HUB_OFFLINE=1``) so they load the cached
files without retrying.

Example:
    >>> check_model_name("tiny-lama")  # doctest: +SKIP
    RecipeError: model 'tiny-lama' is not a built-in or a local directory; did you mean 'tiny-llama'? ...
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .recipe import BUILTIN_DATASETS, BUILTIN_MODELS, RecipeError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_reachable: dict[str, bool] = {}  # host -> result of the one probe made per process


class HubUnreachable(RecipeError):
    """A name that would come from the Hugging Face Hub, which cannot be reached (and nothing is cached)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_host() -> str:
    """The host name of the Hugging Face endpoint (``HF_ENDPOINT`` or huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urlparse(endpoint).hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or one TCP connection to the hub's port 443 fails within ``timeout``.

    The answer is remembered for the process, so a run probes at most once.
    """
    if any(_truthy(os.environ.get(v)) for v in _OFFLINE_VARS):
        return False
    host = hub_host()
    if host not in _reachable:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _reachable[host] = True
        except OSError:  # DNS failure, refused, timed out
            _reachable[host] = False
    return _reachable[host]


def go_offline() -> None:
    """Put the Hugging Face libraries in offline mode (cached files only, no retries).

    The variables are read when those libraries are first imported, so this only takes full effect before
    transformers / datasets / huggingface_hub are imported (the CLI checks names before importing them).
    """
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))


def _in_hf_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the Hugging Face Hub cache holds a snapshot of ``repo_id`` (checked on disk, without importing
    huggingface_hub, which reads the offline switch once at import)."""
    root = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub")
    snapshots = root / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        return any(snapshots.iterdir())
    except OSError:
        return False


def _close(name: str, choices, cutoff: float = 0.75) -> str | None:
    found = difflib.get_close_matches(name.lower(), list(choices), n=1, cutoff=cutoff)
    return found[0] if found else None


def _close_file(path: Path) -> str | None:
    """A file or folder next to a missing ``path`` whose name is close to it (``instr.json`` -> ``instr.jsonl``)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        siblings = [p.name for p in parent.iterdir()]
    except OSError:
        return None
    found = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.7)
    if not found:
        return None
    return str(path.with_name(found[0]))


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


def check_model_name(name: str, key: str = "model", *, network: bool = True) -> None:
    """Raise a one-sentence RecipeError for a model name that cannot work, before any download.

    Args:
        name: the recipe's ``model`` (a built-in, a local directory or a hub id).
        key: the recipe key or CLI flag to name in the message.
        network: probe the hub (and go offline when it is unreachable but the name is cached).
    """
    builtins = ", ".join(BUILTIN_MODELS)
    if name in BUILTIN_MODELS or (_looks_local(name) and Path(name).expanduser().is_dir()):
        return
    if _looks_local(name):
        near = _close_file(Path(name).expanduser())
        hint = f"did you mean {near!r}? " if near else ""
        raise RecipeError(
            f"{key} directory {name!r} does not exist; {hint}fix the path, or use a built-in ({builtins}) or a hub id"
        )
    close = _close(name, BUILTIN_MODELS)
    if close is not None:
        raise RecipeError(
            f"{key} {name!r} is not a built-in or a local directory; did you mean {close!r}? "
            f"(built-ins: {builtins}; anything else is read as a Hugging Face Hub id such as 'gpt2')"
        )
    if network:
        _hub_or_cache(name, key, "model", f"use a built-in ({builtins}) or a local model directory")


def check_dataset_name(name: str, key: str = "dataset", *, network: bool = True) -> None:
    """Like :func:`check_model_name` for the recipe's ``dataset`` / ``eval_dataset``."""
    from .data import TEXT_EXTENSIONS

    builtins = ", ".join(BUILTIN_DATASETS)
    if name in BUILTIN_DATASETS:
        return
    local = _looks_local(name) or os.path.splitext(name)[1].lower() in TEXT_EXTENSIONS
    if local:
        path = Path(name).expanduser()
        if path.exists():
            return
        near = _close_file(path)
        hint = f"did you mean {near!r}? " if near else ""
        raise RecipeError(
            f"{key} {name!r} does not exist (relative to {os.getcwd()}); {hint}"
            f"fix the path or use a built-in dataset ({builtins})"
        )
    close = _close(name, BUILTIN_DATASETS)
    if close is not None:
        raise RecipeError(
            f"{key} {name!r} is not a built-in or a local file; did you mean {close!r}? "
            f"(built-ins: {builtins}; local files need an extension such as .jsonl; anything else is a hub dataset id)"
        )
    if network:
        _hub_or_cache(name, key, "dataset", f"use a built-in dataset ({builtins}) or a local file")


def _hub_or_cache(name: str, key: str, repo_type: str, fix: str) -> None:
    if hub_reachable():
        return
    if _in_hf_cache(name, repo_type) or (repo_type == "dataset" and _datasets_cached(name)):
        if not any(_truthy(os.environ.get(v)) for v in _OFFLINE_VARS):
            print(f"note: the Hugging Face Hub ({hub_host()}) is unreachable; using the cached {name!r} offline")
        go_offline()
        return
    mode = "offline mode is set" if any(_truthy(os.environ.get(v)) for v in _OFFLINE_VARS) else "it is unreachable"
    raise HubUnreachable(
        f"{key} {name!r} is not a built-in or a local path, so it would come from the Hugging Face Hub "
        f"({hub_host()}), but {mode} and it is not in the local cache; {fix}, or connect and retry"
    )


def _datasets_cached(name: str) -> bool:
    """True when ``datasets`` has a prepared copy of hub dataset ``name`` (its cache folder names it)."""
    root = os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets"
    folder = name.replace("/", "___")
    try:
        return any(p.name == folder for p in Path(root).iterdir())
    except OSError:
        return False
