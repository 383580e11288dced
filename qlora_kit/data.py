"""Training data for recipes, through Hugging Face ``datasets``.

Sources (the recipe's ``dataset`` key):

- ``stdlib``: Python's own standard-library source (``sysconfig.get_paths()["stdlib"]``) as a text
  corpus, available offline on every machine. Whole files are held out for evaluation (a stable hash of
  each file's path picks them), so evaluation text is never seen in training.
- ``digits``: scikit-learn's bundled 8x8 digits, scaled to [-1, 1] (every 10th image held out).
- a local ``.json`` / ``.jsonl`` / ``.txt`` / ``.parquet`` / ``.csv`` file with a text column
  (``text_column``) or columns filled into an instruction template (``prompt_template``).
- a local image folder (``datasets``' imagefolder layout: images, optionally in class subfolders).
- anything else is read as a hub dataset id (needs the network).

Text is tokenized and packed into blocks of ``seq_len`` tokens (documents separated by EOS). The offline
built-in models use :class:`ByteTokenizer` (UTF-8 bytes, vocabulary 256).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .recipe import BUILTIN_MODELS, Recipe, RecipeError, template_fields

TEXT_EXTENSIONS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
_FORMAT_HINTS = {  # (what datasets reads it as, what a valid file looks like)
    ".json": ("JSON", "a JSON list of objects, or one JSON object per line"),
    ".jsonl": ("JSON lines", 'one JSON object per line, e.g. {"text": "..."}'),
    ".txt": ("text", "UTF-8 text, documents separated by blank lines"),
    ".parquet": ("Parquet", "a Parquet table with a text column"),
    ".csv": ("CSV", "a header row, then one quoted row per document"),
}
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
_STDLIB_SIZE = (1_000, 200_000)  # bytes: skip stubs and the few generated giants (pydoc topics)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256); id 0 (NUL, absent from text) separates documents."""

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0
    name_or_path = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


@dataclass
class Split:
    """One split of prepared examples: token blocks (N, seq_len) or images (N, C, H, W)."""

    data: object  # a datasets.Dataset with an "input_ids" column, or a torch.Tensor of images
    description: str = ""

    def __len__(self) -> int:
        return len(self.data)

    def get(self, indices: list[int]) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self.data[torch.as_tensor(indices, dtype=torch.long)]
        rows = self.data[list(indices)]["input_ids"]
        return torch.as_tensor(np.asarray(rows), dtype=torch.long)


@dataclass
class Data:
    train: Split
    eval: Split | None
    kind: str  # "text" or "image"
    summary: str  # one line for the start banner
    fingerprint: str  # sha256 over the training examples' source (for golden tests / resume checks)


# ----- locating sources ------------------------------------------------------------------------------------
def is_local_path(name: str) -> bool:
    """True when ``name`` is meant as a local path (not a hub id)."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.splitext(name)[1].lower() in TEXT_EXTENSIONS
        or os.path.exists(os.path.expanduser(name))
    )


def check_data_paths(recipe: Recipe) -> None:
    """Fail early (before anything is written) when a local dataset the recipe names is missing."""
    for key in ("dataset", "eval_dataset"):
        name = getattr(recipe, key)
        if name is None or name in ("stdlib", "digits") or not is_local_path(name):
            continue
        path = Path(name).expanduser()
        if not path.exists():
            raise RecipeError(
                f"{key} {name!r} does not exist; fix the path (relative to {os.getcwd()}) or use a built-in dataset"
            )
        if path.is_file() and path.suffix.lower() not in TEXT_EXTENSIONS:
            raise RecipeError(
                f"{key} {name!r} has an unsupported extension; use one of {sorted(TEXT_EXTENSIONS)} or an image folder"
            )
        if _reads_text(recipe) and path.is_dir():
            raise RecipeError(
                f"{key} {name!r} is a folder but {recipe.objective} needs a text file (.jsonl, .txt, ...)"
            )
        if not _reads_text(recipe) and path.is_file():
            raise RecipeError(f"{key} {name!r} is a file but {recipe.objective} needs an image folder or digits")


def _reads_text(recipe: Recipe) -> bool:
    """Whether the recipe's objective trains on text rows (else on images): the objective class says so."""
    from .train.objectives import objective_class

    return objective_class(recipe.objective).data_kind == "text"


