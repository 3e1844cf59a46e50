"""Foundations shared by every layer: configs, registry, errors, seeding, atomic files."""

from slimkit.core.config import SlimConfig
from slimkit.core.errors import (
    ConfigError,
    DataError,
    ExportError,
    MissingDataError,
    ModelError,
    ModelLoadError,
    OutputExistsError,
    ResumeError,
    SlimkitError,
    UntrustedPickleError,
)
from slimkit.core.registry import Registry
from slimkit.core.seed import seed_everything

__all__ = [
    "ConfigError",
    "DataError",
    "ExportError",
    "MissingDataError",
    "ModelError",
    "ModelLoadError",
    "OutputExistsError",
    "Registry",
    "ResumeError",
    "SlimConfig",
    "SlimkitError",
    "UntrustedPickleError",
    "seed_everything",
]
