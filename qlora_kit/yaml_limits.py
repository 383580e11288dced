"""Bounded YAML: the size, alias expansion and nesting depth a recipe (or an override) may have.

PyYAML's aliases are references: ``b: [*a, *a, ...]`` nested a few levels ("billion laughs") builds a
small object graph that expands to billions of values as soon as anything walks it (a type check, an
error message, ``yaml.safe_dump``). Deep nesting (``[[[[...]]]]``) makes PyYAML's recursive composer
raise RecursionError. Both are found here from the parser's event stream, which PyYAML produces
without recursion and in time linear in the text, before a single Python object is built.

Example:
    >>> check_yaml("a: &x [1, 2]\\nb: [*x, *x]\\n", "recipe.yaml")  # fine: 9 values once expanded
"""

from __future__ import annotations

import yaml

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: a recipe is ~60 keys; a bigger file is a mistake (or an attack)
MAX_NODES = 10_000  # values after expanding every alias (long target_modules lists fit many times over)
MAX_CHARS = 4 * MAX_RECIPE_BYTES  # characters of all scalars after expanding every alias
MAX_DEPTH = 32  # nesting of lists / mappings (a recipe needs 3)


class YamlLimitError(ValueError):
    """The YAML text is over one of the limits; the message is one sentence naming the limit and the fix."""


def check_size(nbytes: int, where: str, limit: int = MAX_RECIPE_BYTES) -> None:
    """YamlLimitError when a YAML text of ``nbytes`` bytes is over ``limit``."""
    if nbytes > limit:
        raise YamlLimitError(
            f"{where} is {nbytes:,} bytes, more than the {limit:,} a recipe may have; "
            "a recipe is a short list of key: value lines, so check that this is the right file"
        )


def check_yaml(text: str, where: str) -> None:
    """Walk the parser events of ``text`` and raise YamlLimitError when it is too big, too deep, or its
    aliases expand to more than :data:`MAX_NODES` values or :data:`MAX_CHARS` characters.

    Syntax errors are left to the loader that runs next (it reports them with line and column).
    """
    check_size(len(text.encode("utf-8", "surrogatepass")), where)
    anchors: dict[str, tuple[int, int, int]] = {}  # anchor -> (expanded nodes, expanded chars, depth below)
    # one frame per open collection: [nodes, chars, deepest level below it, anchor]
    stack: list[list] = [[0, 0, 0, None]]
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if len(stack) > MAX_DEPTH:
                    raise YamlLimitError(
                        f"{where} nests lists or mappings more than {MAX_DEPTH} levels deep; "
                        "a recipe is flat key: value pairs (one level for lora:), so flatten it"
                    )
                stack.append([1, 0, 0, event.anchor])
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                nodes, chars, below, anchor = stack.pop()
                if anchor is not None:
                    anchors[anchor] = (nodes, chars, below + 1)
                _add(stack[-1], nodes, chars, below + 1, where, len(stack))
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    anchors[event.anchor] = (1, len(event.value), 0)
                _add(stack[-1], 1, len(event.value), 0, where, len(stack))
            elif isinstance(event, yaml.AliasEvent):
                nodes, chars, below = anchors.get(event.anchor, (1, 0, 0))  # unknown: the loader reports it
                _add(stack[-1], nodes, chars, below, where, len(stack))
    except yaml.YAMLError:
        return  # the loader reports syntax errors with their position


def _add(frame: list, nodes: int, chars: int, below: int, where: str, depth: int) -> None:
    frame[0] += nodes
    frame[1] += chars
    frame[2] = max(frame[2], below)
    if frame[0] > MAX_NODES or frame[1] > MAX_CHARS:
        raise YamlLimitError(
            f"{where} expands to more than {MAX_NODES:,} values or {MAX_CHARS:,} characters once its "
            "&anchors and *aliases are resolved; write the values out instead of nesting aliases"
        )
    if depth + below > MAX_DEPTH + 1:
        raise YamlLimitError(
            f"{where} nests lists or mappings more than {MAX_DEPTH} levels deep through its *aliases; "
            "a recipe is flat key: value pairs (one level for lora:), so flatten it"
        )


def bounded_load(text: str, where: str, loader: type = yaml.SafeLoader):
    """``yaml.load(text, Loader=loader)`` (a SafeLoader subclass) after :func:`check_yaml`."""
    check_yaml(text, where)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass, bounded above
