"""One readable recipe per method, built from the shared pieces in ``workers``, and their registry.

A recipe is a class taking a :class:`~workers.context.JobContext` with ``setup / train / cleanup``
(checkpoints go through ``workers.loop``). Optionally it declares

- ``model_references(hp) -> {field: (name, param, required method type)}``: models its spec names
  (a PPO job's ``reward_model``, a judge) that the runner resolves into ``ctx.references`` before
  ``setup``, so that a recipe never reads the database;
- ``resumes = False``: it checkpoints nothing, so a re-run starts over (the runner clears the
  aborted attempt's metric points first).

Recipes are imported lazily, by name, so a worker loads only the recipe it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from workers.context import JobContext, TrainResult

#: method type -> "module:Class"
RECIPES: dict[str, str] = {
    "dpo": "workers.recipes.dpo:DPORecipe",
    "supervised": "workers.recipes.sft:SFTRecipe",
    "reward_model": "workers.recipes.reward_model:RewardModelRecipe",
    "ppo": "workers.recipes.rl.ppo:PPORecipe",
    "reinforcement": "workers.recipes.rl.reinforcement:ReinforcementRecipe",
    "generate_preferences": "workers.recipes.generate_preferences:GeneratePreferencesRecipe",
}


class Recipe(Protocol):
    def setup(self) -> None: ...
    def train(self) -> TrainResult: ...
    def cleanup(self) -> None: ...


def recipe_class(method_type: str) -> Any | None:
    """The recipe class for ``method_type``, or None when this worker has none."""
    target = RECIPES.get(method_type)
    if target is None:
        return None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def model_references(recipe: Any, hp: Any) -> dict[str, tuple[str | None, str, str]]:
    declared = getattr(recipe, "model_references", None)
    return dict(declared(hp)) if declared is not None else {}


def resumes(recipe: Any) -> bool:
    return bool(getattr(recipe, "resumes", True))


def build(recipe: Any, ctx: JobContext) -> Recipe:
    built: Recipe = recipe(ctx)
    return built