# ----- tokenizers ------------------------------------------------------------------------------------------
def build_tokenizer(recipe: Recipe):
    """The recipe's tokenizer: ByteTokenizer for the built-in models (or ``tokenizer: bytes``), else
    ``transformers.AutoTokenizer`` from ``tokenizer`` (or the model's own when ``auto``)."""
    from .train.objectives import objective_class

    if not objective_class(recipe.objective).language_model:
        return None
    name = recipe.tokenizer
    if name == "bytes" or (name == "auto" and recipe.model in BUILTIN_MODELS):
        return ByteTokenizer()
    source = recipe.model if name == "auto" else name
    if is_local_path(source) and not Path(source).expanduser().is_dir():
        raise RecipeError(f"tokenizer directory {source!r} does not exist; fix the path or set tokenizer=bytes")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(source))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(
            f"could not load the tokenizer {source!r} ({first[:160]}); check the name, the network, or set tokenizer"
        ) from None
    return tok


# ----- text ------------------------------------------------------------------------------------------------
def stdlib_files(max_documents: int | None = None) -> tuple[Path, list[str], list[str]]:
    """(root, training files, held-out files) of the standard-library corpus, as relative paths.

    Files are ordered by a stable hash of their path (a fixed pseudo-random order, the same for every
    run); every file whose CRC32 is 0 mod 10 is held out for evaluation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for fname in filenames:
            if fname.endswith(".py"):
                path = Path(dirpath) / fname
                if _STDLIB_SIZE[0] <= path.stat().st_size <= _STDLIB_SIZE[1]:
                    files.append(path.relative_to(root).as_posix())
    if not files:
        raise RecipeError(f"found no Python source under {root}; this Python has no stdlib source, use another dataset")
    files.sort(key=lambda p: (zlib.crc32(p.encode()), p))
    held = [p for p in files if zlib.crc32(p.encode()) % 10 == 0]
    train = [p for p in files if zlib.crc32(p.encode()) % 10 != 0]
    if max_documents is not None:
        train = train[:max_documents]
        held = held[: max(2, max_documents // 10)]
    return root, train, held


def _read_texts(root: Path, files: list[str]) -> list[str]:
    return [(root / f).read_text(encoding="utf-8", errors="replace") for f in files]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _error_chain(e: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _local_file_error(name: str, e: BaseException) -> RecipeError:
    """One sentence for a local data file datasets could not read: which file, what is wrong, the fix."""
    path = Path(name).expanduser()
    kind, looks = _FORMAT_HINTS.get(path.suffix.lower(), ("data", "a supported data file"))
    try:
        empty = path.is_file() and path.stat().st_size < 2**20 and not path.read_bytes().strip()
    except OSError:
        empty = False
    chain = _error_chain(e)
    # the parser's own error (pyarrow, pandas, json) says what is wrong; datasets' wrappers do not
    cause = next((c for c in chain if not type(c).__module__.startswith("datasets")), chain[-1])
    if empty or any(type(c).__name__ == "SchemaInferenceError" for c in chain):
        return RecipeError(f"dataset file {name!r} holds no examples; add data to it ({looks}) or use another file")
    return RecipeError(
        f"could not read dataset file {name!r} as {kind} ({_first_line(cause)}); fix it ({looks}) or use another file"
    )


def _load_table(name: str, split: str):
    """A datasets.Dataset from a local file or a hub id."""
    import datasets
    from datasets.utils import logging as ds_logging

    names = ("DatasetsError", "DatasetNotFoundError")
    dataset_errors = tuple(getattr(datasets.exceptions, n) for n in names if hasattr(datasets.exceptions, n))
    local = is_local_path(name)
    verbosity = ds_logging.get_verbosity()
    try:
        if local:
            ds_logging.set_verbosity(ds_logging.CRITICAL)  # our one-line error says what its log lines would
            path = str(Path(name).expanduser())
            builder = TEXT_EXTENSIONS[Path(path).suffix.lower()]
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError, StopIteration, *dataset_errors) as e:  # StopIteration: datasets on an empty file
        if local:
            raise _local_file_error(name, e) from None
        raise RecipeError(
            f"could not load dataset {name!r} ({_first_line(e)}); check the path, name or network"
        ) from None
    finally:
        ds_logging.set_verbosity(verbosity)


def text_rows(ds, recipe: Recipe, where: str) -> list[str]:
    """The training texts of a table: each row's ``text_column``, or its columns filled into ``prompt_template``.

    Args:
        ds: a ``datasets.Dataset`` or anything with ``column_names``, iteration over row dicts and
            ``ds[column]`` (the preflight passes its first rows only).
        recipe: the recipe naming the column or template.
        where: how to name the data in error messages.

    Raises:
        RecipeError: a missing column or template field, or a template that does not fit the rows.
    """
    columns = list(ds.column_names)
    if recipe.prompt_template is not None:
        fields = template_fields(recipe.prompt_template)
        missing = [f for f in fields if f not in columns]
        if missing:
            raise RecipeError(
                f"prompt_template uses {missing} but {where} has columns {columns}; rename the fields in the template"
            )
        template = recipe.prompt_template
        try:
            return [template.format(**row) for row in ds]
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise RecipeError(
                f"prompt_template {template!r} does not fit the rows of {where} ({type(e).__name__}: "
                f"{_first_line(e)}); use plain {{column}} fields"
            ) from None
    if recipe.text_column not in columns:
        raise RecipeError(
            f"{where} has no column {recipe.text_column!r} (it has {columns}); set text_column or prompt_template"
        )
    return [str(t) for t in ds[recipe.text_column] if t is not None]


def _pack(texts: list[str], tokenizer, seq_len: int):
    """Tokenize, join with EOS and cut into blocks of seq_len tokens (the tail is dropped)."""
    import datasets

    def tokenize(batch):
        if isinstance(tokenizer, ByteTokenizer):
            ids = [tokenizer.encode(t) for t in batch["text"]]
        else:
            ids = [
                np.asarray(x, dtype=np.int64)
                for x in tokenizer(batch["text"], add_special_tokens=True, verbose=False)["input_ids"]
            ]
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            ids = [np.concatenate([x, np.asarray([eos], dtype=np.int64)]) for x in ids]
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        n = len(flat) // seq_len
        return {"input_ids": flat[: n * seq_len].reshape(n, seq_len)}

    ds = datasets.Dataset.from_dict({"text": texts})
    return ds.map(tokenize, batched=True, batch_size=256, remove_columns=["text"], keep_in_memory=True)


def _fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_text_data(recipe: Recipe, tokenizer) -> Data:
    if recipe.dataset == "stdlib":
        root, train_files, eval_files = stdlib_files(recipe.max_documents)
        train_texts, eval_texts = _read_texts(root, train_files), _read_texts(root, eval_files)
        source = f"stdlib ({root}): {len(train_files)} files, {len(eval_files)} held out"
    else:
        table = _load_table(recipe.dataset, recipe.dataset_split)
        if recipe.eval_dataset is not None:
            eval_table = _load_table(recipe.eval_dataset, "validation")
        elif len(table) >= 2:
            parts = table.train_test_split(test_size=recipe.eval_fraction, seed=1234)
            table, eval_table = parts["train"], parts["test"]
        else:
            eval_table = None
        if recipe.max_documents is not None:
            table = table.select(range(min(recipe.max_documents, len(table))))
        train_texts = text_rows(table, recipe, repr(recipe.dataset))
        if not any(t.strip() for t in train_texts):
            raise RecipeError(
                f"dataset {recipe.dataset!r} holds no examples with text (only blank rows); add text or use another"
            )
        eval_texts = text_rows(eval_table, recipe, "the evaluation data") if eval_table is not None else []
        source = f"{recipe.dataset}: {len(train_texts)} documents, {len(eval_texts)} held out"
    train = _pack(train_texts, tokenizer, recipe.seq_len)
    evals = _pack(eval_texts, tokenizer, recipe.seq_len) if eval_texts else None
    if len(train) == 0:
        raise RecipeError(
            f"the training text is shorter than one sequence of seq_len={recipe.seq_len} tokens; "
            "add data or lower seq_len"
        )
    tok_name = "byte tokenizer" if isinstance(tokenizer, ByteTokenizer) else f"tokenizer {tokenizer.name_or_path}"
    summary = f"{source} · {len(train):,} blocks of {recipe.seq_len} tokens · {tok_name}" + (
        f" · eval {len(evals):,} blocks" if evals is not None else ""
    )
    return Data(
        train=Split(train),
        eval=Split(evals) if evals is not None and len(evals) else None,
        kind="text",
        summary=summary,
        fingerprint=_fingerprint(train_texts),
    )


# ----- images ----------------------------------------------------------------------------------------------
def digits_images() -> torch.Tensor:
    """scikit-learn's 1797 8x8 digits as float32 (N, 1, 8, 8) in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RecipeError("dataset=digits needs scikit-learn; install it with: pip install scikit-learn") from None
    x = torch.as_tensor(load_digits().images, dtype=torch.float32)  # values 0..16
    return (x / 8.0 - 1.0).unsqueeze(1)


