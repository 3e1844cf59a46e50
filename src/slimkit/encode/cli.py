"""What ``slimkit pack`` and ``slimkit unpack`` do, as plain functions the typer app wraps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit.core.errors import ConfigError


def pack_command(model: str, out: Path, bits: int | None = None, overwrite: bool = False,
                 data: str | None = None) -> dict[str, Any]:
    """Pack a model (artifact directory, .pt2 or zoo:NAME) into a ``.slim`` file.

    Layers whose weights already take at most ``2^bits`` distinct non-zero values (a model
    from an ``encode`` stage) are stored exactly; others are clustered here without
    fine-tuning, and the report lists them under ``clustered_at_pack``.

    Args:
        model: the model to pack, usually an artifact directory.
        out: the ``.slim`` file to write (atomically).
        bits: cluster bits for every layer; None keeps the defaults (conv 8, fc 5).
        overwrite: replace ``out`` if it exists.
        data: a dataset spec; when given, the report adds the top-1 accuracy of the model
            and of the packed file read back (``top1``).

    Returns:
        The pack report: ``path``, ``bytes``, ``ratio``, bytes per ``layers`` and
        ``tensors``, ``bits_per_weight`` and ``entropy_bits_per_weight``.

    Raises:
        ConfigError: ``bits`` outside [1, 8]; ModelLoadError, OutputExistsError, DataError.
    """
    from slimkit.data import load_data
    from slimkit.encode.config import EncodeConfig
    from slimkit.encode.slimfile import pack, unpack
    from slimkit.io.loader import load_model

    if bits is not None and not 1 <= bits <= 8:
        raise ConfigError(f"--bits must be between 1 and 8, got {bits}")
    bundle = load_data(data) if data else None
    loaded = load_model(model, data=bundle)
    cfg = EncodeConfig() if bits is None else EncodeConfig(conv_bits=bits, fc_bits=bits)
    report = pack(loaded, out, cfg, overwrite=overwrite)
    if bundle is not None:
        from slimkit.train.loop import evaluate

        packed = unpack(out, template=None if loaded.arch else loaded.module)
        report["top1"] = {"model": evaluate(loaded.module, bundle.x_test, bundle.y_test),
                          "packed": evaluate(packed.module, bundle.x_test, bundle.y_test)}
    return report


def unpack_command(path: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Read a ``.slim`` file (verifying it) and write it as a slimkit artifact directory.

    Args:
        path: the packed file.
        out: the artifact directory to write.
        overwrite: replace ``out`` if it exists.

    Returns:
        ``{"artifact", "source", "tensors", "params", "size_bytes"}``.

    Raises:
        ModelLoadError: the file is missing, truncated or corrupted (naming what is wrong),
            or records no rebuildable architecture. OutputExistsError: ``out`` exists.
    """
    from slimkit.core.files import dir_size
    from slimkit.encode.slimfile import unpack
    from slimkit.io.artifact import save_artifact

    model = unpack(path)
    save_artifact(model, out, overwrite=overwrite)
    state = model.module.state_dict()
    return {"artifact": str(out), "source": str(path), "tensors": len(state),
            "params": sum(p.numel() for p in model.module.parameters()),
            "size_bytes": dir_size(out)}
