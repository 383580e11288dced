"""The reference models live in :mod:`qlora_kit.bench.reference_models` (an installed qlora-kit reaches them);
this module keeps ``from benchmarks import reference_models`` and ``python benchmarks/reference_models.py``
working.

Usage:
    python benchmarks/reference_models.py [--quick] [--device cpu|cuda]     # train (or load) all of them
"""

from qlora_kit.bench.reference_models import *  # noqa: F403  (re-exported)
from qlora_kit.bench.reference_models import main

if __name__ == "__main__":
    main()
