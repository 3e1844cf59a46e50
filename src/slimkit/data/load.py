"""``load_data``: one entry point from a spec string to a validated DataBundle."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from slimkit.core.errors import DataError, did_you_mean
from slimkit.data.builtin import BUILTIN

if TYPE_CHECKING:
    from slimkit.data.bundle import DataBundle

ACCEPTED_FORMS = (
    "'builtin:NAME' (NAME one of {builtins}), a path to a .npz file with x/y arrays, "
    "a folder with one sub-folder of images per class, or a folder written by Hugging Face "
    "datasets' save_to_disk"
)
# "scheme:rest" with a scheme of two or more letters; one letter is a Windows drive (C:\...).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def accepted_forms() -> str:
    """A sentence listing every spec form ``load_data`` understands."""
    return ACCEPTED_FORMS.format(builtins=", ".join(BUILTIN.names()))


def check_data_spec(spec: str) -> str:
    """Check a data spec without loading anything (no torch): a known builtin, or a path that
    exists and has an accepted form. :func:`load_data` starts with it.

    Returns:
        The spec, stripped.

    Raises:
        DataError: naming the spec and the accepted forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec must be a non-empty string, got {spec!r}. "
                        f"Accepted: {accepted_forms()}.")
    spec = spec.strip()
    scheme = _SCHEME.match(spec)
    if scheme and scheme.group(1) == "builtin":
        name = spec[len("builtin:"):]
        if name not in BUILTIN:
            raise DataError(
                f"unknown builtin dataset '{name}'.{did_you_mean(name, BUILTIN.names())} "
                f"Known: {', '.join(BUILTIN.names())}."
            )
        return spec
    if scheme and not Path(spec).exists():
        raise DataError(f"unsupported data spec '{spec}' (scheme '{scheme.group(1)}:'). "
                        f"Accepted: {accepted_forms()}.")
    path = Path(spec).expanduser()
    if not path.exists():
        hint = (f" Did you mean 'builtin:{spec}'?" if spec in BUILTIN else "")
        raise DataError(f"data path '{path}' does not exist.{hint} Accepted: {accepted_forms()}.")
    if not path.is_file() and not path.is_dir():
        raise DataError(f"data path '{path}' is neither a regular file nor a folder (a device, "
                        f"pipe or socket?). Accepted: {accepted_forms()}.")
    if path.is_file() and path.suffix.lower() != ".npz":
        raise DataError(f"cannot load data from file '{path}' ({path.suffix or 'no suffix'}). "
                        f"Accepted: {accepted_forms()}.")
    return spec


def _load_path(spec: str, seed: int, test_fraction: float, trust_pickle: bool) -> DataBundle:
    from slimkit.data.hf import is_hf_dataset_dir, load_hf_dataset
    from slimkit.data.user import load_image_folder, load_npz

    path = Path(spec).expanduser()
    if path.is_file():
        return load_npz(path, seed=seed, test_fraction=test_fraction, trust_pickle=trust_pickle)
    if is_hf_dataset_dir(path):
        return load_hf_dataset(path, seed=seed, test_fraction=test_fraction)
    return load_image_folder(path, seed=seed, test_fraction=test_fraction)


def load_data(spec: str, *, seed: int = 0, test_fraction: float = 0.2,
              trust_pickle: bool = False, num_classes: int | None = None) -> DataBundle:
    """Load a dataset from a spec string into a validated, split DataBundle.

    Args:
        spec: ``builtin:mnist`` / ``builtin:digits`` / ``builtin:mnist1d``, or a path to a
            ``.npz`` file, an image folder (one sub-folder per class) or a Hugging Face
            dataset saved with ``save_to_disk``.
        seed: decides the stratified train/test split when the data has none.
        test_fraction: share of samples held out for testing when splitting, in (0, 1).
        trust_pickle: allow object arrays in ``.npz`` files (this unpickles the file).
        num_classes: the number of classes the model expects; every label must fit.

    Returns:
        A DataBundle with float32 (or int64 token) inputs and int64 labels.

    Raises:
        DataError: unknown builtin, missing path, unsupported spec, or a dataset that
            fails validation; the message names the culprit.

    Example:
        >>> data = load_data("builtin:digits", seed=0)  # doctest: +SKIP
        >>> data.input_shape, data.num_classes  # doctest: +SKIP
        ((1, 8, 8), 10)
    """
    spec = check_data_spec(spec)
    if spec.startswith("builtin:"):
        bundle = BUILTIN.get(spec[len("builtin:"):])(seed, test_fraction)
    else:
        bundle = _load_path(spec, seed, test_fraction, trust_pickle)
    if num_classes is not None:
        from slimkit.data.validate import check_label_range

        check_label_range(bundle.y_train, num_classes, name="y")
        check_label_range(bundle.y_test, num_classes, name="y_test")
        bundle.num_classes = num_classes
    return bundle
