"""Bundled YAML recipes for `qlora-kit finetune` (installed as qlora_kit.recipes)."""
