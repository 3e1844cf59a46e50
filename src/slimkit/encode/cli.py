"""What ``slimkit pack`` and ``slimkit unpack`` do, as plain functions the typer app wraps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit.core.errors import ConfigError, ModelError, ModelLoadError, OutputExistsError


def pack_command(model: str, out: Path, bits: int | None = None, overwrite: bool = False,
                 data: str | None = None) -> dict[str, Any]:
    """Pack a model (artifact directory, .pt2 or zoo:NAME) into a ``.slim`` file.

    Layers whose weights already take at most ``2^bits`` distinct non-zero values (a model
    from an ``encode`` stage) are stored exactly; others are clustered here without
    fine-tuning, and the report lists them under ``clustered_at_pack``.

    The file is written beside ``out``, read back (checksums, decoding, the architecture
    rebuilt) and, with ``data``, evaluated; only then does it replace ``out``. A failure at
    any step leaves a previous ``out`` byte for byte.

    Args:
        model: the model to pack, usually an artifact directory.
        out: the ``.slim`` file to write.
        bits: cluster bits for every layer; None keeps the defaults (conv 8, fc 5).
        overwrite: replace ``out`` if it exists (after every check passed).
        data: a dataset spec; when given, the report adds the top-1 accuracy of the model
            and of the packed file read back, and the data they were measured on (``top1``:
            ``model``, ``packed``, ``data``, ``n_test``).

    Returns:
        The pack report: ``path``, ``bytes``, ``ratio``, bytes per ``layers`` and
        ``tensors``, ``bits_per_weight`` and ``entropy_bits_per_weight``.

    Raises:
        ConfigError: ``bits`` outside [1, 8]; ModelLoadError, OutputExistsError (before any
            work), DataError or ModelError (data that does not fit the model).
    """
    from slimkit.core.files import atomic_path, ensure_absent
    from slimkit.data import load_data
    from slimkit.encode.config import EncodeConfig
    from slimkit.encode.slimfile import pack, unpack
    from slimkit.io.loader import load_model
    from slimkit.measure import check_fits

    if bits is not None and not 1 <= bits <= 8:
        raise ConfigError(f"--bits must be between 1 and 8, got {bits}")
    out = Path(out)
    ensure_absent(out, overwrite)
    if out.exists() and not out.is_file():  # renaming onto a device would replace it
        raise OutputExistsError(f"output '{out}' is not a regular file (a device, pipe, "
                                "folder or socket?); choose another path")
    bundle = load_data(data) if data else None
    loaded = load_model(model, data=bundle)
    check_fits(loaded, bundle)
    cfg = EncodeConfig() if bits is None else EncodeConfig(conv_bits=bits, fc_bits=bits)
    with atomic_path(out) as tmp:
        report = pack(loaded, tmp, cfg, overwrite=True)
        try:
            packed = unpack(tmp, template=None if loaded.arch else loaded.module)
        except ModelLoadError as exc:  # name the file asked for, not the temporary one
            raise ModelError(f"'{model}' was not packed: the file written for '{out}' does not "
                             "read back: " + str(exc).replace(f"'{tmp}' ", "", 1)) from None
        if bundle is not None:
            from slimkit.io.batch import judging
            from slimkit.train.loop import evaluate

            with judging(loaded.output):  # top-1 of the output the model is judged by
                report["top1"] = {
                    "model": evaluate(loaded.module, bundle.x_test, bundle.y_test),
                    "packed": evaluate(packed.module, bundle.x_test, bundle.y_test),
                    "data": bundle.name, "n_test": bundle.n_test}
    report["path"] = str(out)
    return report


def pack_summary(report: dict[str, Any]) -> list[str]:
    """The lines ``slimkit pack`` prints: the file, whether clustering here lost anything
    (k-means without fine-tuning is lossy), and with data the top-1 it cost.

    Example:
        >>> for line in pack_summary(pack_command("runs/a", Path("a.slim"), data="builtin:digits")):
        ...     print(line)  # doctest: +SKIP
    """
    lines = [f"wrote {report['path']} ({report['bytes']:,} bytes, {report['ratio']:.2f}x "
             f"smaller than float32, {report['bits_per_weight']:.2f} bits per shared weight)"]
    late = report["clustered_at_pack"]
    if late:
        names = ", ".join(late[:3]) + (", ..." if len(late) > 3 else "")
        lines.append(f"lossy: {len(late)} weight tensor{'' if len(late) == 1 else 's'} "
                     f"clustered here by k-means without fine-tuning ({names}); an encode "
                     "stage in a recipe fine-tunes the shared weights instead")
    else:
        lines.append("lossless: every shared-weight layer already had few enough distinct "
                     "values (stored exactly)")
    lines += [f"tied: {alias} is {first} (one matrix, stored once)"
              for alias, first in report.get("tied", {}).items()]
    lines += [f"stored raw: {row['what']}: {row['why']}" for row in report.get("skipped", [])]
    top1 = report.get("top1")
    if top1:
        before, after = top1["model"], top1["packed"]
        lines.append(f"top-1 on {top1['n_test']:,} test samples of {top1['data']}: "
                     f"{before:.2%} before packing, {after:.2%} after "
                     f"({100 * (after - before):+.2f} points)")
    elif late:
        lines.append("pass --data to measure the accuracy the clustering costs")
    return lines


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
