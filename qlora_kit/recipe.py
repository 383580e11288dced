"""Fine-tuning recipes: a flat, strict YAML file mapped onto a typed, frozen dataclass.

A recipe is plain data: ``yaml.safe_load`` reads it (no tags, no code), every key must be a field of
:class:`Recipe` (or of its one nested section, ``lora``), and every value is type-checked. Command-line
overrides ``key=value`` (``lora.r=8`` for the nested section) go through the same checks. Mistakes are
reported as :class:`RecipeError`: one sentence that names the key and the fix (the CLI prints it and
exits with code 2).

Example:
    >>> recipe = load_recipe("quickstart", ["max_steps=20", "lora.r=4"])
    >>> recipe.lora.r
    4
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .lora_config import INITS as LORA_INITS
from .lora_config import LoraConfig
from .recipe_error import RecipeError
from .recipe_files import bundled_recipes as bundled_recipes  # re-exported: `qlora-kit ls` and users read it here
from .recipe_files import parse_yaml, recipe_text
from .yaml_limits import YamlLimitError, bounded_load


def objectives() -> tuple[str, ...]:
    """Values of the ``objective`` key: every registered training objective (``qlora_kit.train.objectives``)."""
    from .train.objectives import OBJECTIVES

    return tuple(OBJECTIVES)


def quantizations() -> tuple[str, ...]:
    """Values of the ``quantization`` key: "none" and every registered weight format."""
    from .registry import format_names

    return ("none", *format_names())


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit")
SCHEDULES = ("cosine", "linear", "constant")
DISCRIMINATOR_MODES = ("full", "lora")
DISTRIBUTED = ("ddp", "fsdp")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
GROUP_SIZES = (32, 64, 128)
BUILTIN_MODELS = {"tiny-llama": "causal_lm", "tiny-gpt2": "causal_lm", "tiny-unet": "diffusion", "dcgan": "gan"}
BUILTIN_DATASETS = {"stdlib": "text", "digits": "image"}
# names other tools (transformers' TrainingArguments, PEFT, axolotl, LLaMA-Factory, torchtune) use for our keys:
# only used to say "did you mean ...?" (an unknown key is still an error)
KEY_ALIASES = {
    "lr": "learning_rate",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "gradient_clipping": "max_grad_norm",
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_target": "lora.target_modules",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "warmup": "warmup_steps",
    "max_train_steps": "max_steps",
    "lr_scheduler_type": "lr_schedule",
    "lr_scheduler": "lr_schedule",
    "max_seq_length": "seq_len",
    "sequence_len": "seq_len",
    "cutoff_len": "seq_len",
    "model_name_or_path": "model",
    "base_model": "model",
}


# The recipe's ``lora:`` section is a qlora_kit.LoraConfig; recipes default to the QLoRA paper's alpha and
# dropout (LoraConfig's own defaults are PEFT's) and word their errors with the recipe's dotted keys.
LORA_DEFAULTS = {"alpha": 32.0, "dropout": 0.05}


def lora_section(**values) -> LoraConfig:
    """The recipe's ``lora:`` section: a :class:`qlora_kit.LoraConfig` with the recipe defaults
    (:data:`LORA_DEFAULTS`) and the recipe's checks (``target_modules`` may also be ``all``: every Linear,
    Conv1D, conv and transposed conv layer, resolved per model when the run builds it).

    Raises:
        RecipeError: a value out of range, in one sentence naming the ``lora.*`` key.

    Example:
        >>> lora_section(r=8).alpha
        32.0
    """
    values = {**LORA_DEFAULTS, **values}
    defaults = {f.name: LORA_DEFAULTS.get(f.name, f.default) for f in dataclasses.fields(LoraConfig)}
    for key, value in values.items():
        _check_finite_value(f"lora.{key}", value, defaults.get(key))
    _check_positive("lora.r", values.get("r", defaults["r"]))
    _check_positive("lora.alpha", values["alpha"])
    if not 0 <= values["dropout"] < 1:
        raise RecipeError(f"lora.dropout must be in [0, 1), got {values['dropout']!r}; set e.g. lora.dropout=0.05")
    _check_choice("lora.init", values.get("init", "default"), LORA_INITS)
    for key in ("target_modules", "exclude_modules"):
        value = values.get(key)
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, str) and v for v in value):
                raise RecipeError(f"lora.{key} must be a non-empty list of module names, got {_short(value)}")
            values[key] = tuple(value)
        elif value == "":
            raise RecipeError(f"lora.{key} must not be empty; use 'all-linear', 'all', names or a regex")
    try:
        return LoraConfig(**values)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"invalid lora section: {e}") from None


LoraSection = lora_section  # the former name of the section (a dataclass parallel to LoraConfig until issue 12)


@dataclass(frozen=True)
class Recipe:
    """Everything a fine-tuning run needs. Field comments are the documentation of each recipe key."""

    description: str = ""  # one line, shown by `qlora-kit ls`
    objective: str = "causal_lm"  # causal_lm | diffusion | gan
    # --- model --------------------------------------------------------------------------------------
    model: str = "tiny-llama"  # built-in (tiny-llama, tiny-gpt2, tiny-unet, dcgan), a local directory or a hub id
    tokenizer: str = "auto"  # auto (built-ins: bytes; else the model's own), bytes, or a directory / hub id
    quantization: str = "nf4"  # none | nf4 | fp4 | int8 | int4 | fp8 (the frozen base's weight format)
    blocksize: int = 64  # nf4 / fp4 block size
    double_quant: bool = True  # nf4 / fp4 double quantization of the block scales
    group_size: int = 128  # int4 group size
    compute_dtype: str = "auto"  # auto (bfloat16 on GPUs, float32 on CPUs) | float32 | bfloat16 | float16
    lora: LoraConfig = field(default_factory=lora_section)  # the lora.* keys (qlora_kit.LoraConfig)
    # --- data ---------------------------------------------------------------------------------------
    # built-in (stdlib: Python's standard-library source; digits: scikit-learn's 8x8 digits), a local
    # .json/.jsonl/.txt/.parquet/.csv file, an image folder, or a hub dataset id
    dataset: str = "stdlib"
    dataset_split: str = "train"  # split of a hub dataset
    eval_dataset: str | None = None  # a separate evaluation file / folder (default: held out from dataset)
    eval_fraction: float = 0.05  # share of a local dataset held out for evaluation when eval_dataset is unset
    text_column: str = "text"  # column holding the text
    # instruction data: each row's columns filled into {column} fields (instead of text_column); e.g.
    # "### Instruction:\n{instruction}\n### Response:\n{output}"; {{ and }} are literal braces
    prompt_template: str | None = None
    max_documents: int | None = None  # use at most this many training documents (files for stdlib)
    seq_len: int = 512  # tokens per training sequence (documents are packed)
    image_size: int = 8  # images are resized to image_size x image_size
    image_channels: int = 1  # 1 (grayscale) or 3 (RGB)
    # --- optimisation -------------------------------------------------------------------------------
    batch_size: int = 8  # sequences / images per process per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    max_steps: int | None = None  # optimizer steps (default: epochs over the data)
    epochs: int = 1  # used when max_steps is unset
    learning_rate: float = 2e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on the adapters
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    optimizer: str = "adamw"  # adamw (fused where available) | adamw_torch | paged_adamw_32bit | paged_adamw_8bit
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0  # linear warmup steps
    max_grad_norm: float | None = 1.0  # gradient clipping (null: off)
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it, else no) | no | bf16 | fp16
    cpu_threads: int | None = None  # torch threads per process (null: PyTorch's default); 1 suits tiny models
    # several processes (accelerate launch): ddp (each holds the whole base) | fsdp (FSDP2 shards the packed
    # base, adapters and optimizer state across processes; causal_lm)
    distributed: str = "ddp"
    fsdp_cpu_offload: bool = False  # fsdp: keep the shards (and the optimizer step) in CPU memory
    # fsdp: accelerate's activation checkpointing of every decoder layer (in place of gradient_checkpointing)
    fsdp_activation_checkpointing: bool = False
    # --- objective-specific -------------------------------------------------------------------------
    num_train_timesteps: int = 1000  # diffusion: DDPM noise steps
    latent_dim: int = 16  # gan: generator input size
    discriminator: str = "lora"  # gan: full (train every discriminator weight) | lora (same treatment as G)
    d_learning_rate: float | None = None  # gan: discriminator learning rate (default: learning_rate)
    # --- evaluation, checkpoints, logging -----------------------------------------------------------
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    eval_batches: int = 8  # batches per evaluation
    save_every: int = 0  # checkpoint every N steps (0: no intermediate checkpoints)
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 1  # write a metrics line every N steps
    progress_bar: bool = True  # a live progress line (else one line per log_every steps)
    output_dir: str = "runs/run"  # where the run writes; a recipe file without it: runs/<file name> (my.yaml: runs/my)
    seed: int = 0  # seeds the weights, the data order and every random draw
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # allow starting over in an output_dir that already holds a run
    stop_after_steps: int | None = None  # stop (checkpointed, resumable) after this many steps
    skip_nonfinite_steps: bool = False  # skip an update whose loss is NaN/Inf (default: stop the run, exit 2)
    merge_adapter: bool = False  # also export the base with the adapter merged into output_dir/merged

    def __post_init__(self):
        _check_finite(self)
        _check_choice("objective", self.objective, objectives())
        _check_choice("quantization", self.quantization, quantizations())
        _check_choice("blocksize", self.blocksize, BLOCKSIZES)
        _check_choice("group_size", self.group_size, GROUP_SIZES)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _check_choice("discriminator", self.discriminator, DISCRIMINATOR_MODES)
        _check_choice("image_channels", self.image_channels, (1, 3))
        _check_distributed(self)
        _check_ranges(self)
        if not self.output_dir:
            raise RecipeError("output_dir must not be empty; set output_dir=runs/my-run")
        if self.prompt_template is not None:
            template_fields(self.prompt_template)
        from .train.objectives import objective_class

        objective_class(self.objective).check_recipe(self)  # model and dataset suit it, and its own rules
        if self.lora.init == "loftq" and (self.quantization not in ("none", "nf4") or self.blocksize != 64):
            raise RecipeError(
                "lora.init=loftq fits the adapters to NF4 with blocks of 64; set quantization=nf4 blocksize=64"
            )
        if self.stop_after_steps is not None and self.max_steps is not None and self.stop_after_steps > self.max_steps:
            raise RecipeError(
                f"stop_after_steps={self.stop_after_steps} is beyond max_steps={self.max_steps}; lower it or unset it"
            )

    @property
    def name(self) -> str:
        return Path(self.output_dir).name


# ----- checks ----------------------------------------------------------------------------------------------
_POSITIVE = ("seq_len", "image_size", "batch_size", "grad_accum_steps", "epochs", "learning_rate",
             "num_train_timesteps", "latent_dim", "eval_batches", "keep_checkpoints", "log_every")  # fmt: skip
_POSITIVE_OR_NULL = (
    "max_steps",
    "max_documents",
    "stop_after_steps",
    "d_learning_rate",
    "max_grad_norm",
    "cpu_threads",
)


def _check_ranges(recipe: Recipe) -> None:
    """Numeric keys within their ranges (lower bounds here, upper bounds in ``recipe_limits.py``)."""
    for key in _POSITIVE:
        _check_positive(key, getattr(recipe, key))
    for key in _POSITIVE_OR_NULL:
        if getattr(recipe, key) is not None:
            _check_positive(key, getattr(recipe, key))
    for key in ("weight_decay", "warmup_steps", "eval_every", "save_every"):
        if getattr(recipe, key) < 0:
            raise RecipeError(f"{key} must be >= 0, got {getattr(recipe, key)!r}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(recipe, key) < 1:
            raise RecipeError(f"{key} must be in [0, 1), got {getattr(recipe, key)!r}; e.g. {key}=0.9")
    from .recipe_limits import check_upper_bounds

    check_upper_bounds(recipe, recipe.lora)
    if not 0 < recipe.eval_fraction < 1:
        raise RecipeError(f"eval_fraction must be between 0 and 1, got {recipe.eval_fraction!r}; e.g. 0.05")


def _check_distributed(recipe: Recipe) -> None:
    if recipe.distributed == "fsdp":
        from .train.objectives import OBJECTIVES

        if not OBJECTIVES[recipe.objective].supports_fsdp:
            sharded = ", ".join(name for name, cls in OBJECTIVES.items() if cls.supports_fsdp)
            raise RecipeError(f"distributed=fsdp shards {sharded} models; use distributed=ddp for {recipe.objective}")
        if recipe.merge_adapter:
            raise RecipeError(
                "merge_adapter needs the whole base in one process, which distributed=fsdp never gathers; set "
                "merge_adapter=false and run `qlora-kit merge OUTPUT_DIR` after training"
            )
        if recipe.optimizer.startswith("paged_"):
            raise RecipeError(f"optimizer={recipe.optimizer} does not take sharded parameters; use adamw with fsdp")
        if recipe.fsdp_activation_checkpointing and recipe.gradient_checkpointing:
            raise RecipeError(
                "fsdp_activation_checkpointing and gradient_checkpointing both checkpoint every layer; set one of them"
            )
    else:
        _check_choice("distributed", recipe.distributed, DISTRIBUTED)
        for key in ("fsdp_cpu_offload", "fsdp_activation_checkpointing"):
            if getattr(recipe, key):
                raise RecipeError(f"{key} is an option of the FSDP shards; set distributed=fsdp or drop it")


def _check_finite(section, prefix: str = "") -> None:
    """Every float field of a section is a finite number (inf / nan would pass the range checks)."""
    for f in dataclasses.fields(section):
        _check_finite_value(f"{prefix}{f.name}", getattr(section, f.name), f.default)


def _check_finite_value(key: str, value, default) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        default = "null" if default is None else default
        raise RecipeError(f"{key} must be a finite number, got {value!r}; set a real value (default: {default})")


def template_fields(template: str) -> list[str]:
    """The column names a ``prompt_template`` fills in (``{instruction}`` -> ``instruction``), in order.

    Raises:
        RecipeError: a brace that does not close, an empty ``{}``, a positional ``{0}`` or a conversion
            other than ``!s`` / ``!r`` / ``!a``.
    """
    fix = "write columns as {name} and literal braces as {{ and }}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise RecipeError(f"prompt_template {template!r} is not a valid template ({e}); {fix}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise RecipeError(f"prompt_template {template!r} has a field without a column name; {fix}")
        if conversion not in (None, "s", "r", "a"):
            raise RecipeError(f"prompt_template {template!r} has an unknown conversion !{conversion}; {fix}")
        if spec and any(c in spec for c in "{}"):
            raise RecipeError(f"prompt_template {template!r} nests fields in a format spec; {fix}")
        names.append(name)
    return names


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxlevel = 60, 60, 6, 3


def _short(value) -> str:
    """``repr(value)`` cut short (a value may be a long list or string; messages stay one readable line)."""
    return _REPR.repr(value)


def _check_positive(key: str, value) -> None:
    if not value > 0:
        raise RecipeError(f"{key} must be > 0, got {_short(value)}; pass a positive value such as {key}=8")


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{key}={_short(value)} is not valid{hint}; choose one of {list(allowed)}")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def type_name(tp) -> str:
    """A type annotation in the words error messages and ``--keys`` use (``an integer or null``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple):
        return "a list of names"
    if args:
        return " or ".join(type_name(a) for a in args)
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` checked against the annotation ``tp`` (YAML scalars); raises RecipeError on mismatch."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except RecipeError as e:
                errors.append(e)
        raise RecipeError(f"{key} must be {type_name(tp)}, got {_short(value)} ({type(value).__name__}); fix its value")
    if origin in (list, tuple):  # tuple[str, ...] (LoraConfig's names) is written as a YAML list too
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{key} must be a list of strings, got {_short(value)}")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e3 in YAML is a float
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported recipe field type {tp!r} for {key}")
    raise RecipeError(f"{key} must be {_TYPE_WORDS[tp]}, got {_short(value)} ({type(value).__name__}); fix its value")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_fields() -> dict[str, type]:
    """Nested sections: field name -> dataclass."""
    hints = _hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(hints[f.name])}


def valid_keys() -> list[str]:
    """Every key a recipe accepts, nested ones dotted (``lora.r``)."""
    keys = []
    sections = _section_fields()
    for f in dataclasses.fields(Recipe):
        if f.name in sections:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sections[f.name])]
        else:
            keys.append(f.name)
    return keys


def suggest_key(key: str) -> str | None:
    """The valid key a mistyped or foreign ``key`` most likely means (never a section name), or None."""
    keys = valid_keys()
    head, dot, tail = key.partition(".")
    sections = _section_fields()
    for name in (key, tail if dot else None):
        if name is not None and name.lower() in KEY_ALIASES:
            return KEY_ALIASES[name.lower()]
    if not dot:  # a section's own key written flat: r=8 -> lora.r
        nested = [k for k in keys if "." in k and k.partition(".")[2] == key]
        if nested:
            return nested[0]
    elif head in sections and tail in keys:  # a top-level key written under a section: lora.seed -> seed
        return tail
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown_key(key: str, where: str) -> RecipeError:
    close = suggest_key(key)
    hint = f"did you mean {close!r}?" if close else "`qlora-kit finetune --keys` lists the valid keys"
    return RecipeError(f"unknown key {key!r} in {where}; {hint}")


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'the recipe'} in {where} must be a mapping of key: value")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(f"{prefix}{key}", where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    make = lora_section if cls is LoraConfig else cls  # the lora: section gets the recipe's defaults and checks
    try:
        return make(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"invalid recipe {where}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``key=value`` strings (values parsed as YAML scalars; ``lora.r=8`` for nested keys) applied to ``raw``."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    sections = _section_fields()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not key=value; write it like max_steps=100 or lora.r=8")
        head, dot, tail = key.partition(".")
        owner = sections.get(head) if dot else Recipe
        tp = _hints(owner).get(tail if dot else key) if owner is not None else None
        value = _parse_override_value(text, tp, f"the value of override {key}")
        if key in UNESCAPED_KEYS and isinstance(value, str):
            value = unescape(value)  # a shell passes \n through as backslash-n; the user means a newline
        if dot:
            if head not in sections or not tail or tail not in {f.name for f in dataclasses.fields(sections[head])}:
                raise _unknown_key(key, "the overrides")
            section = raw.get(head) or {}
            if not isinstance(section, dict):
                raise RecipeError(f"{head} in the recipe must be a mapping, so {key} cannot be set")
            raw[head] = {**section, tail: value}
        elif key in sections:
            raise RecipeError(f"{key} is a section; override its keys one by one, e.g. {key}.r=8")
        else:
            if key not in {f.name for f in dataclasses.fields(Recipe)}:
                raise _unknown_key(key, "the overrides")
            raw[key] = value
    return raw


UNESCAPED_KEYS = ("prompt_template", "description")  # overrides where \n, \t and \\ are escapes


def unescape(text: str) -> str:
    r"""``\n`` -> newline, ``\t`` -> tab, ``\\`` -> backslash; every other backslash stays as typed."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _parse_override_value(text: str, tp, where: str = "the override value") -> Any:
    """Strings stay verbatim for string-typed keys (templates, paths); everything else is a YAML scalar."""
    args = set(typing.get_args(tp)) or {tp}
    takes_str = str in args
    stripped = text.strip()
    if takes_str:
        if type(None) in args and stripped in ("null", "~", "None"):
            return None
        if not any(typing.get_origin(a) in (list, tuple) for a in args) or not stripped.startswith("["):
            return text
    try:
        return bounded_load(text, where, yaml.SafeLoader) if stripped else ""
    except YamlLimitError as e:
        raise RecipeError(str(e)) from None
    except yaml.YAMLError:
        return text  # the type check reports it


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        name_or_path: a bundled recipe name (``qlora-kit ls``) or a path to a YAML file.
        overrides: ``key=value`` strings.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: unknown recipe, bad YAML, unknown key, wrong type or out-of-range value.
    """
    text, where = recipe_text(name_or_path)
    raw = apply_overrides(parse_yaml(text, where), overrides or [])
    if "output_dir" not in raw:  # runs/<recipe name>: a copied recipe (my.yaml) does not collide with its source
        raw["output_dir"] = f"runs/{Path(name_or_path).stem}"
    return _build(Recipe, raw, where)


def recipe_from_dict(raw: dict, where: str = "the recipe") -> Recipe:
    """Validate an already-parsed mapping (e.g. a saved config)."""
    return _build(Recipe, raw, where)


# ----- printing and saving ---------------------------------------------------------------------------------
def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data, in field order."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            value = {g.name: _plain(getattr(value, g.name)) for g in dataclasses.fields(value)}
        out[f.name] = _plain(value)
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def to_yaml(recipe: Recipe, header: str | None = None) -> str:
    text = yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True, width=120)
    return (f"# {header}\n" if header else "") + text


def save_resolved(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (runnable as a recipe itself) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_yaml(recipe, header=f"qlora-kit finetune {path}"), encoding="utf-8")
    os.replace(tmp, path)
