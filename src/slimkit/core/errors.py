"""The SlimkitError family: errors meant for people.

Every message names the culprit (a file, a layer, a key path) and says what to do.
The CLI prints ``str(error)`` on one line and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlimkitError(Exception):
    """Base class of every error slimkit raises on purpose."""

    exit_code = 2


class ConfigError(SlimkitError):
    """A recipe or a config has an unknown key or a bad value."""


class ModelLoadError(SlimkitError):
    """A model file is missing, corrupted, truncated or fails its checksum."""


class UntrustedPickleError(ModelLoadError):
    """Loading would unpickle a user's file and ``trust_pickle`` was not given."""


class DataError(SlimkitError):
    """A dataset is missing, malformed, or does not fit the model."""


class MissingDataError(ConfigError, DataError):
    """A stage's settings need data (to train, to calibrate) and none was given.

    Both a ConfigError (what the recipe asks) and a DataError (what is missing), so either
    ``except`` catches it.
    """


class ModelError(SlimkitError):
    """A model cannot run on the given input, or produced NaN/Inf."""


class OutputExistsError(SlimkitError):
    """An output path exists and ``overwrite`` was not given."""


class ResumeError(SlimkitError):
    """A checkpoint belongs to a different run and cannot be resumed."""


class ExportError(SlimkitError):
    """Export to ONNX failed or its output does not match PyTorch."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``name`` (or None when nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix, or '' when nothing is close."""
    match = closest(name, candidates)
    return f" Did you mean '{match}'?" if match else ""
