"""One class per weight format (NF4, FP4, int8, int4, fp8, ...), one file each.

Every module of this package is imported here, so a new format is one new file: its ``@register_format``
class is then known to ``quantize``, serialization, the recipe schema, the CLI and the benchmarks.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
