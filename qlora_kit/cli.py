"""The ``qlora-kit`` command line.

    qlora-kit finetune RECIPE [key=value ...] [--dry-run]   fine-tune from a YAML recipe
    qlora-kit ls                                           bundled recipes
    qlora-kit cp RECIPE DEST                               copy a bundled recipe to edit it
    qlora-kit quantize [--model M] [--format F] ...        quantize a model and save it
    qlora-kit merge RUN_DIR [--output DIR]                 merge a run's adapter into its base and save
    qlora-kit eval RUN_DIR                                 perplexity of base and base + adapter
    qlora-kit bench [--quick] ... / report RESULTS.json    compare quantization methods / render the results

Options and ``key=value`` overrides may come in any order. User mistakes (unknown recipe or key, wrong type,
missing or unreadable file, bad YAML, ...) print one line naming the problem and the fix and exit with code 2;
nothing is written.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from pathlib import Path

from .os_errors import user_os_error
from .recipe import BLOCKSIZES, GROUP_SIZES, RecipeError
from .registry import format_names

EXIT_USER_ERROR = 2
QUANT_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-bert")


def _positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse reports the flag: ``argument --batch-size: ...``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}; pass a positive integer")
    return value


def _int_choice(allowed: tuple[int, ...]):
    """argparse type: an integer from ``allowed`` (the message lists them)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {list(allowed)}, got {text!r}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of usage dumps."""

    def error(self, message: str):
        sys.stderr.write(f"qlora-kit: error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USER_ERROR)


# ----- finetune / ls / cp ----------------------------------------------------------------------------------
def _cmd_finetune(args) -> int:
    from .recipe import load_recipe, to_yaml

    if args.keys:
        from .recipe_help import format_keys

        print(format_keys())
        return 0
    if args.recipe is None:
        raise RecipeError("finetune needs a recipe; pass a bundled name (`qlora-kit ls`) or a path to a .yaml file")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise RecipeError(f"{bad[0]!r} is not a key=value override; write it like max_steps=100 or lora.r=8")
    recipe = load_recipe(args.recipe, args.overrides)
    from .train import finetune

    if args.print_config:
        print(to_yaml(recipe), end="")
        return 0
    finetune(recipe, dry_run=args.dry_run)
    return 0


def _cmd_ls(args) -> int:
    from .recipe import bundled_recipes

    recipes = bundled_recipes()
    width = max(map(len, recipes), default=0)
    for name, desc in recipes.items():
        print(f"{name:<{width}}  {desc}")
    print("\nrun one with `qlora-kit finetune NAME`; copy one to edit with `qlora-kit cp NAME my.yaml`")
    return 0


def _cmd_cp(args) -> int:
    from .recipe import recipe_text

    text, _ = recipe_text(args.recipe)
    dest = Path(args.dest).expanduser()
    if dest.is_dir():
        dest = dest / f"{Path(args.recipe).stem}.yaml"
    if dest.exists() and not args.force:
        raise RecipeError(f"{str(dest)!r} already exists; pass --force to overwrite it or choose another DEST")
    if not dest.parent.is_dir():
        raise RecipeError(f"directory {str(dest.parent)!r} does not exist; create it first or choose another DEST")
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith("# qlora-kit finetune"):
        lines[0] = f"# qlora-kit finetune {dest}\n"
    source_dir = f"output_dir: runs/{Path(args.recipe).stem}\n"  # the copy gets its own runs/<name>
    lines = [f"output_dir: runs/{dest.stem}\n" if line == source_dir else line for line in lines]
    try:
        dest.write_text("".join(lines), encoding="utf-8")
    except OSError as e:
        raise RecipeError(
            f"cannot write {str(dest)!r} ({e.strerror or e}); choose a DEST in a directory you can write to"
        ) from None
    print(f"wrote {dest}; edit it, then run: qlora-kit finetune {dest}")
    return 0


# ----- quantize --------------------------------------------------------------------------------------------
def _quantize_config(args):
    import torch

    from .registry import get_format

    fmt = get_format(args.format)
    if not fmt.available():
        raise RecipeError(f"format {args.format} is not available in this installation; use --format nf4 or fp4")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.compute_dtype]
    options = dict(blocksize=args.blocksize, double_quant=not args.no_double_quant, group_size=args.group_size)
    try:
        return fmt.config_from_options(compute_dtype=dtype, **options)
    except ValueError as e:
        msg = re.sub(r"^\w+Config\.", "--", str(e))  # "NF4Config.blocksize must ..." -> "--blocksize must ..."
        raise RecipeError(msg.replace("group_size", "group-size")) from None


def _load_for_quantize(name: str):
    """(model, kind) for a built-in name, a local directory or a hub id."""
    from . import models

    if name == "tiny-llama":
        return models.tiny_llama(), "causal_lm"
    if name == "tiny-gpt2":
        return models.tiny_gpt2(), "causal_lm"
    if name == "tiny-bert":
        return models.tiny_bert(), "encoder"
    local = name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))
    if local and not Path(name).expanduser().is_dir():
        raise RecipeError(f"model directory {name!r} does not exist; fix the path or use one of {list(QUANT_MODELS)}")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .model_files import check_no_pickle_only

    if local:
        check_no_pickle_only(name, name)
    source = os.path.expanduser(name)
    try:
        config = AutoConfig.from_pretrained(source)
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        return cls.from_pretrained(source, use_safetensors=True).eval(), ("causal_lm" if causal else "encoder")
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RecipeError(f"could not load model {name!r} ({first}); check the name or path, or the network") from None


def _probe_output(model, kind: str):
    """The model's output on a fixed input (2 sequences of 16 token ids, seed 0)."""
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids)
    t = out.logits if kind == "causal_lm" else out.last_hidden_state
    return t.float()


