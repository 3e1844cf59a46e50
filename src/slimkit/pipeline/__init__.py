"""Recipes, the stage registry, the runner and the verdict: composition only.

Names are imported on first use (see :mod:`slimkit.core.lazy`): recipes are read and checked
without torch; the runner loads it.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.core.stages": ("STAGES", "StageContext", "StageSpec", "register_stage"),
    "slimkit.pipeline.recipe": ("check_data", "load_recipe", "parse_recipe", "recipe_model",
                                "recipe_schema"),
    "slimkit.pipeline.runner": ("compress",),
    "slimkit.pipeline.verdict": ("judge",),
})
