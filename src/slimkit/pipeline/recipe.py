"""The recipe: a target and an ordered list of stages, validated before any work starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model

from slimkit.core.config import SlimConfig, format_validation_error
from slimkit.core.errors import ConfigError
from slimkit.core.stages import STAGES


class SpeedupTarget(SlimConfig):
    """A latency target: final must be ``value`` times faster than baseline."""

    value: float = Field(..., gt=0, description="Required speedup (baseline / final latency).")
    runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="Runtime the speedup is judged in.")
    batch: int = Field(32, ge=1, description="Batch size the speedup is judged at.")


class Target(SlimConfig):
    """What the user asks for; every criterion left out is not judged."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, description="Largest allowed top-1 drop, in absolute percentage points.")
    min_size_ratio: float | None = Field(
        None, gt=0, description="Baseline / final artifact size on disk, at least this.")
    min_speedup: SpeedupTarget | None = Field(None, description="Latency target.")


class MeasureOptions(SlimConfig):
    """How the final comparison is measured (recorded in the report)."""

    threads: int = Field(1, ge=1, description="Intra-op threads for both runtimes.")
    batch_sizes: list[int] = Field([1, 32], min_length=1, description="Batch sizes timed.")
    warmup: int = Field(3, ge=0, description="Untimed runs before timing.")
    repeats: int = Field(20, ge=1, description="Timed runs per model and batch size.")
    parity_atol: float = Field(1e-4, gt=0, description="Max |ONNX Runtime - PyTorch| allowed.")


def recipe_model() -> type[SlimConfig]:
    """The Recipe pydantic class for the stage kinds registered now."""
    configs = tuple(STAGES.get(name).config for name in STAGES.names())
    stage_type = Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007
    return create_model(
        "Recipe",
        __base__=SlimConfig,
        __doc__="A compression recipe: target, stages in order, measurement options.",
        version=(Literal[1], Field(1, description="Recipe schema version.")),
        name=(str, Field("recipe", description="A name for reports.")),
        seed=(int, Field(0, description="Seed for every stage and for data splits.")),
        target=(Target, Field(default_factory=Target, description="What must be achieved.")),
        stages=(list[stage_type], Field(..., description="Stages applied in order.")),
        measure=(MeasureOptions, Field(default_factory=MeasureOptions,
                                       description="Measurement options.")),
    )


def parse_recipe(data: Any, source: str = "recipe") -> Any:
    """Validate a recipe given as a dict.

    Raises:
        ConfigError: naming every bad key path and the closest valid name.
    """
    model = recipe_model()
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {source}: expected a mapping with 'stages', "
                          f"got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise format_validation_error(err, source, model) from None


def load_recipe(source: str | Path | dict) -> Any:
    """Load a recipe from a YAML/JSON file, YAML/JSON text (multi-line or ``{...}``), or a dict."""
    if isinstance(source, dict):
        return parse_recipe(source)
    if isinstance(source, str) and ("\n" in source or source.lstrip()[:1] in ("{", "[")):
        text, name = source, "recipe"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"recipe file '{path}' does not exist")
        text, name = path.read_text(), f"recipe '{path}'"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name} is not valid YAML/JSON: {exc}") from None
    return parse_recipe(data, name)


def recipe_schema() -> dict:
    """The recipe's JSON Schema (published as ``slimkit schema``)."""
    return recipe_model().model_json_schema()


def recipe_to_dict(recipe: Any) -> dict:
    return json.loads(recipe.model_dump_json())
