"""User data on disk: npz archives, image folders, Hugging Face folders, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import load_data


def test_npz_round_trip_with_given_test_split(write_npz):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 2, 3)), np.array([0, 1, 2] * 4)
    xt, yt = rng.normal(size=(5, 2, 3)).astype(np.float32), np.array([2, 1, 0, 0, 1])
    path = write_npz(x=x, y=y, x_test=xt, y_test=yt)
    data = load_data(str(path))
    assert data.name == str(path) and data.meta["split"] == "given"
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    torch.testing.assert_close(data.x_train, torch.from_numpy(x).float(), rtol=0, atol=0)
    torch.testing.assert_close(data.x_test, torch.from_numpy(xt), rtol=0, atol=0)
    assert data.y_train.tolist() == y.tolist() and data.y_test.tolist() == yt.tolist()
    assert data.num_classes == 3 and data.input_shape == (2, 3)


def test_npz_without_test_split_is_split_by_seed(write_npz, small_xy):
    path = write_npz(x=small_xy[0], y=small_xy[1])
    a, b = load_data(str(path), seed=5), load_data(str(path), seed=5)
    assert len(a.x_test) == 8 and len(a.x_train) == 32
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_test, load_data(str(path), seed=6).x_test)
    assert a.meta["split_seed"] == 5


def test_npz_uint8_pixels_are_scaled_and_int_tokens_kept(write_npz):
    y = np.array([0, 1] * 3)
    pix = load_data(str(write_npz("p.npz", x=np.full((6, 4), 255, np.uint8), y=y)))
    assert pix.x_train.dtype == torch.float32 and float(pix.x_train.max()) == 1.0
    tok = load_data(str(write_npz("t.npz", x=np.arange(24, dtype=np.int32).reshape(6, 4), y=y)))
    assert tok.x_train.dtype == torch.int64


def test_npz_object_array_needs_trust_pickle(write_npz):
    rows = np.empty(4, dtype=object)
    for i in range(4):
        rows[i] = np.full(3, float(i))
    path = write_npz(x=rows, y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError) as err:
        load_data(str(path))
    assert "--trust-pickle" in str(err.value) and "'x'" in str(err.value)
    data = load_data(str(path), trust_pickle=True)
    assert len(data.x_train) + len(data.x_test) == 4 and data.input_shape == (3,)


def test_npz_missing_keys_and_corrupt_file(write_npz, tmp_path):
    with pytest.raises(DataError, match=r"lacks \['y'\].*Found: \['x'\]"):
        load_data(str(write_npz(x=np.zeros((3, 2)))))
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="broken.npz"):
        load_data(str(bad))


def test_npz_half_given_test_split(write_npz):
    path = write_npz(x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]), x_test=np.zeros((2, 2)))
    with pytest.raises(DataError, match="x_test.*without y_test"):
        load_data(str(path))


def _png(path, color, size=(4, 3), mode="L"):
    image = pytest.importorskip("PIL.Image")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.new(mode, size, color).save(path)


def test_image_folder_grayscale(tmp_path):
    root = tmp_path / "imgs"
    for i in range(5):
        _png(root / "zebra" / f"{i}.png", 255)
        _png(root / "ant" / f"{i}.png", 0)
    (root / "ant" / "README.txt").write_text("ignored")
    data = load_data(str(root), seed=0, test_fraction=0.4)
    assert data.meta["class_names"] == ["ant", "zebra"]  # sorted: ant=0, zebra=1
    assert data.input_shape == (1, 3, 4) and data.num_classes == 2
    assert len(data.x_train) == 6 and len(data.x_test) == 4
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    assert torch.all(x[y == 0] == 0.0) and torch.all(x[y == 1] == 1.0)


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a" / "0.png", 128)
    _png(root / "a" / "1.png", 128)
    _png(root / "b" / "0.png", (255, 0, 0), mode="RGB")
    _png(root / "b" / "1.png", (255, 0, 0), mode="RGB")
    data = load_data(str(root), test_fraction=0.5)
    assert data.input_shape == (3, 3, 4) and data.meta["color"] == "rgb"
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    red = x[y == 1][0]
    assert torch.all(red[0] == 1.0) and torch.all(red[1:] == 0.0)
    torch.testing.assert_close(x[y == 0], torch.full((2, 3, 3, 4), 128 / 255), rtol=0, atol=1e-6)


def test_image_folder_size_mismatch_names_the_file(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a" / "0.png", 0)
    _png(root / "a" / "1.png", 0, size=(5, 5))
    _png(root / "b" / "0.png", 0)
    with pytest.raises(DataError) as err:
        load_data(str(root))
    assert "1.png" in str(err.value) and "5x5" in str(err.value) and "4x3" in str(err.value)


def test_image_folder_structure_errors(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "x.png", 0)
    (flat / "x.png").rename(tmp_path / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(str(flat))
    root = tmp_path / "imgs"
    _png(root / "a" / "0.png", 0)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_data(str(root))
    (root / "empty" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_data(str(root))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError) as err:
        load_data(str(missing))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_bare_builtin_name_gets_a_hint():
    with pytest.raises(DataError, match="Did you mean 'builtin:mnist'"):
        load_data("mnist")


@pytest.mark.parametrize("spec", ["hf:mnist", "https://example.com/data.npz", ""])
def test_unsupported_specs_list_accepted_forms(spec):
    with pytest.raises(DataError) as err:
        load_data(spec)
    assert "builtin:NAME" in str(err.value) and ".npz" in str(err.value)


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("1,2\n")
    with pytest.raises(DataError, match=r"data.txt.*\.txt.*Accepted"):
        load_data(str(f))


def test_truncated_image_is_named(tmp_path):
    image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    _png(root / "a" / "0.png", 0)
    (root / "b").mkdir()
    bad = root / "b" / "0.png"
    image.effect_noise((4, 3), 50).convert("L").save(bad)
    bad.write_bytes(bad.read_bytes()[:-30])  # the header reads, the pixels do not
    with pytest.raises(DataError) as err:
        load_data(str(root))
    assert str(err.value) == (f"cannot read image {bad}: image file is truncated; re-save or "
                              "remove it")


def test_a_device_is_not_data():
    with pytest.raises(DataError) as err:
        load_data("/dev/null")  # exists, but is neither a file nor a folder; only stat-ed here
    assert str(err.value).startswith(
        "data path '/dev/null' is neither a regular file nor a folder (a device, pipe or "
        "socket?). Accepted: 'builtin:NAME'")
