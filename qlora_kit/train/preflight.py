"""What a run would trip over, found before anything is written (``--dry-run`` and the run itself call it).

:func:`preflight` checks, in order, and stops at the first problem with one sentence naming the fix:

1. names: a built-in's close match ("did you mean tiny-llama?"), a missing local path's close file, and one
   short hub probe instead of a minute of retries (:mod:`qlora_kit.names`);
2. ``seq_len`` against the model's position table (learned positions: refused with the largest valid
   value; rotary positions past the trained length: a note);
3. the dataset's columns (``text_column`` or every ``prompt_template`` field), read from the first row
   without loading or caching the whole file, and one formatted, tokenized example to show the user;
4. notes on values that shape the run quietly (``max_documents`` capping the data, ``max_steps`` overriding
   ``epochs``).

The output_dir checks (collisions, permissions) stay in :func:`qlora_kit.train.loop._preflight`, which the
dry run also runs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..recipe import BUILTIN_MODELS, Recipe, RecipeError

_PEEK_LIMIT = 64 * 2**20  # bytes: files larger than this are not read whole just to count rows
_SHOW_CHARS = 160


@dataclass
class PreflightResult:
    """What the checks found: lines for the banner and notes the user should read."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokenizer: object = None


def preflight(recipe: Recipe, *, dry_run: bool = False) -> PreflightResult:
    """Run every check that needs no training (see the module docstring).

    Args:
        recipe: the resolved recipe.
        dry_run: a hub dataset that cannot be reached now is a note, not an error (a dry run on a laptop
            before the run on a connected machine); the model's config is needed either way.

    Raises:
        RecipeError: the first problem found, in one sentence with the fix.
    """
    from ..names import HubUnreachable, check_dataset_name, check_model_name

    result = PreflightResult()
    check_model_name(recipe.model)
    if recipe.tokenizer not in ("auto", "bytes"):
        check_model_name(recipe.tokenizer, "tokenizer")
    for key in ("dataset", "eval_dataset"):
        name = getattr(recipe, key)
        try:
            if name is not None:
                check_dataset_name(name, key)
        except HubUnreachable as e:
            if not dry_run:
                raise
            result.notes.append(f"{e}; the run will need it")
    from .objectives import objective_class

    if not objective_class(recipe.objective).language_model:
        return result  # what follows checks tokenized text
    from ..data import build_tokenizer

    try:
        result.tokenizer = build_tokenizer(recipe)
    except RecipeError as e:  # e.g. a dry run on a directory holding only config.json, before the download
        if not dry_run:
            raise
        result.notes.append(f"{str(e).rstrip('.')}; the run will need it")
    limit, learned, what = position_limit(recipe, result.tokenizer)
    if limit is not None and recipe.seq_len > limit:
        if learned:
            raise RecipeError(
                f"seq_len={recipe.seq_len} is longer than {recipe.model}'s position table ({limit} positions, "
                f"{what}); set seq_len={limit} or less"
            )
        result.notes.append(
            f"seq_len={recipe.seq_len} is past {recipe.model}'s trained length ({what}={limit}); rotary "
            "positions run, but quality past that length is untested"
        )
    _example(recipe, result)
    if recipe.max_steps is not None and recipe.epochs != 1:
        result.notes.append(f"max_steps={recipe.max_steps} sets the run's length; epochs={recipe.epochs} is not used")
    return result


# ----- positions ---------------------------------------------------------------------------------------------
def position_limit(recipe: Recipe, tokenizer=None) -> tuple[int | None, bool, str]:
    """(longest sequence, whether it is a hard limit, the config field) of the recipe's model.

    Hard: the model has a learned position table (an embedding named like ``wpe`` / ``position``), so longer
    sequences index past it. Soft: rotary or other computed positions (a note only). Built without weights.
    """
    from .build import load_base, vocab_for_builtin

    builtin = recipe.model in BUILTIN_MODELS
    vocab = vocab_for_builtin(recipe, tokenizer) if builtin and tokenizer is not None else None
    model = load_base(recipe, vocab_size=vocab, meta=not builtin)["model"]
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and limit > 0:
            break
    else:
        return None, False, ""
    import torch

    learned = any(
        isinstance(m, torch.nn.Embedding) and any(k in name.rsplit(".", 1)[-1] for k in ("wpe", "position", "pos_"))
        for name, m in model.named_modules()
    )
    return limit, learned, attr


def clip_seq_len(recipe: Recipe, say=print) -> Recipe:
    """``recipe`` with ``seq_len`` lowered to the model's position table when longer (for evaluation)."""
    limit, learned, what = position_limit(recipe)
    if limit is None or not learned or recipe.seq_len <= limit:
        return recipe
    say(f"note: seq_len {recipe.seq_len} -> {limit}: {recipe.model} has {limit} positions ({what})")
    return replace(recipe, seq_len=limit)


