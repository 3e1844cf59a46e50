"""Guards that keep slimkit from unpickling a user's file without an explicit opt-in."""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from slimkit.core.errors import ModelLoadError, UntrustedPickleError

# Constants a torch.export archive stores as pickles: opaque objects go through plain
# ``pickle.loads`` and script objects through TorchScript's unpickler when torch reads them.
PICKLED_CONSTANTS = ("opaque_obj_", "custom_obj_")


def _refuse(source: str, what: str) -> UntrustedPickleError:
    return UntrustedPickleError(
        f"'{source}' holds pickled Python objects ({what}); loading it could run arbitrary "
        "code. Pass --trust-pickle (trust_pickle=True) only if you trust its author.")


@contextlib.contextmanager
def no_pickle(source: str, trust_pickle: bool) -> Iterator[None]:
    """Within the block, any ``torch.load`` that would unpickle arbitrary objects is refused.

    ``torch.export.load`` silently retries with ``weights_only=False`` when a restricted load
    fails; this guard turns that retry into a clear error unless the user opted in.
    """
    if trust_pickle:
        yield
        return
    original = torch.load

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise _refuse(source, "a pickled tensor or object")
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def check_pt2_archive(source: str, trust_pickle: bool) -> None:
    """Refuse a ``torch.export`` archive holding pickled payloads, before torch reads a byte.

    ``torch.export.load`` unpickles opaque-object constants with plain ``pickle.loads`` and
    ``use_pickle`` tensors with ``torch.load(weights_only=False)``; neither is needed for the
    graphs slimkit writes (plain tensors and JSON), so without the opt-in they are refused.

    Raises:
        ModelLoadError: the file is not a zip archive.
        UntrustedPickleError: a pickled constant or weight, without ``trust_pickle``.
    """
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"'{source}' is not a valid torch.export archive ({exc}); give a file "
                             "written by torch.export.save") from None
    if trust_pickle:
        archive.close()
        return
    with archive:
        for info in archive.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith(PICKLED_CONSTANTS):
                raise _refuse(source, info.filename)
            if "/data/" in info.filename and base.endswith("_config.json"):
                _check_payload_config(source, info.filename, archive.read(info))


def _check_payload_config(source: str, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError):
        raise ModelLoadError(f"'{source}' has a corrupted entry '{name}'; re-export the "
                             "model") from None
    for fqn, meta in config.items():
        path = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle") or \
                path.startswith(PICKLED_CONSTANTS):
            raise _refuse(source, f"'{fqn}' in {name}")


def load_exported(source: str, trust_pickle: bool) -> torch.export.ExportedProgram:
    """``torch.export.load`` with the archive checked first and every unpickling guarded.

    Raises:
        UntrustedPickleError: pickled payloads without ``trust_pickle``.
        ModelLoadError: not an archive, or one torch cannot read (one line, no torch log).
    """
    check_pt2_archive(source, trust_pickle)
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)  # torch logs a multi-line traceback before re-raising
    try:
        with no_pickle(source, trust_pickle):
            return torch.export.load(source)
    except UntrustedPickleError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"'{source}' is not a valid torch.export archive: {first}") \
            from None
    finally:
        log.setLevel(level)
