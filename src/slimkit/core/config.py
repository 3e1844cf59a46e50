"""Base class of every versioned config, and human-readable validation errors."""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from slimkit.core.errors import ConfigError, did_you_mean

INT64_MAX = 2**63 - 1
# Keys of a pydantic core schema that hold further schemas (or name -> schema mappings).
_SUBSCHEMA_KEYS = ("schema", "fields", "choices", "items_schema", "values_schema", "keys_schema",
                   "definitions", "steps", "lax_schema", "strict_schema", "json_schema",
                   "python_schema")
# The loc entry pydantic adds for a union member that is not a model: "float", "literal['a']".
_UNION_MEMBER = re.compile(
    r"^(?:int|float|str|bool|none|bytes|(?:literal|list|dict|tuple|set|frozenset|nullable|union"
    r"|tagged-union|function-(?:before|after|wrap|plain)|json-or-python|lax-or-strict|chain"
    r"|is-instance)\[.*\])$")


def _number(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    """Every int and float of a config passes here: not a boolean, and an int fits 64 bits.

    Pydantic's lax mode reads ``true`` as 1 and accepts any Python int; a recipe's ``lr: true``
    or ``seed: 1e30`` is a mistake, and torch, numpy and ONNX hold integers in 64 bits.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("number_not_bool", "expected a number, got the boolean {value}",
                                  {"value": str(value).lower()})
    out = handler(value)
    if isinstance(out, int) and not -INT64_MAX - 1 <= out <= INT64_MAX:
        raise PydanticCustomError("int64_overflow",
                                  "{value} does not fit in 64 bits (|value| < 2**63)",
                                  {"value": out})
    return out


def _guard_numbers(schema: Any, owner: type) -> Any:
    """Wrap every int/float schema of ``owner``'s own fields (in lists, dicts, unions too)."""
    if isinstance(schema, (list, tuple)):
        return type(schema)(_guard_numbers(s, owner) for s in schema)
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if kind == "function-wrap" and schema.get("function", {}).get("function") is _number:
        return schema  # guarded already: pydantic reuses sub-schemas when classes are rebuilt
    if kind in ("int", "float"):
        return core_schema.no_info_wrap_validator_function(_number, schema)
    if kind == "model" and schema.get("cls") is not owner:
        return schema  # a nested config guarded its own fields
    keys = _SUBSCHEMA_KEYS if kind is not None else tuple(schema)  # a name -> schema mapping
    for key in keys:
        if key in schema:
            schema[key] = _guard_numbers(schema[key], owner)
    return schema


class SlimConfig(BaseModel):
    """Strict pydantic model for every config and recipe section.

    Unknown keys are errors, assignments are validated, and one rule holds for every number
    in every subclass (nested lists, dicts and unions included): floats must be finite
    (``.inf`` would silently switch a check off or never end a loop), booleans are not numbers
    (``lr: true``), and integers fit in 64 bits. Field-specific bounds stay on the fields.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[BaseModel],
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return _guard_numbers(handler(source), cls)


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


def _resolve(model: type[BaseModel], loc: tuple[Any, ...],
             last_is_key: bool = False) -> tuple[list[str], list[str]]:
    """Walk ``loc`` through nested models.

    Returns the key path without the tags pydantic inserts for unions (a stage's ``kind``, a
    member's class name or type such as ``literal['auto']``), and the field names valid at
    the last key. With ``last_is_key`` the last entry is a key the user wrote, whatever it is.
    """
    candidates, parents, path = [model], [model], []
    for i, part in enumerate(loc):
        user_key = last_is_key and i == len(loc) - 1
        if isinstance(part, str) and not user_key and \
                not any(part in m.model_fields for m in candidates):
            tagged = [m for m in candidates if part in (_kind_of(m), m.__name__)]
            if tagged:  # a union tag inserted by pydantic, not a key the user wrote
                candidates = tagged
                continue
            if _UNION_MEMBER.match(part):
                continue
        path.append(str(part))
        parents = candidates
        if not isinstance(part, int):
            candidates = [sub for m in candidates if part in m.model_fields
                          for sub in _models_in(m.model_fields[part].annotation)]
    return path, sorted({f for m in parents for f in m.model_fields})


def format_validation_error(err: ValidationError, source: str,
                            model: type[BaseModel]) -> ConfigError:
    """Turn a pydantic error into one ConfigError naming each key path and the closest name.

    The failures of one key's union members are joined (``a finite number or 'auto'``).
    """
    found: dict[str, list[str]] = {}
    for e in err.errors():
        path, fields = _resolve(model, tuple(e["loc"]), e["type"] == "extra_forbidden")
        where = ".".join(path) or "<root>"
        if e["type"] == "extra_forbidden":
            where, msg = f"{where}: unknown key.{did_you_mean(path[-1], fields)}", ""
        elif e["type"] == "union_tag_invalid":
            tag, expected = e["ctx"]["tag"], e["ctx"]["expected_tags"]
            names = [t.strip(" '") for t in str(expected).split(",")]
            where = (f"{where}.{e['ctx']['discriminator'].strip(chr(39))}: unknown value "
                     f"'{tag}'.{did_you_mean(tag, names)} Known: {expected}.")
            msg = ""
        else:
            msg = e["msg"]
        found.setdefault(where, [])
        if msg and msg not in found[where]:
            found[where].append(msg)
    lines = [f"{where}: {' or '.join(msgs)}" if msgs else where for where, msgs in found.items()]
    return ConfigError(f"invalid {source}: " + "; ".join(lines))