# ----- data --------------------------------------------------------------------------------------------------
class _Rows:
    """The few rows :func:`qlora_kit.data.text_rows` needs, so the preflight reports its exact messages."""

    def __init__(self, columns: list[str], rows: list[dict]):
        self.column_names, self._rows = columns, rows

    def __iter__(self):
        return iter(self._rows)

    def __getitem__(self, column: str):
        return [r.get(column) for r in self._rows]


def peek_rows(name: str) -> tuple[list[str], dict | None, int | None] | None:
    """(columns, first row, row count or None) of a local data file, read without ``datasets`` (which would
    cache the whole file); None for hub datasets and unknown formats."""
    path = Path(name).expanduser()
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    small = path.stat().st_size <= _PEEK_LIMIT
    try:
        if suffix in (".jsonl", ".json"):
            return _peek_json(path, small)
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                first = next(reader, None)
                count = (1 + sum(1 for _ in reader)) if small and first is not None else None
                return list(reader.fieldnames or []), first, count if first is not None else 0
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8") if small else path.open(encoding="utf-8").read(_PEEK_LIMIT)
            paragraphs = [p for p in text.split("\n\n") if p.strip()]
            return ["text"], ({"text": paragraphs[0]} if paragraphs else None), len(paragraphs) if small else None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            first = pf.read_row_group(0).slice(0, 1).to_pylist() if pf.num_row_groups else []
            return list(pf.schema_arrow.names), (first[0] if first else None), pf.metadata.num_rows
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return None  # the real loader reports unreadable files with its own one-line error
    return None


def _peek_json(path: Path, small: bool):
    """A JSON list of objects or {column: [values]} (small .json files), else one object per line."""
    data = _whole_json(path) if small and path.suffix.lower() == ".json" else None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        n = min((len(v) for v in data.values()), default=0)
        return list(data), ({k: v[0] for k, v in data.items()} if n else None), n
    if isinstance(data, list):
        rows = [r for r in data if isinstance(r, dict)]
        return (list(rows[0]) if rows else []), (rows[0] if rows else None), len(rows)
    first, count = None, 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if first is None:
                first = json.loads(line)
                if not isinstance(first, dict):
                    return None
                if not small:
                    return list(first), first, None
            count += 1
    return (list(first) if first else []), first, count


def _whole_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None


def _first_text(recipe: Recipe) -> tuple[str | None, str, int | None]:
    """(first training text formatted as the run will, where it comes from, documents available)."""
    from ..data import stdlib_files, text_rows

    if recipe.dataset == "stdlib":
        root, train, _ = stdlib_files(None)
        first = (root / train[0]).read_text(encoding="utf-8", errors="replace") if train else None
        return first, f"stdlib file {train[0]}" if train else "stdlib", len(train)
    peek = peek_rows(recipe.dataset)
    if peek is None:
        return None, repr(recipe.dataset), None
    columns, row, count = peek
    where = f"dataset {recipe.dataset!r}"
    texts = text_rows(_Rows(columns, [row] if row is not None else []), recipe, where)
    if row is None:  # columns known, no rows: the loader says "holds no examples"
        return None, where, count
    return (texts[0] if texts else ""), f"{recipe.dataset} row 1", count


def _example(recipe: Recipe, result: PreflightResult) -> None:
    text, where, count = _first_text(recipe)
    for key in ("eval_dataset",):
        name = getattr(recipe, key)
        peek = peek_rows(name) if name is not None else None
        if peek is not None and peek[1] is not None:
            from ..data import text_rows

            text_rows(_Rows(peek[0], [peek[1]]), recipe, "the evaluation data")
    if recipe.max_documents is not None and count is not None and count > recipe.max_documents:
        result.notes.append(
            f"max_documents={recipe.max_documents} uses {recipe.max_documents} of the {count:,} documents in "
            f"{recipe.dataset}; set max_documents=null to use them all"
        )
    if text is None:
        return
    shown = text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "..."
    result.lines.append(("example", f"{where}, formatted ({len(text):,} characters): {shown!r}"))
    if result.tokenizer is None:
        return
    ids = _encode(result.tokenizer, text)
    head = ", ".join(str(int(i)) for i in ids[:16])
    result.lines.append(
        ("tokenized", f"{len(ids):,} tokens [{head}{', ...' if len(ids) > 16 else ''}] (+ EOS between documents)")
    )


def _encode(tokenizer, text: str) -> list[int]:
    from ..data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def describe(result: PreflightResult) -> list[str]:
    """The notes as printable lines (``note: ...``)."""
    return [f"note: {n}" for n in result.notes]


__all__ = ["PreflightResult", "clip_seq_len", "describe", "peek_rows", "position_limit", "preflight"]
