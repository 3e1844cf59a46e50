"""``load_data``: one entry point from a spec string to a validated dataset.

Small forms (``builtin:``, ``.npz``, Hugging Face array or image columns) load into an
in-memory :class:`~slimkit.data.bundle.DataBundle`. Forms that can be large stream: text
files and text columns always (tokenized batch by batch), image folders with ``stream=True``
(decoded batch by batch); memory is then bounded by the batch, whatever the dataset's size.

What the data needs from the model (its tokenizer, maximum length, image size, classes) comes
in :class:`ModelHints` (see :func:`model_hints`); what the user chose in
:class:`DataOptions`. Everything in this module runs without torch: a spec and its options
are checked (:func:`check_data_spec`, :func:`check_data_options`) before torch is imported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimkit.core.errors import DataError, did_you_mean
from slimkit.data.builtin import BUILTIN

if TYPE_CHECKING:
    from slimkit.data.bundle import DataBundle
    from slimkit.data.stream import StreamData

ACCEPTED_FORMS = (
    "'builtin:NAME' (NAME one of {builtins}), a path to a .npz file with x/y arrays, "
    "a .jsonl or .csv text file (a 'text' column, optionally a 'label' column), "
    "a folder with one sub-folder of images per class, a folder of MNIST-format IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], optional t10k-*), "
    "or a folder written by Hugging Face datasets' save_to_disk"
)
TEXT_SUFFIXES = (".jsonl", ".csv")
# "scheme:rest" with a scheme of two or more letters; one letter is a Windows drive (C:\...).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# Files that ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top level.
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Columns a saved dataset's inputs and labels are taken from, in order of preference.
INPUT_COLUMNS = ("pixel_values", "image", "x", "input_ids")
LABEL_COLUMNS = ("label", "labels", "y")
# Normalization of models pretrained on ImageNet (torchvision's and most HF vision models').
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Form = Literal["builtin", "npz", "text", "hf", "images", "idx"]


@dataclass(frozen=True)
class DataOptions:
    """What the user chose about reading the data (the CLI's data options).

    Attributes:
        text_column: the column holding the text (default ``text``).
        label_column: the column holding class labels (default: ``label``, ``labels`` or
            ``y`` when present; ints, or names mapped through the model's ``label2id``
            when it has them all, else sorted).
        max_length: truncate tokenized text to this many tokens (default: the model's maximum).
        truncate: truncate longer rows (counted in a warning); False refuses them.
        image_size: resize images so their shorter side is this long before the center crop
            to the model's input size (that size, square, when the model does not say).
        batch_size: samples per streamed batch.
    """

    text_column: str | None = None
    label_column: str | None = None
    max_length: int | None = None
    truncate: bool = True
    image_size: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("max_length", "image_size", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(f"data option {name} must be a positive integer, got {value!r}")

    def given(self, names: tuple[str, ...]) -> list[str]:
        """The CLI spelling of each option in ``names`` that is set."""
        out = [f"--{n.replace('_', '-')}" for n in names
               if n != "truncate" and getattr(self, n) is not None]
        return out + (["--no-truncate"] if "truncate" in names and not self.truncate else [])


@dataclass(frozen=True)
class ModelHints:
    """What a dataset needs to know about the model it feeds (see :func:`model_hints`).

    Attributes:
        name: the model as the user named it (for messages).
        model_dir: the directory holding the model's tokenizer files, when it is one.
        kind: ``causal_lm``, ``classifier``, ``encoder`` (a bare text encoder), ``vision``
            or None (unknown); decides the task of text data.
        input_names: the named inputs the model takes (dict-style models).
        image_shape: ``(channels, height, width)`` of an image model's input.
        max_length: the model's maximum sequence length (position embeddings).
        label2id: class names to indices, when the model has them.
        num_classes: the model's number of classes, when it has a classification head.
        mean, std: per-channel normalization the model was trained with (HF vision models:
            its preprocessor's, else ImageNet's); None keeps pixels in [0, 1].
        resize: the shorter side to resize to before cropping (an HF preprocessor's).
        tokenizer: an already loaded tokenizer (API use), instead of ``model_dir``'s.
    """

    name: str = "model"
    model_dir: Path | None = None
    kind: str | None = None
    input_names: tuple[str, ...] | None = None
    image_shape: tuple[int, int, int] | None = None
    max_length: int | None = None
    label2id: dict[str, int] | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: int | None = None
    tokenizer: Any = field(default=None, compare=False, repr=False)


def accepted_forms() -> str:
    """A sentence listing every spec form ``load_data`` understands."""
    return ACCEPTED_FORMS.format(builtins=", ".join(BUILTIN.names()))


def is_hf_dataset_dir(path: Path) -> bool:
    """True when ``path`` looks like a directory written by ``save_to_disk``."""
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


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
    if path.is_file() and path.suffix.lower() not in (".npz", *TEXT_SUFFIXES):
        raise DataError(f"cannot load data from file '{path}' ({path.suffix or 'no suffix'}). "
                        f"Accepted: {accepted_forms()}.")
    return spec


def data_form(spec: str) -> Form:
    """Which kind of data a checked spec names (no torch, nothing read)."""
    if spec.startswith("builtin:"):
        return "builtin"
    path = Path(spec).expanduser()
    if path.is_file():
        return "text" if path.suffix.lower() in TEXT_SUFFIXES else "npz"
    if is_hf_dataset_dir(path):
        return "hf"
    from slimkit.data.idx import is_idx_dir  # numpy only: still no torch

    return "idx" if is_idx_dir(path) else "images"


_TEXT_DATA = "text data (a .jsonl or .csv file, or a Hugging Face dataset's text column)"
# What each option applies to: the data forms, and how to say it.
_FOR = {"text_column": (("text",), _TEXT_DATA), "max_length": (("text",), _TEXT_DATA),
        "truncate": (("text",), _TEXT_DATA),
        "label_column": (("text", "hf"), "text data or a Hugging Face dataset"),
        "image_size": (("images",), "an image folder")}
_FORM_WORDS = {"builtin": "a built-in dataset", "npz": "an .npz archive",
               "text": "a text file", "hf": "a Hugging Face dataset without a text column",
               "images": "an image folder", "idx": "an MNIST-format (IDX) folder"}


def check_data_options(spec: str, options: DataOptions | None, model: str | None = None,
                       model_dir: Path | None = None) -> None:
    """Check, without torch, that the options fit the data and that text data has what it
    needs: the text (and an explicit label) column, at least one row, and a model directory
    holding a tokenizer.

    Args:
        spec: a spec :func:`check_data_spec` accepted.
        options: the user's data options (None: defaults).
        model: the model as the user named it (None: not known yet, tokenizer unchecked).
        model_dir: the directory the tokenizer is read from (None: ``model`` is no directory).

    Raises:
        DataError: one line naming the option, column, file or directory and what to do.
    """
    options = options or DataOptions()
    form = data_form(spec)
    text = form == "text" or (form == "hf" and _hf_text_column(Path(spec), options) is not None)
    forms = ("text", "hf") if text else (form,)
    for name, (where, words) in _FOR.items():
        if not set(where) & set(forms) and options.given((name,)):
            raise DataError(f"{options.given((name,))[0]} applies to {words}, but '{spec}' is "
                            f"{_FORM_WORDS[form]}; drop the option")
    if form == "text":
        from slimkit.data.text import check_text_file

        check_text_file(Path(spec).expanduser(), options)
    elif text:
        _check_hf_columns(Path(spec), options)
    if text and model is not None:
        from slimkit.data.text import check_tokenizer_dir

        check_tokenizer_dir(model_dir, model, spec)


def _hf_features(path: Path) -> list[str] | None:
    """The column names a saved dataset declares (its dataset_info.json), or None when they
    cannot be read without the library."""
    infos = [path / "dataset_info.json"]
    try:
        splits = json.loads((path / "dataset_dict.json").read_text("utf-8")).get("splits", [])
        infos += [path / str(s) / "dataset_info.json" for s in splits]
    except (OSError, ValueError, AttributeError):
        pass
    for info in infos:
        try:
            features = json.loads(info.read_text("utf-8")).get("features")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(features, dict):
            return list(features)
    return None


def _hf_text_column(path: Path, options: DataOptions) -> str | None:
    """The text column a saved dataset will be read from, or None when it has array or image
    inputs (or its columns cannot be read here)."""
    if options.text_column is not None:
        return options.text_column
    columns = _hf_features(path)
    if columns is None or any(c in columns for c in INPUT_COLUMNS):
        return None
    return "text" if "text" in columns else None


def _check_hf_columns(path: Path, options: DataOptions) -> None:
    columns = _hf_features(path)
    if columns is None:
        return
    for role, name in (("text", options.text_column), ("label", options.label_column)):
        if name is not None and name not in columns:
            raise DataError(f"the dataset at {path} has no {role} column '{name}'; its columns "
                            f"are: {', '.join(columns)}. Choose one with --{role}-column")


def model_hints(model: Any, spec: str | None = None) -> ModelHints:
    """What the data needs to know about ``model`` (a SlimModel or OnnxModel, duck-typed).

    Args:
        model: the loaded model.
        spec: the model as the user named it; when it is a directory, the tokenizer (and an
            image preprocessor's settings) are read from there.
    """
    module = getattr(model, "module", None)
    config = getattr(module, "config", None)
    shape = tuple(getattr(model, "input_shape", ()) or ())
    dtype = str(getattr(model, "input_dtype", ""))
    inputs = getattr(model, "inputs", None) or ()
    names = (tuple(s.name for s in inputs) if getattr(model, "input_style", None) == "dict"
             else None)
    image = shape if len(shape) == 3 and dtype.startswith("float") else None
    model_dir = Path(spec) if spec and Path(spec).is_dir() else None
    num_classes = getattr(model, "num_classes", None)
    hints: dict[str, Any] = {"name": spec or getattr(model, "name", "model"),
                             "model_dir": model_dir, "input_names": names, "image_shape": image,
                             "num_classes": num_classes, "kind": _kind(module, names, image,
                                                                       num_classes)}
    if config is not None:
        limit = getattr(config, "max_position_embeddings", None)
        hints["max_length"] = limit if isinstance(limit, int) and limit > 0 else None
        label2id = getattr(config, "label2id", None)
        if isinstance(label2id, dict) and label2id:
            hints["label2id"] = {str(k): int(v) for k, v in label2id.items()}
        if image is not None:
            hints.update(_preprocessor(model_dir))
    return ModelHints(**hints)


def _kind(module: Any, names: tuple[str, ...] | None, image: tuple | None,
          num_classes: int | None) -> str | None:
    cls = type(module).__name__ if module is not None else ""
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if num_classes or "Classification" in cls:
        return "classifier"
    if image is not None:
        return "vision"
    if names and "input_ids" in names and getattr(module, "config", None) is not None:
        return "encoder"
    return None


def _preprocessor(model_dir: Path | None) -> dict[str, Any]:
    """Mean, std and resize of an HF image processor (``preprocessor_config.json``), with
    ImageNet's mean and std when it has none."""
    out: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    try:
        cfg = json.loads((model_dir / "preprocessor_config.json").read_text("utf-8"))  # type: ignore[operator]
    except (OSError, ValueError, TypeError):
        return out
    if not isinstance(cfg, dict):
        return out
    for key, ours in (("image_mean", "mean"), ("image_std", "std")):
        value = cfg.get(key)
        if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            out[ours] = tuple(float(v) for v in value)
    size = cfg.get("size")
    if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int):
        out["resize"] = size["shortest_edge"]
    return out


def _load_path(spec: str, seed: int, test_fraction: float, trust_pickle: bool,
               options: DataOptions, hints: ModelHints | None, stream: bool,
               ) -> DataBundle | StreamData:
    from slimkit.data.hf import load_hf_dataset
    from slimkit.data.user import image_folder_stream, load_image_folder, load_npz

    path = Path(spec).expanduser()
    form = data_form(spec)
    if form == "npz":
        return load_npz(path, seed=seed, test_fraction=test_fraction, trust_pickle=trust_pickle)
    if form == "text":
        from slimkit.data.text import load_text_file

        return load_text_file(path, seed=seed, test_fraction=test_fraction, options=options,
                              hints=hints)
    if form == "idx":
        from slimkit.data.idx import load_idx_folder

        return load_idx_folder(path, seed=seed, test_fraction=test_fraction)
    if form == "hf":
        return load_hf_dataset(path, seed=seed, test_fraction=test_fraction, options=options,
                               hints=hints)
    if stream:
        return image_folder_stream(path, seed=seed, test_fraction=test_fraction,
                                   options=options, hints=hints)
    return load_image_folder(path, seed=seed, test_fraction=test_fraction, options=options,
                             hints=hints)


def _name_inputs(bundle: Any, hints: ModelHints | None) -> None:
    """Give in-memory inputs the name of a model's one named input (``pixel_values`` of an HF
    vision model), so that a tensor dataset feeds a model that takes keywords."""
    names = hints.input_names if hints is not None else None
    if getattr(bundle, "streaming", True) or not names or len(names) != 1:
        return
    if not isinstance(bundle.x_train, dict | tuple):
        bundle.x_train, bundle.x_test = {names[0]: bundle.x_train}, {names[0]: bundle.x_test}


def load_data(spec: str, *, seed: int = 0, test_fraction: float = 0.2,
              trust_pickle: bool = False, num_classes: int | None = None,
              options: DataOptions | None = None, hints: ModelHints | None = None,
              stream: bool = False) -> DataBundle | StreamData:
    """Load a dataset from a spec string into a validated, split dataset.

    Args:
        spec: ``builtin:mnist`` / ``builtin:digits`` / ``builtin:mnist1d``, or a path to a
            ``.npz`` file, a ``.jsonl`` or ``.csv`` text file, an image folder (one
            sub-folder per class) or a Hugging Face dataset saved with ``save_to_disk``.
        seed: decides the stratified train/test split when the data has none, and the
            order a stream's training split is read in.
        test_fraction: share of samples held out for testing when splitting, in (0, 1).
        trust_pickle: allow object arrays in ``.npz`` files (this unpickles the file).
        num_classes: the number of classes the model expects; every label must fit.
        options: text columns, maximum length, truncation, image size, batch size.
        hints: what the model says about its data (:func:`model_hints`): text needs its
            tokenizer; images take its size and normalization.
        stream: decode image folders batch by batch (a :class:`StreamData`) instead of
            into memory. Text is always streamed.

    Returns:
        A DataBundle with float32 (or int64 token) inputs and int64 labels, or a StreamData
        (text; image folders with ``stream``) whose batches are read when iterated.

    Raises:
        DataError: unknown builtin, missing path, unsupported spec, an option that does not
            apply, or a dataset that fails validation; the message names the culprit.

    Example:
        >>> data = load_data("builtin:digits", seed=0)  # doctest: +SKIP
        >>> data.input_shape, data.num_classes  # doctest: +SKIP
        ((1, 8, 8), 10)
    """
    spec = check_data_spec(spec)
    options = options or DataOptions()
    check_data_options(spec, options)
    if spec.startswith("builtin:"):
        bundle = BUILTIN.get(spec[len("builtin:"):])(seed, test_fraction)
    else:
        bundle = _load_path(spec, seed, test_fraction, trust_pickle, options, hints, stream)
    _name_inputs(bundle, hints)
    if num_classes is not None:
        if getattr(bundle, "streaming", False):
            if bundle.num_classes > num_classes:
                raise DataError(f"data '{bundle.name}' has {bundle.num_classes} classes, more "
                                f"than num_classes={num_classes}")
            bundle.num_classes = num_classes
            return bundle
        from slimkit.data.validate import check_label_range

        check_label_range(bundle.y_train, num_classes, name="y")
        check_label_range(bundle.y_test, num_classes, name="y_test")
        bundle.num_classes = num_classes
    return bundle
