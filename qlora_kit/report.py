"""The old home of ``qlora-kit bench`` / ``qlora-kit report``: the code lives in :mod:`qlora_kit.bench` now;
these names stay importable from here."""

from .bench import (  # noqa: F401  (re-exported)
    QUICK_TIME_HELP,
    Method,
    Section,
    main_bench,
    main_report,
    methods_for,
    render_markdown,
    run_bench,
    svg_plot,
    write_report,
)
from .bench.lm import lm_bars  # noqa: F401  (re-exported)
