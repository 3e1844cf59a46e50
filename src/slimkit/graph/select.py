"""Layer selectors: by exact name, ``re:REGEX`` or ``type:ClassName``; never by module object."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from slimkit.core.errors import ConfigError, did_you_mean


def _matches(selector: str, name: str, module: nn.Module) -> bool:
    if selector.startswith("re:"):
        try:
            return re.fullmatch(selector[3:], name) is not None
        except re.error as exc:
            raise ConfigError(f"layer selector '{selector}' is not a valid regex: {exc}") from None
    if selector.startswith("type:"):
        return type(module).__name__ == selector[5:]
    return name == selector


def select_layers(model: nn.Module, types: Iterable[str], include: Iterable[str] = (),
                  exclude: Iterable[str] = ()) -> tuple[dict[str, nn.Module], list[dict]]:
    """Layers of the given types, narrowed by ``include`` and minus ``exclude``.

    Returns:
        The selected ``{name: module}`` and the skipped layers as ``{"what", "why"}`` records.

    Raises:
        ConfigError: a selector matches no layer of the model (naming the closest layer).
    """
    types = set(types)
    modules = {n: m for n, m in model.named_modules() if n}
    for sel in [*include, *exclude]:
        if not any(_matches(sel, n, m) for n, m in modules.items()):
            raise ConfigError(f"layer selector '{sel}' matches no layer of the model."
                              f"{did_you_mean(sel.removeprefix('re:'), modules)}")
    candidates = {n: m for n, m in modules.items() if type(m).__name__ in types}
    include, exclude = list(include), list(exclude)
    chosen, skipped = {}, []
    for name, mod in candidates.items():
        if include and not any(_matches(s, name, mod) for s in include):
            skipped.append({"what": name, "why": "not matched by include"})
        elif any(_matches(s, name, mod) for s in exclude):
            skipped.append({"what": name, "why": "excluded by the recipe"})
        else:
            chosen[name] = mod
    return chosen, skipped
