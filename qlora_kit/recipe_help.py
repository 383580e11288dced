"""``qlora-kit finetune --keys``: every recipe key with its type, default and one line of documentation.

The documentation is the field comments of :class:`qlora_kit.recipe.Recipe` and of
:class:`qlora_kit.LoraConfig` for the ``lora.*`` keys (the one place it is written): a trailing ``# ...``
on the field's line, or the comment lines just above it. The ``lora.*`` defaults are the recipe's
(:data:`qlora_kit.recipe.LORA_DEFAULTS` over LoraConfig's own).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from .lora_config import LoraConfig
from .recipe import LORA_DEFAULTS, Recipe, type_name

_SHORT = {"a string": "str", "an integer": "int", "a number": "float"}
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=]+?(?:=\s*(.*?))?\s*(?:#\s*(.*))?$")


def field_docs(cls) -> dict[str, str]:
    """Field name -> its comment in the class source (trailing comment, else the comment block above)."""
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("# ---"):
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "@", "return")):
            trailing = match.group(3)
            docs[match.group(1)] = trailing.strip() if trailing else " ".join(above)
        above = []
    return docs


def _default(f: dataclasses.Field, overrides: dict) -> str:
    if f.name in overrides:
        value = overrides[f.name]
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover - every recipe field has a default
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def key_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, documentation) for every recipe key, nested ones dotted (``lora.r``)."""
    rows = []
    for cls, prefix, defaults in ((Recipe, "", {}), (LoraConfig, "lora.", LORA_DEFAULTS)):
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            words = type_name(hints[f.name]).replace("true or false", "bool").replace("a list of names", "list")
            words = words.split(" or ")
            type_words = " | ".join(_SHORT.get(w, w) for w in words)
            default = "runs/<recipe name>" if f.name == "output_dir" else _default(f, defaults)
            rows.append((prefix + f.name, type_words, default, docs.get(f.name, "")))
    return rows


def format_keys() -> str:
    """The ``--keys`` listing: one line per key (key, type, default, documentation)."""
    rows = key_rows()
    kw, tw = (max(len(r[i]) for r in rows) for i in (0, 1))
    dw = min(max(len(r[2]) for r in rows), 18)
    lines = [f"{'KEY':<{kw}}  {'TYPE':<{tw}}  {'DEFAULT':<{dw}}  DESCRIPTION"]
    for key, tp, default, doc in rows:
        lines.append(f"{key:<{kw}}  {tp:<{tw}}  {default:<{dw}}  {doc}".rstrip())
    lines.append("\noverride any key on the command line as key=value (lora.r=8); in prompt_template, \\n is a newline")
    return "\n".join(lines)
