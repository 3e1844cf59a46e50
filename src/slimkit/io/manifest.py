"""The schema of an artifact's ``manifest.json``, and the rule that keeps its files inside.

The manifest is the one file no checksum covers (it holds the checksums), so everything read
from it is validated before use: its structure and types (one error naming the key path), and
every file name it lists, which must name a file directly inside the artifact folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)

from slimkit.core.errors import ModelLoadError

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1


def check_file_name(name: str) -> str:
    """``name`` itself when it names a file directly inside a folder, else ValueError.

    A manifest lists its files by name; a path separator, ``..``, an absolute path or a drive
    would let a forged manifest point the loader (and its checksums) at files elsewhere.
    """
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or ":" in name or Path(name).is_absolute()):
        raise ValueError(f"'{name}' is not a plain file name inside the artifact folder "
                         "(no '/', '\\', '..', drive or absolute path)")
    return name


FileName = Annotated[StrictStr, AfterValidator(check_file_name)]
Size = Annotated[StrictInt, Field(ge=1)]


def _check_dtype(name: str) -> str:
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"'{name}' is not a torch dtype name such as float32 or int64")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FileEntry(_Strict):
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[StrictInt, Field(ge=0)]


class TensorEntry(_Strict):
    name: StrictStr
    shape: list[Size]
    dtype: Annotated[StrictStr, AfterValidator(_check_dtype)]
    dynamic: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    high: Size | None = None


class InputSpec(_Strict):
    shape: list[Size]
    dtype: Annotated[StrictStr, AfterValidator(_check_dtype)]
    inputs: Annotated[list[TensorEntry], Field(min_length=1)] | None = None
    style: Literal["tensor", "tuple", "dict"] = "tensor"
    output: StrictStr | None = None


class Transform(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    kind: StrictStr
    version: Annotated[StrictInt, Field(ge=1)] | None = None
    owner: StrictStr | None = None
    plan: Any


class ZooArch(_Strict):
    zoo: StrictStr
    input_shape: Annotated[list[Size], Field(min_length=1)]
    num_classes: Size
    kwargs: dict[str, Any] = Field(default_factory=dict)
    transforms: list[Transform] = Field(default_factory=list)


class HfArch(_Strict):
    hf: StrictStr
    config: dict[str, Any]
    transforms: list[Transform] = Field(default_factory=list)


class Pt2Arch(_Strict):
    pt2: FileName


class Manifest(BaseModel):
    """An artifact's manifest; unknown top-level keys (``save_artifact(extra=...)``) pass.

    ``architecture`` is checked apart, as :class:`ZooArch` or :class:`Pt2Arch` by its key,
    so that an error names that kind's fields only.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["slimkit-artifact"]
    format_version: Literal[1]
    name: StrictStr | None = None
    architecture: dict[str, Any]
    input_spec: InputSpec
    num_classes: Size | None = None
    recipe: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    versions: dict[str, StrictStr] = Field(default_factory=dict)
    files: dict[FileName, FileEntry]


def _malformed(mpath: Path, where: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"'{mpath}' is malformed at {where or '<root>'}: {why}; "
                          "re-create the artifact")


def _check(model: type[BaseModel], data: Any, mpath: Path, prefix: str = "") -> None:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join([prefix, *(str(p) for p in first["loc"] if p != "[key]")])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        why = str(first["msg"]).removeprefix("Value error, ")
        raise _malformed(mpath, where.strip("."), why + more) from None


def validate_manifest(raw: Any, mpath: Path, weights: str) -> dict[str, Any]:
    """Check a parsed manifest against :class:`Manifest`; return it unchanged.

    Args:
        raw: the parsed JSON.
        mpath: the manifest's path, for messages.
        weights: the name of the weights file every artifact lists.

    Raises:
        ModelLoadError: one line naming the manifest, the first bad key path and why.
    """
    if not isinstance(raw, dict):
        raise ModelLoadError(f"'{mpath}' holds a JSON {type(raw).__name__}, not an object; "
                             "it is not a slimkit manifest")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"'{mpath}' is not a slimkit artifact of format version {FORMAT_VERSION}")
    missing = [k for k in ("architecture", "input_spec", "files") if k not in raw]
    arch, files = raw.get("architecture"), raw.get("files")
    required = [weights] + ([arch["pt2"]] if isinstance(arch, dict) and "pt2" in arch else [])
    missing += [f"files.{f}" for f in required
                if isinstance(f, str) and not (isinstance(files, dict) and f in files)]
    if missing:
        raise ModelLoadError(f"'{mpath}' lacks {', '.join(missing)}; re-create the artifact")
    _check(Manifest, raw, mpath)
    kinds = [k for k in ("zoo", "hf", "pt2") if k in arch]
    if len(kinds) != 1:
        raise _malformed(mpath, "architecture", "it must hold exactly one of 'zoo' (a zoo "
                                                "spec), 'hf' (a transformers class and "
                                                "config) or 'pt2' (a graph file)")
    _check({"zoo": ZooArch, "hf": HfArch, "pt2": Pt2Arch}[kinds[0]], arch, mpath,
           "architecture")
    shape = raw["input_spec"]["shape"]
    if "zoo" in arch and arch["input_shape"] != shape:
        raise _malformed(mpath, "input_spec.shape", f"{shape} differs from "
                                                    f"architecture.input_shape "
                                                    f"{arch['input_shape']}")
    return raw
