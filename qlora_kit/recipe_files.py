"""Finding and reading recipe files: bundled names, paths, and strict YAML (re-exported by ``qlora_kit.recipe``)."""

from __future__ import annotations

import difflib
import importlib.resources
import os
from pathlib import Path

import yaml

from .recipe_error import RecipeError
from .yaml_limits import YamlLimitError, bounded_load, check_size


def bundled_recipes() -> dict[str, str]:
    """Name -> first description line of every recipe shipped in ``qlora_kit.recipes``."""
    out = {}
    for entry in sorted(importlib.resources.files("qlora_kit.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            try:
                raw = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                raw = {}
            out[entry.name[: -len(".yaml")]] = str(raw.get("description", "")) if isinstance(raw, dict) else ""
    return out


def recipe_text(name_or_path: str) -> tuple[str, str]:
    """(YAML text, where it came from) of a bundled recipe name or a path to a YAML file."""
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path or "/" in name_or_path
    if looks_like_path or os.path.isfile(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; check the path or run `qlora-kit ls`")
        try:
            check_size(path.stat().st_size, f"recipe file {str(path)!r}")
            return path.read_text(encoding="utf-8"), str(path)
        except YamlLimitError as e:
            raise RecipeError(str(e)) from None
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"recipe file {str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML"
            ) from None
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {str(path)!r} ({e.strerror}); check its permissions") from None
    resource = importlib.resources.files("qlora_kit.recipes") / f"{name_or_path}.yaml"
    if not resource.is_file():
        names = list(bundled_recipes())
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(
            f"unknown recipe {name_or_path!r}; {hint}pass a bundled name ({', '.join(names)}) or a path to a .yaml file"
        )
    return resource.read_text(encoding="utf-8"), f"{name_or_path} (bundled)"


def parse_yaml(text: str, where: str) -> dict:
    """Strict YAML mapping: safe_load only (no tags, no code), duplicate keys rejected."""
    try:
        data = bounded_load(text, where, _StrictLoader)
    except YamlLimitError as e:
        raise RecipeError(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where} is not valid YAML{at} ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of key: value, got a {type(data).__name__}")
    return data


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a silent last-one-wins is a classic recipe bug)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
