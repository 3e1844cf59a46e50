"""The recipe: a target and an ordered list of stages, validated before any work starts.

Nothing here imports torch: the stage configs come from their torch-free modules
(:data:`~slimkit.core.stages.STAGE_CONFIGS`), so a recipe is checked, and checked against the
data given, before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model

from slimkit.core.config import SlimConfig, format_validation_error
from slimkit.core.errors import ConfigError, MissingDataError
from slimkit.core.stages import STAGE_CONFIGS, data_needed
from slimkit.search.config import SearchConfig

MAX_DEPTH = 64  # levels of nesting a recipe may use
MAX_NODES = 100_000  # YAML values (aliases expanded) a recipe may hold
MAX_RECIPE_BYTES = 16 << 20


MAX_BATCH = 1 << 16


class SpeedupTarget(SlimConfig):
    """A latency target: final must be ``value`` times faster than baseline."""

    value: float = Field(..., gt=0, description="Required speedup (baseline / final latency).")
    runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="Runtime the speedup is judged in.")
    batch: int = Field(32, ge=1, le=MAX_BATCH, description="Batch size the speedup is judged at.")


class Target(SlimConfig):
    """What the user asks for; every criterion left out is not judged."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, le=100, description="Largest allowed top-1 drop, in absolute percentage "
                                        "points (0..100).")
    max_metric_drop: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="Largest allowed loss per metric of the data's task, in the "
                          "metric's own units and direction: {perplexity: 0.5} allows 0.5 "
                          "more perplexity, {cosine: 0.005} 0.005 less cosine, {top1: 0.01} "
                          "one point of top-1.")
    min_size_ratio: float | None = Field(
        None, gt=0, description="Baseline / final artifact size on disk, at least this.")
    min_speedup: SpeedupTarget | None = Field(None, description="Latency target.")


class MeasureOptions(SlimConfig):
    """How the final comparison is measured (recorded in the report)."""

    threads: int = Field(1, ge=1, le=1024, description="Intra-op threads for both runtimes.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(
        [1, 32], min_length=1, description="Batch sizes timed.")
    warmup: int = Field(3, ge=0, le=1000, description="Untimed runs before timing.")
    repeats: int = Field(20, ge=1, le=10_000, description="Timed runs per model and batch size.")
    parity_atol: float = Field(
        1e-4, gt=0, le=1, description="Max |ONNX Runtime - PyTorch| allowed (at most 1: a "
                                      "larger tolerance would hide a broken export).")


def recipe_model() -> type[SlimConfig]:
    """The Recipe pydantic class for the stage kinds registered now."""
    configs = tuple(STAGE_CONFIGS.get(name) for name in STAGE_CONFIGS.names())
    stage_type = Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007
    return create_model(
        "Recipe",
        __base__=SlimConfig,
        __doc__="A compression recipe: target, stages in order, measurement options.",
        version=(Literal[1], Field(1, description="Recipe schema version.")),
        name=(str, Field("recipe", description="A name for reports.")),
        seed=(int, Field(0, ge=0, description="Seed for every stage and for data splits.")),
        target=(Target, Field(default_factory=Target, description="What must be achieved.")),
        stages=(list[stage_type], Field(..., min_length=1,
                                        description="Stages applied in order (at least one).")),
        measure=(MeasureOptions, Field(default_factory=MeasureOptions,
                                       description="Measurement options.")),
        search=(SearchConfig | None, Field(None, description="What `slimkit search` may change "
                                                             "(compress ignores it).")),
    )


def parse_recipe(data: Any, source: str = "recipe") -> Any:
    """Validate a recipe given as a dict.

    Raises:
        ConfigError: naming every bad key path and the closest valid name.
    """
    model = recipe_model()
    if data is None:
        raise ConfigError(f"invalid {source}: it is empty; a recipe needs at least 'stages'")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {source}: expected a mapping with 'stages', "
                          f"got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise format_validation_error(err, source, model) from None