def _check_output(output: Path, what: str, force: bool | None) -> None:
    """RecipeError unless ``output`` is new, empty or a previous qlora-kit save (checked before any work);
    ``force`` (None: the command has no --force) saves beside other files, which are kept."""
    from .safe_io import UnsafeTargetError, check_target

    try:
        check_target(output, what, bool(force))
    except UnsafeTargetError as e:
        hint = " or pass --force (only the saved files are replaced, the others kept)" if force is not None else ""
        raise RecipeError(f"{str(e).split('; ')[0]}; choose another --output{hint}") from None


def _cmd_quantize(args) -> int:
    import torch

    from .api import memory_footprint, quantize
    from .nn.quantized import QuantizedLayer
    from .serialization import QMAP_NAME, save_quantized
    from .train.report import banner, fmt_bytes

    config = _quantize_config(args)
    output = Path(args.output or f"{Path(args.model).name}-{args.format}").expanduser()
    _check_output(output, "quantize --output", None)
    model, kind = _load_for_quantize(args.model)
    before = memory_footprint(model)["float"]
    reference = _probe_output(model, kind)
    t0 = time.perf_counter()
    try:
        quantize(model, config)
    except ValueError as e:
        raise RecipeError(f"cannot quantize {args.model!r}: {str(e).splitlines()[0]}") from None
    seconds = time.perf_counter() - t0
    after = memory_footprint(model)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    qparams = sum(m.qweight.shape[0] * m.qweight.shape[1] for m in layers)
    qbytes = sum(v for k, v in after.items() if k != "float")
    cosine = torch.nn.functional.cosine_similarity(
        _probe_output(model, kind).flatten(), reference.flatten(), dim=0
    ).item()
    config_obj = getattr(model, "config", None)
    save_quantized(model, output, also_write=lambda d: config_obj.to_json_file(str(d / "config.json"))
                   if hasattr(config_obj, "to_json_file") else None)  # fmt: skip
    types = {}
    for m in layers:
        types[type(m).__name__] = types.get(type(m).__name__, 0) + 1
    from .registry import get_format

    fmt_desc = get_format(args.format).describe(config)
    lines = [
        ("model", f"{args.model} ({type(model).__name__})"),
        ("format", f"{fmt_desc}, compute {args.compute_dtype}"),
        ("layers quantized", f"{len(layers)} ({', '.join(f'{k} {v}' for k, v in types.items())})"),
        ("weights before", fmt_bytes(before)),
        (
            "weights after",
            f"{fmt_bytes(sum(after.values()))} ({args.format} {fmt_bytes(qbytes)} + float "
            f"{fmt_bytes(after['float'])} kept: heads, embeddings, norms, biases)",
        ),
        ("bits / quantized param", f"{8 * qbytes / max(qparams, 1):.3f} ({qparams:,} params)"),
        ("output cosine vs float", f"{cosine:.5f} (2 x 16 tokens, seed 0)"),
        ("time", f"{seconds:.2f} s"),
        ("saved", f"{output} (model.safetensors, {QMAP_NAME}" + (", config.json)" if config_obj is not None else ")")),
    ]
    print(banner(lines, "qlora-kit quantize"))
    if config_obj is not None:
        print(
            f"load it: qlora_kit.load_quantized(AutoModel{'ForCausalLM' if kind == 'causal_lm' else ''}"
            f".from_config(AutoConfig.from_pretrained('{output}')), '{output}')"
        )
    return 0


