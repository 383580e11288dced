"""Field checks shared by the PTQ algorithm configs: each failure is one sentence naming the field."""

from __future__ import annotations

import math


def fail(cls: str, field: str, allowed: str, value) -> None:
    """Raise the ValueError every config check raises: ``Cls.field must be <allowed>, got <value>``."""
    raise ValueError(f"{cls}.{field} must be {allowed}, got {value!r}")


def check_choice(obj, field: str, allowed) -> None:
    """``obj.field`` is one of ``allowed`` (a bool never counts as 0 or 1)."""
    value = getattr(obj, field)
    if isinstance(value, bool) or value not in allowed:
        fail(type(obj).__name__, field, f"one of {list(allowed)}", value)


def check_number(obj, field: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> None:
    """``obj.field`` is a finite number (an integer when ``integer``) in [lo, hi] ((lo, hi] when ``lo_open``)."""
    value = getattr(obj, field)
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        what = "an integer" if integer else "a number"
        fail(type(obj).__name__, field, f"{what} in {'(' if lo_open else '['}{lo}, {hi}]", value)


def check_bool(obj, field: str) -> None:
    """``obj.field`` is True or False."""
    if not isinstance(getattr(obj, field), bool):
        fail(type(obj).__name__, field, "True or False", getattr(obj, field))