def load_recipe(source: str | Path | dict) -> Any:
    """Load a recipe from a YAML/JSON file, YAML/JSON text (multi-line or ``{...}``), or a dict.

    Raises:
        ConfigError: on one line, naming the file and the key path: a missing or unreadable
            file, text that is not UTF-8, a YAML syntax error (with its line), a duplicate
            key, nesting deeper than :data:`MAX_DEPTH`, or any invalid value.
    """
    if isinstance(source, dict):
        return parse_recipe(source)
    if isinstance(source, str) and ("\n" in source or source.lstrip()[:1] in ("{", "[")):
        text, name = source, "recipe"
    else:
        text, name = _read_recipe(Path(source)), f"recipe '{source}'"
    return parse_recipe(_parse_yaml(text, name), name)


def check_data(recipe: Any, has_data: bool, source: str = "recipe") -> None:
    """Refuse a recipe with a stage that cannot run without data when none is given.

    Raises:
        MissingDataError: naming the first such stage and why it needs data.
    """
    if has_data:
        return
    for i, stage in enumerate(recipe.stages, 1):
        need = data_needed(stage)
        if need:
            raise MissingDataError(f"{source}: stage {i} {stage.kind}: {need}; give --data")


def _read_recipe(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"recipe file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' is not a regular file; give a YAML or JSON file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe '{path}' is {path.stat().st_size:,} bytes, more than a recipe "
                          f"needs (at most {MAX_RECIPE_BYTES:,}); is it the right file?")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start}); save it as UTF-8") from None


def _parse_yaml(text: str, name: str) -> Any:
    """Safe-load one YAML/JSON document, refusing duplicate keys and runaway nesting."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, name)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{name} is not valid YAML/JSON: it holds the control character "
                          f"#x{exc.character:04x} at offset {exc.position}; a recipe is plain text"
                          ) from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{name} is not valid YAML/JSON: {_yaml_problem(exc)}; fix the syntax "
                          "there") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name} is not valid YAML/JSON: {' '.join(str(exc).split())}"
                          ) from None
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply (a recipe needs at most {MAX_DEPTH} "
                          "levels)") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    text = f"{exc.problem or exc.context}{where}"
    if exc.problem and exc.context:
        started = exc.context_mark
        at = (f" started at line {started.line + 1}, column {started.column + 1}"
              if started and started.index != mark.index else "")
        text += f" ({exc.context}{at})"
    return text


def _check_nodes(root: yaml.Node, name: str) -> None:
    """Refuse duplicate mapping keys, nesting beyond MAX_DEPTH and alias bombs, by key path.

    Aliases are followed (not deduplicated), so a document whose aliases expand past
    MAX_NODES values, or refer to themselves, is refused before it is built.
    """
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    count = 0
    while stack:
        node, path = stack.pop()
        count += 1
        if len(path) > MAX_DEPTH:
            raise ConfigError(f"{name}: '{path[0]}' is nested more than {MAX_DEPTH} levels deep "
                              f"(line {node.start_mark.line + 1}); a recipe needs only a few")
        if count > MAX_NODES:
            raise ConfigError(f"{name} expands to more than {MAX_NODES:,} values (through YAML "
                              "aliases?); write the recipe out plainly")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, str(i))) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                label = key.value if isinstance(key, yaml.ScalarNode) else "?"
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        raise ConfigError(
                            f"{name}: duplicate key '{'.'.join((*path, label))}' at line "
                            f"{key.start_mark.line + 1} (first at line "
                            f"{seen[key.tag, key.value]}); keep one")
                    seen[key.tag, key.value] = key.start_mark.line + 1
                stack.append((value, (*path, label)))
def recipe_schema() -> dict:
    """The recipe's JSON Schema (published as ``slimkit schema``)."""
    return recipe_model().model_json_schema()


def recipe_to_dict(recipe: Any) -> dict:
    return json.loads(recipe.model_dump_json())
