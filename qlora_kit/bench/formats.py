"""The weight formats a benchmark enumerates: every format in :mod:`qlora_kit.registry`, with the options its config
has, so a format registered later (MXFP4) shows up in the report and in ``benchmarks/bench_*.py`` without edits."""

from __future__ import annotations

from .. import registry


def format_variants(double_quant: tuple[bool, ...] = (True,), **options) -> list[tuple[str, str, dict]]:
    """``(label, format name, config options)`` for every weight format in qlora_kit's registry, in its order.

    Each format takes the ``options`` its config has (``blocksize``, ``group_size``); formats with double
    quantization get one variant per value in ``double_quant``. Labels name what varies: "nf4-dq", "nf4",
    "int4-g128", "int8".

    Example:
        >>> format_variants(blocksize=64, group_size=128)[0]
        ('nf4-dq', 'nf4', {'blocksize': 64, 'double_quant': True})
    """
    out = []
    for name in registry.format_names():
        fields = registry.weight_config(name).__dataclass_fields__
        base = {k: v for k, v in options.items() if k in fields}
        for dq in double_quant if "double_quant" in fields else (None,):
            opts = base if dq is None else {**base, "double_quant": dq}
            label = name + ("-dq" if dq else "") + (f"-g{opts['group_size']}" if "group_size" in opts else "")
            out.append((label, name, opts))
    return out
