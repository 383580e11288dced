"""The one exception recipes raise (re-exported as ``qlora_kit.recipe.RecipeError``)."""

from __future__ import annotations


class RecipeError(ValueError):
    """A user mistake in a recipe, an override or the files it names (reported in one line, exit code 2)."""
