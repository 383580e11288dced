"""Building what a recipe trains: the model(s), quantized and with LoRA adapters, plus size figures.

Models come from a built-in tiny config (``tiny-llama``, ``tiny-gpt2``, ``tiny-unet``, ``dcgan``), a
local directory or a hub id. The base is quantized with ``qlora_kit.quantize`` (none / nf4 / fp4 / int8 /
int4 / fp8), then adapters are attached with ``qlora_kit.add_lora``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..recipe import BUILTIN_MODELS, Recipe, RecipeError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Built:
    """The trainable model(s) of a recipe and the figures the banner reports."""

    models: dict[str, nn.Module]  # "model", or "generator" and "discriminator" for GANs
    description: str
    n_params: int  # parameters of the base model(s), quantized weights counted by their logical size
    n_trainable: int
    lora_layers: int
    quantized_layers: int
    bytes_float: int  # weights + buffers before quantization
    bytes_now: int  # the base after quantization (adapters not included)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)  # the base's weights by format (adapters apart)
    bytes_trainable: int = 0  # adapters (and fully trained modules)


def compute_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.compute_dtype != "auto":
        return _DTYPES[recipe.compute_dtype]
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def is_local_model(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


def check_model_path(recipe: Recipe) -> None:
    """A local model directory named by the recipe must exist (checked before anything is written)."""
    if recipe.model in BUILTIN_MODELS or not is_local_model(recipe.model):
        return
    path = Path(recipe.model).expanduser()
    if not path.is_dir():
        raise RecipeError(
            f"model directory {recipe.model!r} does not exist; fix the path, use a hub id or a built-in "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    from ..model_files import check_no_pickle_only

    check_no_pickle_only(path, recipe.model)


def quant_config(recipe: Recipe, dtype: torch.dtype):
    """The qlora_kit quantization config of a recipe (None for quantization: none)."""
    if recipe.quantization == "none":
        return None
    from ..registry import get_format

    fmt = get_format(recipe.quantization)
    if not fmt.available():
        raise RecipeError(f"quantization={recipe.quantization} is not available in this installation; use nf4 or fp4")
    options = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant, group_size=recipe.group_size)
    return fmt.config_from_options(compute_dtype=dtype, **options)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def quantizes_on_load(recipe: Recipe, qconfig) -> bool:
    """Whether the recipe's hub / local model is quantized while its weights are read (``qlora_kit.hf``), so the
    float model is never whole in memory: objectives that load through transformers, except LoftQ (which
    initialises the adapters from the float weights)."""
    from .objectives import objective_class

    return (
        qconfig is not None
        and recipe.model not in BUILTIN_MODELS
        and objective_class(recipe.objective).quantizes_on_load
        and recipe.lora.init != "loftq"
    )


def load_base(
    recipe: Recipe, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32, meta=False, qconfig=None
):
    """The base model(s) the recipe's objective builds: {"model": ...} or {"generator": ..., "discriminator": ...}.

    ``meta=True`` builds hub / local models without weights (for ``--dry-run``; needs only config.json).
    ``qconfig`` (when :func:`quantizes_on_load`): the hub / local model comes back quantized, layer by layer as
    it was read; otherwise the models are float and ``quantize`` runs on them later.
    """
    from .objectives import objective_class

    objective = objective_class(recipe.objective)
    if recipe.model in BUILTIN_MODELS:
        return objective.builtin(recipe, vocab_size)
    check_model_path(recipe)
    source = os.path.expanduser(recipe.model)
    try:
        if qconfig is not None and not meta and quantizes_on_load(recipe, qconfig):
            return objective.pretrained(recipe, source, dtype, meta, qconfig=qconfig)
        return objective.pretrained(recipe, source, dtype, meta)
    except RecipeError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(
            f"could not load model {recipe.model!r} ({_first_line(e)}); check the name or path, the network, or use a "
            "built-in"
        ) from None


def vocab_for_builtin(recipe: Recipe, tokenizer) -> int | None:
    """The vocabulary a built-in tiny LM needs for a non-byte tokenizer (None: keep the default 256)."""
    from ..data import ByteTokenizer

    if tokenizer is None or isinstance(tokenizer, ByteTokenizer) or recipe.model not in BUILTIN_MODELS:
        return None
    return len(tokenizer)


def _lora_capable(model: nn.Module, include_convs: bool) -> list[str]:
    """Paths of every Linear / Conv1D (and, when asked, conv / transposed conv) layer except output heads."""
    from ..api import output_head
    from ..nn.lora_layers import lora_kind

    head = output_head(model)
    heads = set() if head is None else {id(head)}
    kinds = ("linear", "conv", "conv_transpose") if include_convs else ("linear",)
    out = []
    for name, module in model.named_modules():
        if name and lora_kind(module) in kinds and id(module) not in heads and name.split(".")[-1] != "lm_head":
            if any(name.startswith(p + ".") for p in out):
                continue
            out.append(name)
    return out


def lora_config(recipe: Recipe, model: nn.Module):
    """The recipe's LoraConfig for one model (``target_modules: all`` resolved to that model's layer paths)."""
    if recipe.lora.target_modules != "all":
        return recipe.lora
    target = tuple(_lora_capable(model, include_convs=True))
    if not target:
        raise RecipeError(f"lora.target_modules=all found no adaptable layer in {type(model).__name__}")
    try:
        return dataclasses.replace(recipe.lora, target_modules=target)
    except ValueError as e:
        raise RecipeError(f"invalid lora section: {e}") from None


def attach_lora(model: nn.Module, config, recipe: Recipe) -> None:
    """``add_lora(model, config)`` with its ValueErrors (no layer matched, ...) reported as one RecipeError."""
    from ..lora import add_lora

    try:
        add_lora(model, config)
    except ValueError as e:
        if "matched no layer" not in str(e):
            raise RecipeError(f"cannot add LoRA adapters: {_first_line(e)}; fix the lora section") from None
        target = recipe.lora.target_modules
        shown = target if isinstance(target, str) else "[" + ", ".join(target) + "]"
        names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in _lora_capable(model, include_convs=True)))
        layers = f"its layers are named {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}; " if names else ""
        raise RecipeError(
            f"lora.target_modules={shown} matched no layer of {type(model).__name__}; {layers}"
            "set lora.target_modules to some of those names, all-linear or all"
        ) from None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters with quantized weights at their logical size and adapters excluded, trainable)."""
    from ..nn.lora_layers import LoraLayer
    from ..nn.quantized import QuantizedLayer

    adapter_ids = set()
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name, p in m.named_parameters():
                if not name.startswith("base_layer."):
                    adapter_ids.add(id(p))
    total = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            total += math.prod(m.qweight.shape)
            seen.update(id(p) for p in m.qweight.parameters())  # packed codes: counted at their logical size
    for p in model.parameters():
        if id(p) in seen or id(p) in adapter_ids:
            continue
        seen.add(id(p))
        total += p.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def estimate_quantized_bytes(model: nn.Module, recipe: Recipe) -> tuple[int, int, int]:
    """(bytes of the quantized weights, bytes of everything kept in float, number of quantized layers),
    computed from shapes only (works on a weightless ``meta`` model), with ``quantize``'s default filter."""
    from ..api import default_filter, weight_tensors
    from ..nn.quantized import quantized_class_for

    all_bytes = sum(t.numel() * t.element_size() for t in weight_tensors(model))
    if recipe.quantization == "none":
        return 0, all_bytes, 0
    from ..nn.geometry import shape_2d
    from ..registry import get_format, weight_config

    fmt = get_format(recipe.quantization)
    options = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant, group_size=recipe.group_size)
    config = weight_config(recipe.quantization, **options)
    keep = default_filter(model)
    qbytes = removed = layers = 0
    done: list[str] = []
    for fqn, module in model.named_modules():
        if not fqn or quantized_class_for(module) is None or not keep(module, fqn):
            continue
        if any(fqn.startswith(d + ".") for d in done):
            continue
        done.append(fqn)
        w = module.weight
        qbytes += fmt.nbytes_for(shape_2d(module, w.shape), config)
        removed += w.numel() * w.element_size()
        layers += 1
    return qbytes, all_bytes - removed, layers


