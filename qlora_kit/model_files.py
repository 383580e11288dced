"""Which weight files a local model directory may hold: safetensors only (a pickle can run code on load)."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_no_pickle_only(directory: str | Path, name: str) -> None:
    """RecipeError when ``directory`` (or its ``unet/`` subfolder) holds pickle weights and no safetensors.

    qlora-kit never unpickles a user's file: ``pytorch_model.bin`` and friends are refused in one sentence
    that says how to convert them, instead of failing (or running code) deep inside the loader.
    """
    from .recipe import RecipeError

    root = Path(directory).expanduser()
    for folder in (root, root / "unet"):
        if not folder.is_dir():
            continue
        files = [p.name for p in folder.iterdir() if p.is_file()]
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise RecipeError(
                f"model directory {name!r} holds only pickle weights ({', '.join(pickles[:3])}), which qlora-kit "
                "never loads because unpickling can run code; convert them to safetensors where you trust the "
                "file (load the model and call save_pretrained(dir, safe_serialization=True)) and pass that directory"
            )
