"""The old home of ``qlora-kit bench`` / ``qlora-kit report``: the code lives in :mod:`qlora_kit.bench` now;
its public names stay importable from here."""

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
from .bench.adapters import bench_adapters  # noqa: F401
from .bench.images import bench_images  # noqa: F401
from .bench.lm import CONTROL, CONTROL_RTN, QAT_NAME, bench_lm, lm_bars  # noqa: F401
from .bench.measure import (  # noqa: F401
    PeakMemory,
    decode_tokens_per_s,
    environment,
    git_commit,
    prefill_tokens_per_s,
    weight_bytes,
)
from .bench.minilm import bench_minilm  # noqa: F401
