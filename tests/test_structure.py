"""The size and boundary rules of the code base (issue 12), checked on the source tree:

* no file in qlora_kit/ or kernels/ over 600 lines;
* no function over 80 lines outside kernels/ (Triton kernels keep their tile loops whole);
* no module imports another module's private (``_name``) name;
* format names are not hard-coded where the registry lists them (the CLI and the recipe schema).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("qlora_kit/**/*.py"), *ROOT.glob("kernels/**/*.py")])


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_file_size(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"{path.relative_to(ROOT)} has {lines} lines; split it (limit 600)"


def test_function_size():
    long = []
    for path in SOURCES:
        if path.relative_to(ROOT).parts[0] == "kernels":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_no_private_imports():
    found = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(
                        f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module or ''} import {private}"
                    )
    assert not found, "imports of another module's private names: " + "; ".join(found)


def test_a_format_listed_once():
    """The CLI choices and the recipe schema come from the registry: a new format file shows up in both."""
    import qlora_kit.cli as cli
    from qlora_kit import recipe, registry

    names = registry.format_names()
    assert {"nf4", "fp4", "int8", "int4", "fp8", "mxfp4"} <= set(names)
    assert recipe.quantizations() == ("none", *names)
    parser = cli.build_parser()
    quantize = next(a for a in parser._subparsers._group_actions[0].choices["quantize"]._actions if a.dest == "format")
    assert tuple(quantize.choices) == names
