"""The LoRA configuration: which layers get adapters and how (a frozen dataclass, no torch needed).

It lives apart from :mod:`qlora_kit.lora` (which re-exports it) so that recipes, whose ``lora:`` section
parses into a :class:`LoraConfig`, can be read without importing torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

INITS = ("default", "gaussian", "pissa", "loftq")  # LoraConfig.init values


def _check_names(field_name: str, value, allow_all_linear: bool):
    """Normalise a target/exclude spec: "all-linear", a regex string, or a tuple of module names."""
    if isinstance(value, str):
        if allow_all_linear and value == "all-linear":
            return value
        if not value:
            raise ValueError(f"LoraConfig.{field_name} must not be an empty string")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"LoraConfig.{field_name}={value!r} is not a valid regular expression ({e})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"LoraConfig.{field_name} must be a non-empty list of module names, got {value!r}")
        return names
    raise ValueError(
        f"LoraConfig.{field_name} must be 'all-linear', a regex string or a list of module names, got {value!r}"
    )


@dataclass(frozen=True)
class LoraConfig:
    """Which layers get LoRA adapters and how.

    Args:
        r: adapter rank (> 0).
        alpha: scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``).
        dropout: dropout on the adapter input, 0 <= dropout < 1.
        target_modules: "all-linear" (every Linear / Conv1D, quantized or not, except the output head),
            a list of module names (a module matches when its path equals a name or ends with ".name"),
            or a regex that must match the whole module path.
        exclude_modules: names or a regex (same rules) of modules never to adapt.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: DoRA (weight-decomposed LoRA; linear and convolution layers).
        init: "default" (A Kaiming-uniform, B = 0: output unchanged), "gaussian" (A ~ N(0, 1/r), B = 0),
            "pissa" (A, B from the top singular vectors; the base keeps the residual; float bases can save
            it exactly, see :func:`save_adapter`), or "loftq" (float bases only: base = nf4(W) with blocks of
            64, A, B = the SVD of W - nf4(W); quantize to NF4 with blocksize 64 before saving).

    Raises:
        ValueError: a field is out of range (the message names it).

    Example:
        >>> LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.05)
    """

    # field comments are the recipe's ``lora.*`` key documentation (``qlora-kit finetune --keys``)
    r: int = 16  # adapter rank (> 0)
    alpha: float = 16  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input, in [0, 1)
    # "all-linear" (Linear / Conv1D layers except the output head), "all" (recipes: also convolutions and
    # transposed convolutions), a list of module names, or a regex matching whole module paths
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None  # modules to leave without adapters (names or a regex)
    use_rslora: bool = False  # scale by alpha / sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA
    init: str = "default"  # default | gaussian | pissa | loftq

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoraConfig.alpha must be a finite positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", _check_names("target_modules", self.target_modules, True))
        if self.exclude_modules is not None:
            object.__setattr__(self, "exclude_modules", _check_names("exclude_modules", self.exclude_modules, False))
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoraConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {list(INITS)}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """The factor s in y = base(x) + s * B A x."""
        return self.alpha / self.r**0.5 if self.use_rslora else self.alpha / self.r
