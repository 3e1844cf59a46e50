"""IDX files (MNIST format), MNIST-format folders as --data, and builtin:fashion-mnist."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import builtin, load_data
from slimkit.data.builtin import FASHION_MEAN, FASHION_MNIST_DIR, FASHION_STD
from slimkit.data.idx import read_idx, write_idx
from slimkit.data.load import check_data_spec, data_form
from slimkit.data.split import hold_out_validation, split_indices

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
HAVE_FASHION = all((Path(FASHION_MNIST_DIR) / f).is_file() for f in FASHION_FILES)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip_is_exact(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(5, 4, 3)) * 50).astype(dtype)
    back = read_idx(write_idx(tmp_path / name, arr))
    assert back.dtype == np.dtype(dtype) and back.shape == (5, 4, 3)
    np.testing.assert_array_equal(back, arr)


def test_idx_reads_the_format_as_specified_byte_for_byte(tmp_path):
    # Written by hand from the specification, not by write_idx: header 00 00 08 02, dims
    # 2 and 3 as big-endian uint32, then the six ubytes; gzip detected by content, not name.
    body = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    (tmp_path / "raw").write_bytes(body)
    (tmp_path / "zipped").write_bytes(gzip.compress(body))
    for f in ("raw", "zipped"):
        np.testing.assert_array_equal(read_idx(tmp_path / f), [[1, 2, 3], [4, 5, 255]])
    # int16 values are big-endian on disk: 0x0102 = 258.
    short = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE])
    (tmp_path / "short").write_bytes(short)
    assert read_idx(tmp_path / "short").tolist() == [258, -2]


def test_idx_bad_header_names_the_file_and_the_format(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(DataError) as err:
        read_idx(bad)
    msg = str(err.value)
    assert str(bad) in msg and "is not an IDX file (header 89504e47)" in msg
    assert "0x08 for ubyte" in msg


def test_idx_truncated_payload_is_refused(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 2, 2), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"shape \(4, 2, 2\) \(16 bytes of data\) but the file "
                                        r"holds 13; the file is truncated"):
        read_idx(path)


def _mnist_folder(root: Path, n_train: int = 40, n_test: int = 10, test: bool = True) -> dict:
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 6, 5), np.uint8),
              "train-labels-idx1-ubyte.gz": np.arange(n_train, dtype=np.uint8) % 4}
    if test:
        arrays["t10k-images-idx3-ubyte"] = rng.integers(0, 256, (n_test, 6, 5), np.uint8)
        arrays["t10k-labels-idx1-ubyte"] = np.arange(n_test, dtype=np.uint8) % 4
    root.mkdir(exist_ok=True)
    for name, a in arrays.items():
        write_idx(root / name, a)
    return arrays


def test_mnist_format_folder_loads_as_data(tmp_path):
    arrays = _mnist_folder(tmp_path / "mine")
    spec = str(tmp_path / "mine")
    assert check_data_spec(spec) == spec and data_form(spec) == "idx"
    d = load_data(spec)
    assert d.x_train.shape == (40, 1, 6, 5) and d.x_test.shape == (10, 1, 6, 5)
    want = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"]).float().div(255)
    torch.testing.assert_close(d.x_train[:, 0], want, rtol=0, atol=1e-7)
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.num_classes == 4 and d.meta["split"] == "given"


def test_mnist_format_folder_without_t10k_is_split_stratified(tmp_path):
    _mnist_folder(tmp_path / "mine", test=False)
    d = load_data(str(tmp_path / "mine"), seed=3, test_fraction=0.25)
    assert (d.n_train, d.n_test) == (30, 10)
    assert d.y_test.bincount(minlength=4).tolist() == [3, 3, 2, 2]  # largest remainder
    assert d.meta["split"] == "stratified"


def test_mnist_format_folder_with_half_a_test_split_says_which(tmp_path):
    _mnist_folder(tmp_path / "mine")
    (tmp_path / "mine" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="has t10k-images-idx3-ubyte without its labels file"):
        load_data(str(tmp_path / "mine"))


def test_mnist_format_folder_labels_must_match_images(tmp_path):
    _mnist_folder(tmp_path / "mine", test=False)
    write_idx(tmp_path / "mine" / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8))
    with pytest.raises(DataError, match=r"labels of shape \(39,\) for 40 images"):
        load_data(str(tmp_path / "mine"))


def test_hold_out_validation_is_stratified_disjoint_and_seeded():
    y = torch.arange(100) % 4
    x = torch.arange(100, dtype=torch.float32)[:, None]

    def bundle():
        from slimkit.data.assemble import build_bundle

        return build_bundle("t", x, y, x[:8], y[:8])

    a, b, c = (hold_out_validation(bundle(), 0.2, seed=s) for s in (0, 0, 1))
    assert (a.n_train, a.n_val) == (80, 20)
    assert a.y_val.bincount().tolist() == [5, 5, 5, 5]
    ids = torch.cat([a.x_train[:, 0], a.x_val[:, 0]]).sort().values
    assert ids.tolist() == x[:, 0].tolist()  # a partition of the training split
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert torch.equal(next(a.batches("val", None))[0], a.x_val)
    with pytest.raises(DataError, match="has a validation split already"):
        hold_out_validation(a, 0.2)


def test_split_sizes_per_class_agree_with_scikit_learn():
    # A second implementation as the reference: scikit-learn's stratified split gives each
    # class the same share up to the rounding of one sample.
    sk = pytest.importorskip("sklearn.model_selection")
    y = torch.from_numpy(np.repeat(np.arange(5), [37, 11, 23, 5, 24]))
    for frac in (0.1, 0.2, 0.33):
        ours = np.bincount(y.numpy()[split_indices(y, frac, seed=0)[1]], minlength=5)
        _, test = next(sk.StratifiedShuffleSplit(1, test_size=frac, random_state=0)
                       .split(np.zeros(len(y)), y.numpy()))
        ref = np.bincount(y.numpy()[test], minlength=5)
        assert ours.sum() == ref.sum()
        assert np.abs(ours - ref).max() <= 1, (frac, ours, ref)


def test_splits_scikit_learn_refuses_are_made():
    # Why the split is ours and not scikit-learn's: it refuses a class with one sample and a
    # subset smaller than the number of classes (a small calibration set, a user's rare
    # class); ours takes them, every class in proportion, up to one sample.
    sk = pytest.importorskip("sklearn.model_selection")
    rare = torch.from_numpy(np.repeat(np.arange(3), [50, 30, 1]))
    small = torch.from_numpy(np.repeat(np.arange(10), 20))
    for y, size in ((rare, 0.2), (small, 5)):
        with pytest.raises(ValueError):
            sk.train_test_split(np.arange(len(y)), test_size=size, stratify=y.numpy(),
                                random_state=0)
    train, test = split_indices(rare, 0.2, seed=0)
    assert np.bincount(rare.numpy()[test], minlength=3).tolist() == [10, 6, 0]
    assert sorted([*train, *test]) == list(range(len(rare)))
    picked = np.bincount(small.numpy()[split_indices(small, 5 / 200, seed=0)[1]],
                         minlength=10)
    assert picked.sum() == 5 and picked.max() == 1


def test_fashion_mnist_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_data("builtin:fashion-mnist")
    assert str(err.value) == (
        "builtin:fashion-mnist needs Debian's dataset-fashion-mnist package: run "
        "`sudo apt-get install dataset-fashion-mnist` (or pass an MNIST-format folder with "
        "--data)")


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_is_the_full_dataset_with_a_held_out_validation_split():
    d = load_data("builtin:fashion-mnist", seed=0)
    assert (d.n_train, d.n_val, d.n_test) == (54000, 6000, 10000)
    assert d.x_train.shape[1:] == d.x_val.shape[1:] == d.x_test.shape[1:] == (1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.num_classes == 10
    for y, per_class in ((d.y_train, 5400), (d.y_val, 600), (d.y_test, 1000)):
        assert y.min() == 0 and y.max() == 9
        assert y.bincount(minlength=10).tolist() == [per_class] * 10
    # Normalized with the training set's statistics: pixel 0 maps to -mean/std, and the
    # train split's mean and std come out near 0 and 1.
    torch.testing.assert_close(d.x_test.min(), torch.tensor(-FASHION_MEAN / FASHION_STD))
    assert abs(d.x_train.mean().item()) < 0.01 and abs(d.x_train.std().item() - 1) < 0.01
    # The test split is the file's own order (t10k labels start 9, 2, 1, 1, 6).
    assert d.y_test[:5].tolist() == [9, 2, 1, 1, 6]