# ----- merge / eval ----------------------------------------------------------------------------------------
def _recipe_for(args):
    """The recipe of a run directory, or one built from --model for a bare adapter."""
    from .recipe import recipe_from_dict
    from .train.export import load_run_recipe

    if args.run_dir is not None:
        return load_run_recipe(args.run_dir), Path(args.run_dir).expanduser()
    if args.model is None:
        raise RecipeError("pass a run directory (the output_dir of `qlora-kit finetune`) or --model with --adapter")
    raw = {"model": args.model, "quantization": args.quantization or "none"}
    if getattr(args, "dataset", None):
        raw["dataset"] = args.dataset
    return recipe_from_dict(raw, "the command line"), None


def _cmd_merge(args) -> int:
    from .train.export import merge_and_save, model_with_adapter

    recipe, run_dir = _recipe_for(args)
    adapter = Path(args.adapter).expanduser() if args.adapter else (run_dir / "adapter" if run_dir else None)
    if adapter is None:
        raise RecipeError("--adapter is required with --model; point it at a saved adapter directory")
    output = Path(args.output).expanduser() if args.output else (run_dir / "merged" if run_dir else None)
    if output is None:
        raise RecipeError("--output is required with --model; name the directory to write the merged model to")
    _check_output(output, "merge --output", args.force)
    from .data import build_tokenizer

    tokenizer = build_tokenizer(recipe)  # None for objectives without one
    model = model_with_adapter(recipe, adapter, quantized=not args.float_base)
    kind, report = merge_and_save(model, output, tokenizer, overwrite=args.force)
    print(f"merged {adapter} into {recipe.model} and saved it to {output} ({kind})\n{report}")
    return 0


def _cmd_eval(args) -> int:
    from .data import build_tokenizer, load_data
    from .recipe import recipe_from_dict, to_dict
    from .train.export import model_with_adapter, perplexity
    from .train.report import banner

    recipe, run_dir = _recipe_for(args)
    from .train.objectives import objective_class

    if not objective_class(recipe.objective).language_model:
        raise RecipeError(
            f"qlora-kit eval measures perplexity of causal LMs; this run's objective is {recipe.objective}"
        )
    changes = {k: v for k, v in (("dataset", args.dataset), ("seq_len", args.seq_len)) if v is not None}
    if changes:
        recipe = recipe_from_dict({**to_dict(recipe), **changes}, "the command line")
    from .train.preflight import clip_seq_len

    recipe = clip_seq_len(recipe)  # longer than a learned position table: evaluate at the longest it has
    adapter = Path(args.adapter).expanduser() if args.adapter else (run_dir / "adapter" if run_dir else None)
    tokenizer = build_tokenizer(recipe)
    data = load_data(recipe, tokenizer)
    if data.eval is None:
        raise RecipeError(f"dataset {recipe.dataset!r} has no held-out evaluation text; pass --dataset with more data")
    rows = []
    base = model_with_adapter(recipe, None)
    # by default the training-time evaluation's sequences: the first eval_batches x batch_size held-out blocks
    batch_size, batches = args.batch_size or recipe.batch_size, args.batches or recipe.eval_batches
    res_base = perplexity(base, data.eval, batch_size, batches)
    rows.append(("base", f"loss {res_base['loss']:.4f} · perplexity {res_base['perplexity']:.3f}"))
    if adapter is not None:
        tuned = model_with_adapter(recipe, adapter)
        res = perplexity(tuned, data.eval, batch_size, batches)
        rows.append(("base + adapter", f"loss {res['loss']:.4f} · perplexity {res['perplexity']:.3f}"))
    title = (
        f"qlora-kit eval · {recipe.model} ({recipe.quantization}) on {recipe.dataset} held-out text · "
        f"first {res_base['sequences']} held-out sequences x {recipe.seq_len} tokens"
    )
    print(banner(rows, title))
    return 0