def float_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights in float: quantized layers counted at their logical shape in their compute
    dtype (what they took before quantization, or would have without quantizing while loading)."""
    from ..api import memory_footprint
    from ..nn.quantized import QuantizedLayer

    kinds = memory_footprint(model)
    out = kinds.get("float", 0)
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            out += math.prod(module.qweight.shape) * module.out_dtype.itemsize
    return out


def _adapt(model: nn.Module, recipe: Recipe, qconfig, device, seed: int) -> None:
    """Quantize the base, prepare it for k-bit training and attach the adapters (in place)."""
    from ..api import default_filter, quantize
    from ..lora import prepare_for_kbit_training, set_adapter

    lcfg = lora_config(recipe, model)  # before quantizing: "all" resolves on float layer types
    loftq = recipe.lora.init == "loftq"

    def attach():
        torch.manual_seed(seed)  # adapters start from the recipe's seed, whatever loading did to the RNG
        attach_lora(model, lcfg, recipe)

    filter_fn = None
    if loftq:  # LoftQ initialises from the float weights and leaves the base NF4-exact: adapters first
        keep = default_filter(model)
        chosen = {fqn for fqn, m in model.named_modules() if fqn and keep(m, fqn)}
        attach()

        def filter_fn(module, fqn):
            return fqn.removesuffix(".base_layer") in chosen

    if qconfig is not None:
        try:
            quantize(model, qconfig, device=device, filter_fn=filter_fn)
        except ValueError as e:
            raise RecipeError(f"cannot quantize {recipe.model!r}: {_first_line(e)}") from None
    elif device is not None:
        model.to(device)
    if hasattr(model, "config") and hasattr(model, "gradient_checkpointing_enable"):
        prepare_for_kbit_training(model, gradient_checkpointing=recipe.gradient_checkpointing)
    elif recipe.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()  # diffusers models: non-reentrant torch checkpointing
    elif recipe.gradient_checkpointing:
        raise RecipeError(f"{type(model).__name__} does not support gradient checkpointing; turn it off")
    if loftq:
        set_adapter(model, "default")  # prepare_for_kbit_training froze everything: make the adapter train
    else:
        attach()
    model.to(device or "cpu")  # adapters are created on the base's device; make sure all agree


def build(recipe: Recipe, *, device: torch.device | None = None, vocab_size: int | None = None) -> Built:
    """Load the base(s), quantize, attach adapters and prepare for k-bit training."""
    from ..api import memory_footprint

    dtype = compute_dtype(recipe)
    qconfig = quant_config(recipe, dtype)
    bases = load_base(recipe, vocab_size=vocab_size, dtype=dtype, qconfig=qconfig)
    if quantizes_on_load(recipe, qconfig):
        qconfig = None  # quantized while loading: only the adapters are left to add
    from .objectives import objective_class

    if recipe.gradient_checkpointing and not objective_class(recipe.objective).supports_gradient_checkpointing:
        raise RecipeError(
            f"gradient_checkpointing is not supported for objective={recipe.objective}; "
            "set gradient_checkpointing=false"
        )
    n_params = n_trainable = lora_layers = qlayers = bytes_float = bytes_trainable = 0
    kinds: dict[str, int] = {}
    for index, (role, model) in enumerate(bases.items()):
        bytes_float += float_bytes(model)
        train_fully = role == "discriminator" and recipe.discriminator == "full"
        if train_fully:
            model.to(device or "cpu")
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            _adapt(model, recipe, qconfig, device, seed=recipe.seed + index)
        total, trainable = count_params(model)
        n_params += total
        n_trainable += trainable
        from ..nn.lora_layers import LoraLayer
        from ..nn.quantized import QuantizedLayer

        lora_layers += sum(isinstance(m, LoraLayer) for m in model.modules())
        qlayers += sum(isinstance(m, QuantizedLayer) for m in model.modules())
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        bytes_trainable += trained
        for k, v in memory_footprint(model).items():
            kinds[k] = kinds.get(k, 0) + v - (trained if k == "float" else 0)
    desc_parts = (
        [f"{role} {type(m).__name__}" for role, m in bases.items()]
        if len(bases) > 1
        else [type(bases["model"]).__name__]
    )
    return Built(
        models=bases,
        description=f"{recipe.model} ({', '.join(desc_parts)})",
        n_params=n_params,
        n_trainable=n_trainable,
        lora_layers=lora_layers,
        quantized_layers=qlayers,
        bytes_float=bytes_float,
        bytes_now=sum(kinds.values()),
        bytes_by_kind={k: v for k, v in kinds.items() if v},
        bytes_trainable=bytes_trainable,
    )
