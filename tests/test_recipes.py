"""Recipes: every bundled YAML parses against the schema; overrides, type checks and errors; data sources;
the size estimator used by --dry-run agrees with what quantize() really produces."""

import dataclasses
import importlib.resources
import json
import zlib

import pytest
import torch
import yaml

from qlora_kit.recipe import (
    KEY_ALIASES,
    Recipe,
    RecipeError,
    bundled_recipes,
    load_recipe,
    lora_section,
    recipe_from_dict,
    suggest_key,
    to_dict,
    to_yaml,
    valid_keys,
)

BUNDLED = ["quickstart", "llama_qlora", "gpt2_lora", "unet_lora", "dcgan_qlora"]


# ----- bundled recipes -------------------------------------------------------------------------------------
def test_bundled_recipes_are_listed_with_descriptions():
    recipes = bundled_recipes()
    assert set(BUNDLED) <= set(recipes)
    assert all(recipes[name].strip() for name in BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_recipe_parses_and_starts_with_its_command(name):
    text = (importlib.resources.files("qlora_kit.recipes") / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == f"# qlora-kit finetune {name}"
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    # every recipe accepts the common overrides, type-checked
    r = load_recipe(name, ["output_dir=/tmp/x", "seed=3", "max_steps=7", "learning_rate=1e-4"])
    assert (r.output_dir, r.seed, r.max_steps, r.learning_rate) == ("/tmp/x", 3, 7, 1e-4)
    # the resolved config is itself a valid recipe that resolves to the same thing
    again = recipe_from_dict(yaml.safe_load(to_yaml(r)))
    assert again == r


def test_llama_recipe_has_the_qlora_paper_settings():
    r = load_recipe("llama_qlora")
    assert "/" in r.model and "llama" in r.model.lower()
    assert (r.quantization, r.double_quant, r.compute_dtype) == ("nf4", True, "bfloat16")
    assert r.lora.target_modules == "all-linear" and 16 <= r.lora.r <= 64
    assert r.learning_rate == 2e-4 and r.max_grad_norm == 0.3 and r.gradient_checkpointing
    assert r.optimizer in ("adamw", "paged_adamw_32bit", "paged_adamw_8bit")


# ----- overrides and type checks ---------------------------------------------------------------------------
def test_overrides_are_typed_and_dotted_keys_reach_the_section():
    r = load_recipe(
        "quickstart", ["lora.r=4", "lora.alpha=8", "resume=true", "max_grad_norm=null", "lr_schedule=linear"]
    )
    assert (r.lora.r, r.lora.alpha, r.resume, r.max_grad_norm, r.lr_schedule) == (4, 8.0, True, None, "linear")
    r = load_recipe("quickstart", ["lora.target_modules=[q_proj, v_proj]"])
    assert r.lora.target_modules == ("q_proj", "v_proj")
    r = load_recipe("quickstart", ["learning_rate=3"])  # an int where a float is expected is fine
    assert r.learning_rate == 3.0 and isinstance(r.learning_rate, float)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["learning_rat=1e-3"], ["learning_rat", "learning_rate"]),
        (["lora.rr=2"], ["lora.rr", "lora.r"]),
        (["lora=3"], ["section", "lora.r"]),
        (["max_steps=abc"], ["max_steps", "integer"]),
        (["max_steps=2.5"], ["max_steps", "integer"]),
        (["resume=yesplease"], ["resume", "true or false"]),
        (["lora.r=0"], ["lora.r", "> 0"]),
        (["lora.r=-3"], ["lora.r", "> 0"]),
        (["lora.dropout=1.5"], ["lora.dropout"]),
        (["quantization=nf5"], ["quantization", "nf4"]),
        (["blocksize=48"], ["blocksize", "64"]),
        (["objective=gan"], ["dcgan"]),
        (["dataset=digits"], ["dataset", "text"]),
        (["max_steps"], ["key=value"]),
        (["stop_after_steps=400", "max_steps=10"], ["stop_after_steps"]),
        (["eval_fraction=0"], ["eval_fraction"]),
        (["learning_rate=inf"], ["learning_rate", "finite"]),
        (["learning_rate=-inf"], ["learning_rate", "finite"]),
        (["weight_decay=nan"], ["weight_decay", "finite"]),
        (["max_grad_norm=.nan"], ["max_grad_norm", "finite"]),
        (["lora.alpha=inf"], ["lora.alpha", "finite"]),
        (["lora.dropout=nan"], ["lora.dropout", "finite"]),
        (["adam_beta2=nan"], ["adam_beta2", "finite"]),
        (["epochs=.inf"], ["epochs", "integer"]),
        (["prompt_template={instruction"], ["prompt_template", "{{ and }}"]),
        (["prompt_template=a {} b"], ["prompt_template", "column name"]),
        (["prompt_template={0}"], ["prompt_template", "column name"]),
        (["prompt_template={x!z}"], ["prompt_template", "!z"]),
        (["prompt_template=}{x}"], ["prompt_template", "{{ and }}"]),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(overrides, words):
    with pytest.raises(RecipeError) as e:
        load_recipe("quickstart", overrides)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


@pytest.mark.parametrize(
    "key, want",
    [
        ("lr", "learning_rate"),
        ("rank", "lora.r"),
        ("lora_r", "lora.r"),
        ("r", "lora.r"),  # a section key written flat
        ("alpha", "lora.alpha"),
        ("lora.rank", "lora.r"),
        ("lora.lora_alpha", "lora.alpha"),
        ("lora.seed", "seed"),  # a top-level key written under the section
        ("grad_clip", "max_grad_norm"),
        ("num_train_epochs", "epochs"),
        ("per_device_train_batch_size", "batch_size"),
        ("gradient_accumulation_steps", "grad_accum_steps"),
        ("warmup", "warmup_steps"),
        ("learning_rat", "learning_rate"),
        ("lora.dropot", "lora.dropout"),
    ],
)
def test_unknown_keys_suggest_a_valid_key(key, want):
    assert suggest_key(key) == want
    with pytest.raises(RecipeError) as e:
        load_recipe("quickstart", [f"{key}=1"])
    assert f"unknown key {key!r}" in str(e.value) and f"did you mean {want!r}?" in str(e.value)


def test_suggestions_are_always_valid_keys():
    keys = set(valid_keys())
    assert set(KEY_ALIASES.values()) <= keys
    assert not set(KEY_ALIASES) & keys  # an alias never shadows a real key
    for key in ["lora", "lr", "rank", "lra", "ranks", "lor", "xyz", "lora.lora", "lora.x", "l", "init", *KEY_ALIASES]:
        assert suggest_key(key) in keys | {None}, key


def test_non_finite_numbers_are_rejected_from_yaml_and_python(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: .inf\n")
    with pytest.raises(RecipeError, match="learning_rate must be a finite number"):
        load_recipe(str(path))
    with pytest.raises(RecipeError, match="weight_decay must be a finite number"):
        Recipe(weight_decay=float("nan"))
    with pytest.raises(RecipeError, match="d_learning_rate must be a finite number"):
        Recipe(d_learning_rate=float("inf"))
    with pytest.raises(RecipeError, match="lora.alpha must be a finite number"):
        lora_section(alpha=float("inf"))


def test_the_lora_section_is_a_lora_config_with_the_recipe_defaults():
    import qlora_kit
    from qlora_kit.recipe import LORA_DEFAULTS

    r = load_recipe("quickstart", ["lora.r=4", "lora.target_modules=[q_proj, v_proj]"])
    assert type(r.lora) is qlora_kit.LoraConfig
    assert r.lora.target_modules == ("q_proj", "v_proj") and r.lora.r == 4
    default = Recipe().lora
    assert (default.alpha, default.dropout) == (LORA_DEFAULTS["alpha"], LORA_DEFAULTS["dropout"]) == (32.0, 0.05)
    assert lora_section(r=8) == qlora_kit.LoraConfig(r=8, alpha=32.0, dropout=0.05)
    with pytest.raises(RecipeError, match="invalid lora section.*regular expression"):
        lora_section(target_modules="(unclosed")


def test_every_objective_is_a_registered_class_with_its_built_in_models():
    from qlora_kit.recipe import BUILTIN_DATASETS, BUILTIN_MODELS, objectives
    from qlora_kit.train.objectives import OBJECTIVES, make_objective

    assert set(objectives()) == set(OBJECTIVES) == set(BUILTIN_MODELS.values())
    for name, cls in OBJECTIVES.items():
        assert cls.name == name and cls.unit in ("tokens", "images")
        assert cls.data_kind in BUILTIN_DATASETS.values()
    assert [n for n, c in OBJECTIVES.items() if c.language_model] == ["causal_lm"]
    assert make_objective(load_recipe("dcgan_qlora")).makes_samples


def test_recipe_files_that_are_not_utf8_are_user_errors(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(str(path))


def test_unknown_recipe_suggests_the_closest_name(tmp_path):
    with pytest.raises(RecipeError, match="quickstart"):
        load_recipe("quikstart")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "text, words",
    [
        ("model: [unclosed\n", ["not valid YAML", "line"]),
        ("seed: 1\nseed: 2\n", ["duplicate key"]),
        ("- a\n- b\n", ["mapping"]),
        ("lora:\n  rank: 8\n", ["lora.rank", "lora.r"]),
        ("lora: 5\n", ["lora", "mapping"]),
        ("seq_len: '128'\n", ["seq_len", "integer"]),
        ("model: !!python/object/apply:os.system ['echo pwned']\n", ["not valid YAML"]),
    ],
)
def test_bad_recipe_files(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    for w in words:
        assert w in str(e.value)


def test_yaml_floats_without_a_dot_are_read_as_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: 2e-4\nweight_decay: 1e-2\n")  # YAML 1.1 reads these as strings
    r = load_recipe(str(path))
    assert r.learning_rate == 2e-4 and r.weight_decay == 1e-2


def test_valid_keys_cover_every_field():
    keys = valid_keys()
    for f in dataclasses.fields(Recipe):
        if f.name != "lora":
            assert f.name in keys
    assert "lora.r" in keys and "lora.target_modules" in keys
    assert set(to_dict(Recipe())) == {f.name for f in dataclasses.fields(Recipe)}


# ----- data ------------------------------------------------------------------------------------------------
def test_stdlib_corpus_holds_out_whole_files():
    from qlora_kit.data import stdlib_files

    root, train, held = stdlib_files()
    assert len(train) > 100 and len(held) > 10
    assert not set(train) & set(held)
    assert all(zlib.crc32(p.encode()) % 10 == 0 for p in held)
    _, train20, held20 = stdlib_files(20)
    assert train20 == train[:20] and len(held20) == 2 and set(held20) <= set(held)


def test_byte_tokenizer_round_trip_and_packing():
    from qlora_kit.data import ByteTokenizer, _pack

    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # é"
    assert tok.decode(tok.encode(text)) == text
    ds = _pack([text, "abc" * 20], tok, seq_len=16)
    blocks = torch.as_tensor(ds["input_ids"])
    n_tokens = len(text.encode()) + 1 + 60 + 1
    assert blocks.shape == (n_tokens // 16, 16)
    flat = blocks.flatten().tolist()
    assert flat[: len(text.encode())] == list(text.encode()) and flat[len(text.encode())] == 0  # EOS separates


def test_digits_are_scaled_to_minus_one_one_and_every_tenth_is_held_out():
    from qlora_kit.data import load_data

    data = load_data(load_recipe("unet_lora"))
    x = data.train.get(list(range(len(data.train))))
    assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert len(data.train) + len(data.eval) == 1797 and len(data.eval) == 180


def test_local_jsonl_with_text_column_and_prompt_template(tmp_path):
    from qlora_kit.data import ByteTokenizer, load_data, load_text_data

    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"say {i}", "output": "x" * (i + 40), "text": f"row {i} " * 10} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    base = ["dataset=" + str(path), "seq_len=32", f"output_dir={tmp_path / 'o'}"]
    data = load_data(load_recipe("quickstart", base), ByteTokenizer())
    assert data.kind == "text" and len(data.train) > 0 and data.eval is not None
    assert data.train.get([0]).shape == (1, 32)
    r = load_recipe("quickstart", [*base, "prompt_template=Q: {instruction}\nA: {output}"])
    templ = load_text_data(r, ByteTokenizer())
    assert bytes(templ.train.get([0])[0].tolist()).startswith(b"Q: say ")
    assert b"\nA: xxxx" in bytes(templ.train.get([0])[0].tolist())
    with pytest.raises(RecipeError, match="no column 'body'"):
        load_data(load_recipe("quickstart", [*base, "text_column=body"]), None)
    with pytest.raises(RecipeError, match="missing_field"):
        load_data(load_recipe("quickstart", [*base, "prompt_template={missing_field}"]), None)
    with pytest.raises(RecipeError, match="does not fit the rows"):  # parses, but 'say 0' is no integer
        load_data(load_recipe("quickstart", [*base, "prompt_template={instruction:d}"]), None)


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', ["bad.jsonl", "JSON lines", "one JSON object per line"]),
        ("bad.json", b"[{", ["bad.json", "JSON"]),
        ("empty.jsonl", b"", ["empty.jsonl", "holds no examples"]),
        ("empty.txt", b"", ["empty.txt", "holds no examples"]),
        ("blank.txt", b"\n \n", ["blank.txt", "holds no examples"]),
        ("latin1.txt", "caf\u00e9\n".encode("latin-1"), ["latin1.txt", "utf-8"]),
        ("bad.csv", b'text,n\n"unclosed,1\n', ["bad.csv", "CSV"]),
        ("bad.parquet", b"not parquet", ["bad.parquet", "Parquet"]),
    ],
)
def test_unreadable_local_data_files_are_user_errors(tmp_path, name, data, words):
    from qlora_kit.data import ByteTokenizer, load_data

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(RecipeError) as e:
        load_data(load_recipe("quickstart", [f"dataset={path}", "seq_len=8"]), ByteTokenizer())
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_missing_local_dataset_is_a_user_error(tmp_path):
    from qlora_kit.data import check_data_paths

    with pytest.raises(RecipeError, match="does not exist"):
        check_data_paths(load_recipe("quickstart", [f"dataset={tmp_path / 'nope.jsonl'}"]))
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(RecipeError, match="extension"):
        check_data_paths(load_recipe("quickstart", [f"dataset={tmp_path / 'x.bin'}"]))


# ----- the --dry-run size estimate matches quantize() --------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["double_quant=false"],
        ["quantization=fp4", "blocksize=128"],
        ["quantization=int8"],
        ["quantization=int4", "group_size=32"],
        ["quantization=fp8"],
    ],
)
def test_size_estimate_equals_the_quantized_model(overrides):
    from qlora_kit import memory_footprint, quantize
    from qlora_kit.formats.base import get_format
    from qlora_kit.models import tiny_llama
    from qlora_kit.train.build import compute_dtype, estimate_quantized_bytes, quant_config

    recipe = load_recipe("quickstart", overrides)
    try:
        get_format(recipe.quantization)
    except ValueError:
        pytest.skip(f"format {recipe.quantization} not in this tree yet")
    model = tiny_llama()
    qbytes, fbytes, layers = estimate_quantized_bytes(model, recipe)
    quantize(model, quant_config(recipe, compute_dtype(recipe)))
    real = memory_footprint(model)
    assert qbytes == real[recipe.quantization]
    assert fbytes == real["float"]
    assert layers == 14


def test_size_estimate_on_image_models():
    from qlora_kit import memory_footprint, quantize
    from qlora_kit.train.build import compute_dtype, estimate_quantized_bytes, load_base, quant_config

    recipe = load_recipe("dcgan_qlora")
    for model in load_base(recipe).values():
        qbytes, fbytes, layers = estimate_quantized_bytes(model, recipe)
        quantize(model, quant_config(recipe, compute_dtype(recipe)))
        real = memory_footprint(model)
        assert (qbytes, fbytes) == (real["nf4"], real["float"]) and layers >= 1


def test_image_folder_is_resized_and_scaled(tmp_path):
    import numpy as np
    from PIL import Image

    from qlora_kit.data import load_data

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    r = load_recipe("unet_lora", [f"dataset={folder}", "image_channels=3", "eval_fraction=0.25"])
    data = load_data(r)
    x = data.train.get([0, 1])
    assert x.shape == (2, 3, 8, 8) and -1 <= x.min() and x.max() <= 1
    assert len(data.train) == 15 and len(data.eval) == 5
    with pytest.raises(RecipeError, match="image folder"):
        load_data(load_recipe("unet_lora", [f"dataset={folder / '0.png'}"]))