def _image_folder(path: str, size: int, channels: int) -> torch.Tensor:
    import datasets

    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(Path(path).expanduser()), split="train")
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"could not read images from {path!r} ({str(e)[:160]}); point dataset at an image folder"
        ) from None
    mode = "L" if channels == 1 else "RGB"
    out = []
    for row in ds:
        img = row["image"].convert(mode).resize((size, size))
        arr = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    if not out:
        raise RecipeError(f"found no images in {path!r}; put .png/.jpg files there")
    return torch.stack(out)


def _resize(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1).contiguous()
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def load_image_data(recipe: Recipe) -> Data:
    if recipe.dataset == "digits":
        images = _resize(digits_images(), recipe.image_size, recipe.image_channels)
        held = torch.arange(len(images)) % 10 == 0
        train, evals = images[~held], images[held]
        source = f"digits (scikit-learn): {len(train)} images, {len(evals)} held out"
    else:
        if not is_local_path(recipe.dataset):
            raise RecipeError(f"dataset {recipe.dataset!r}: image data must be digits or a local image folder")
        images = _image_folder(recipe.dataset, recipe.image_size, recipe.image_channels)
        if recipe.eval_dataset is not None:
            train, evals = images, _image_folder(recipe.eval_dataset, recipe.image_size, recipe.image_channels)
        else:
            g = torch.Generator().manual_seed(1234)
            perm = torch.randperm(len(images), generator=g)
            n_eval = int(len(images) * recipe.eval_fraction)
            train, evals = images[perm[n_eval:]], images[perm[:n_eval]]
        source = f"{recipe.dataset}: {len(train)} images, {len(evals)} held out"
    if recipe.max_documents is not None:
        train = train[: recipe.max_documents]
    summary = f"{source} · {recipe.image_channels}x{recipe.image_size}x{recipe.image_size} in [-1, 1]"
    h = hashlib.sha256(train.numpy().tobytes()).hexdigest()[:16]
    return Data(
        train=Split(train), eval=Split(evals) if len(evals) else None, kind="image", summary=summary, fingerprint=h
    )


def load_data(recipe: Recipe, tokenizer=None) -> Data:
    """The recipe's training and evaluation data, prepared (tokenized and packed, or image tensors).

    Raises:
        RecipeError: a missing file, a missing column, too little data, ...
    """
    check_data_paths(recipe)
    import datasets

    datasets.disable_progress_bars()  # the run has its own progress display
    if _reads_text(recipe):
        return load_text_data(recipe, tokenizer)
    return load_image_data(recipe)
