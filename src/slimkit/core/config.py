"""Base class of every versioned config, and human-readable validation errors."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from slimkit.core.errors import ConfigError, did_you_mean


class SlimConfig(BaseModel):
    """Strict pydantic model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model reachable in a type annotation (through list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _kind_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    return field.default if field is not None else None


def _resolve(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Walk ``loc`` through nested models.

    Returns the key path without discriminator tags, and the field names valid at the last key.
    """
    candidates, path = [model], []
    for part in loc[:-1]:
        path.append(str(part))
        if isinstance(part, int):
            continue
        tagged = [m for m in candidates if _kind_of(m) == part and part not in m.model_fields]
        if tagged:  # a discriminated-union tag inserted by pydantic, not a key the user wrote
            path.pop()
            candidates = tagged
            continue
        nxt = [sub for m in candidates if part in m.model_fields
               for sub in _models_in(m.model_fields[part].annotation)]
        candidates = nxt
    if loc:
        path.append(str(loc[-1]))
    return path, sorted({f for m in candidates for f in m.model_fields})


def format_validation_error(err: ValidationError, source: str,
                            model: type[BaseModel]) -> ConfigError:
    """Turn a pydantic error into one ConfigError naming each key path and the closest name."""
    lines = []
    for e in err.errors():
        path, fields = _resolve(model, tuple(e["loc"]))
        where = ".".join(path) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key.{did_you_mean(path[-1], fields)}")
        elif e["type"] == "union_tag_invalid":
            tag, expected = e["ctx"]["tag"], e["ctx"]["expected_tags"]
            names = [t.strip(" '") for t in str(expected).split(",")]
            lines.append(f"{where}.{e['ctx']['discriminator'].strip(chr(39))}: unknown value "
                         f"'{tag}'.{did_you_mean(tag, names)} Known: {expected}.")
        else:
            lines.append(f"{where}: {e['msg']}")
    return ConfigError(f"invalid {source}: " + "; ".join(lines))
