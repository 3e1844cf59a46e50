"""Recipes, the stage registry, the runner and the verdict: composition only."""

from slimkit.core.stages import STAGES, StageContext, StageSpec, register_stage
from slimkit.pipeline.recipe import load_recipe, parse_recipe, recipe_model, recipe_schema
from slimkit.pipeline.runner import compress
from slimkit.pipeline.verdict import judge

__all__ = [
    "STAGES",
    "StageContext",
    "StageSpec",
    "compress",
    "judge",
    "load_recipe",
    "parse_recipe",
    "recipe_model",
    "recipe_schema",
    "register_stage",
]