# ----- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qlora-kit", description="Quantization and LoRA / QLoRA fine-tuning for any PyTorch backbone.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    f = sub.add_parser("finetune", help="fine-tune from a YAML recipe", description="Fine-tune from a YAML recipe.")
    f.add_argument("recipe", nargs="?", help="bundled recipe name (see `qlora-kit ls`) or path to a .yaml file")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 lora.r=8")
    f.add_argument("--dry-run", action="store_true", help="print config, sizes and a memory estimate; do not train")
    f.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    f.add_argument("--keys", action="store_true", help="list every recipe key: type, default, description")
    f.set_defaults(func=_cmd_finetune)

    ls = sub.add_parser("ls", help="list the bundled recipes")
    ls.set_defaults(func=_cmd_ls)

    cp = sub.add_parser("cp", help="copy a bundled recipe to edit it")
    cp.add_argument("recipe")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true", help="overwrite DEST")
    cp.set_defaults(func=_cmd_cp)

    q = sub.add_parser(
        "quantize",
        help="quantize a model and save it",
        description="Quantize a model's weights and save them (safetensors + quantization.json).",
    )
    q.add_argument("--model", default="tiny-llama", help=f"{' | '.join(QUANT_MODELS)} | local directory | hub id")
    q.add_argument("--format", default="nf4", choices=format_names())
    q.add_argument(
        "--blocksize", type=_int_choice(BLOCKSIZES), default=64, help="nf4 / fp4 block size (32, 64, ..., 4096)"
    )
    q.add_argument("--group-size", type=_int_choice(GROUP_SIZES), default=128, help="int4 group size (32, 64, 128)")
    q.add_argument("--no-double-quant", action="store_true", help="nf4 / fp4: keep fp32 block scales")
    q.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    q.add_argument("--output", help="directory to write (default: ./<model>-<format>)")
    q.set_defaults(func=_cmd_quantize)

    for name, helptext in (
        ("merge", "merge an adapter into its base model and save it"),
        ("eval", "perplexity of a base model and base + adapter on held-out text"),
    ):
        c = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        c.add_argument("run_dir", nargs="?", help="output_dir of a `qlora-kit finetune` run")
        c.add_argument("--model", help="base model instead of a run directory (built-in, local directory, hub id)")
        c.add_argument("--quantization", choices=("none", *format_names()), help="with --model: the base's format")
        c.add_argument("--adapter", help="adapter directory (default: RUN_DIR/adapter)")
        if name == "merge":
            c.add_argument("--output", help="directory to write (default: RUN_DIR/merged)")
            c.add_argument("--float-base", action="store_true", help="merge into the float base, not the quantized one")
            c.add_argument("--force", action="store_true", help="save into an --output holding other files (kept)")
            c.set_defaults(func=_cmd_merge)
        else:
            c.add_argument("--dataset", help="text to evaluate on (default: the run's dataset)")
            c.add_argument("--seq-len", type=_positive_int, help="tokens per sequence")
            c.add_argument("--batch-size", type=_positive_int, help="sequences per batch (default: the run's)")
            c.add_argument(
                "--batches", type=_positive_int, help="at most this many batches (default: the run's eval_batches)"
            )
            c.set_defaults(func=_cmd_eval)
    # listed here for `qlora-kit --help`; main() hands their arguments to qlora_kit.bench's own parsers
    for name, helptext in _PASSTHROUGH_HELP.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return p


_PASSTHROUGH_HELP = {
    "bench": "compare quantization methods (quality, size, memory, speed) on reference models",
    "report": "render a bench results JSON as Markdown and HTML",
}


def _run_passthrough(command: str, argv: list[str]) -> int:
    """``bench`` / ``report``: qlora_kit.bench's own argparse main, its SystemExit turned into the exit code."""
    from . import bench

    fn = bench.main_bench if command == "bench" else bench.main_report
    # their parsers are plain argparse (usage dump + error); report usage errors in one line like ours
    plain_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _Parser.error
    try:
        return int(fn(list(argv)) or 0)
    except SystemExit as e:  # their own argparse: --help (0) or a usage error (2, already reported)
        code = e.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        sys.stderr.write(f"qlora-kit: error: {code}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("qlora-kit: interrupted\n")
        return 130
    finally:
        argparse.ArgumentParser.error = plain_error


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 success, 2 user error)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `qlora-kit ls | head -3`: the reader left; stop quietly
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH_HELP:
        return _run_passthrough(argv[0], argv[1:])
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        names = list(commands)
        close = difflib.get_close_matches(argv[0], names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        sys.stderr.write(f"qlora-kit: error: unknown command {argv[0]!r}; {hint}commands: {', '.join(names)}\n")
        return EXIT_USER_ERROR
    try:
        if argv and argv[0] in commands:  # the command's own parser, intermixed: options and overrides in any order
            args = commands[argv[0]].parse_intermixed_args(argv[1:])
            args.command = argv[0]
        else:
            args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already reported in one line)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except RecipeError as e:
        message = " ".join(str(e).split())  # always one line
        sys.stderr.write(f"qlora-kit: error: {message}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("qlora-kit: interrupted\n")
        return 130
    except OSError as e:  # the machine refused a path the user chose (too long, no permission, disk full, ...)
        message = user_os_error(e)
        if message is None:
            raise  # anything else is a bug: keep its traceback (exit 1)
        sys.stderr.write(f"qlora-kit: error: {message}\n")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
