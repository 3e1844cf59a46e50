"""Image folders streamed: decoded batch by batch, fitted to the model (resize, center crop,
normalize), split by file as in-memory folders are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import load_data
from slimkit.data.load import IMAGENET_MEAN, IMAGENET_STD, DataOptions, ModelHints, model_hints
from slimkit.data.split import split_indices

Image = pytest.importorskip("PIL.Image")


def noise_folder(root: Path, per_class: int = 6, size=(6, 5), mode="RGB", classes=("b", "a"),
                 seed: int = 0) -> Path:
    """Images of random pixels (each one distinct), one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"{i}.png")
    return root


def stacked(data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*data.batches(split), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_a_stream_without_a_model_equals_the_folder_in_memory(tmp_path):
    root = noise_folder(tmp_path / "imgs", per_class=7)
    eager = load_data(str(root), seed=4)
    stream = load_data(str(root), seed=4, stream=True, options=DataOptions(batch_size=3))
    assert stream.streaming and stream.num_classes == 2 and stream.input_shape == (3, 5, 6)
    assert stream.meta["class_names"] == ["a", "b"] and stream.meta["mean"] is None
    x, y = stacked(stream, "test")
    torch.testing.assert_close(x, eager.x_test, rtol=0, atol=0)  # the same files, same pixels
    assert y.tolist() == eager.y_test.tolist()
    x, y = stacked(stream, "train")
    order = [int((eager.x_train == xi).flatten(1).all(1).nonzero()) for xi in x]
    assert sorted(order) == list(range(len(eager.x_train))) and order != sorted(order)
    assert y.tolist() == eager.y_train[order].tolist()
    val, _ = stacked(stream, "val")
    vidx = split_indices(eager.y_train, 0.2, seed=0)[1]  # as a DataBundle's val split
    torch.testing.assert_close(val, eager.x_train[vidx], rtol=0, atol=0)
    assert stream.epoch_batches() == 4 and stream.meta["n_train"] == 11


def test_resize_center_crop_and_normalize(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    # 10 wide, 16 high: the shorter side is already 10, so only the crop moves pixels
    grid = np.arange(16 * 10 * 3, dtype=np.uint8).reshape(16, 10, 3)
    Image.fromarray(grid, "RGB").save(root / "a" / "0.png")
    Image.fromarray(grid, "RGB").save(root / "b" / "0.png")
    wide = np.random.default_rng(0).integers(0, 256, (12, 30, 3), dtype=np.uint8)
    Image.fromarray(wide, "RGB").save(root / "a" / "1.png")
    Image.fromarray(wide, "RGB").save(root / "b" / "1.png")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    hints = ModelHints(image_shape=(3, 8, 8), mean=mean, std=std)
    data = load_data(str(root), stream=True, hints=hints, options=DataOptions(image_size=10),
                     test_fraction=0.5)
    x, y = stacked(data, "test")
    x = torch.cat([x, stacked(data, "train")[0]])
    m = torch.tensor(mean, dtype=torch.float64)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    # the grid image: top = round((16 - 8) / 2) = 4, left = round((10 - 8) / 2) = 1
    crop = torch.from_numpy(grid[4:12, 1:9].astype(np.float64) / 255).permute(2, 0, 1)
    want_grid = ((crop - m) / s).float()
    # the wide image: shorter side 12 -> 10 (30 -> 25 wide), then the center 8x8
    small = np.asarray(Image.fromarray(wide, "RGB").resize((25, 10), Image.Resampling.BILINEAR))
    crop = torch.from_numpy(small[1:9, 8:16].astype(np.float64) / 255).permute(2, 0, 1)
    want_wide = ((crop - m) / s).float()
    assert x.shape == (4, 3, 8, 8)
    hits = [min(float((xi - w).abs().max()) for xi in x) for w in (want_grid, want_wide)]
    assert max(hits) < 1e-6, hits


def test_images_are_opened_batch_by_batch(tmp_path, monkeypatch):
    root = noise_folder(tmp_path / "imgs", per_class=10, size=(9, 7))
    opened: list[str] = []
    real = Image.open

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    hints = ModelHints(image_shape=(3, 4, 4))
    data = load_data(str(root), stream=True, hints=hints, options=DataOptions(batch_size=5))
    assert opened == []  # the model says the size: loading lists the files, opens none
    it = data.batches("train")
    x, _ = next(it)
    assert len(opened) == 5 and x.shape == (5, 3, 4, 4)
    next(it)
    assert len(opened) == 10
    data.calibration(4)
    assert len(opened) == 15  # one more batch, no further
    load_data(str(root), stream=True)
    assert len(opened) == 16  # without a model only the first image is opened, for its size


def test_the_model_decides_channels_classes_and_statistics(tmp_path):
    root = noise_folder(tmp_path / "imgs", per_class=5, classes=("cat", "dog"))
    gray = ModelHints(image_shape=(1, 5, 6), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      label2id={"dog": 0, "cat": 1, "bird": 2})
    data = load_data(str(root), stream=True, hints=gray, test_fraction=0.4)
    x, y = next(data.batches("test"))
    assert x.shape[1:] == (1, 5, 6) and data.meta["mean"] == (float(np.mean(IMAGENET_MEAN)),)
    eager = load_data(str(root), hints=gray, test_fraction=0.4)  # the same prep in memory
    torch.testing.assert_close(x, eager.x_test, rtol=0, atol=0)
    # dog is class 0 for this model, though 'cat' sorts first
    names = sorted(p.parent.name for p in root.rglob("*.png"))
    labels = torch.tensor([1 if n == "cat" else 0 for n in names])
    assert y.tolist() == labels[split_indices(labels, 0.4, 0)[1]].tolist()
    assert data.num_classes == 2
    with pytest.raises(DataError, match=r"takes images of 4 channels; an image folder gives 1"):
        load_data(str(root), stream=True, hints=ModelHints(name="m", image_shape=(4, 5, 6)))


def test_hf_vision_hints_read_the_preprocessor(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimkit.io.hf import load_hf_dir
    from slimkit.measure import check_fits

    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, num_labels=2)
    path = tmp_path / "vit"
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(str(path))
    model = load_hf_dir(path)
    hints = model_hints(model, str(path))
    assert hints.image_shape == (3, 8, 8) and hints.kind == "classifier"
    assert hints.mean == IMAGENET_MEAN and hints.std == IMAGENET_STD and hints.resize is None
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
         "size": {"shortest_edge": 9}}))
    hints = model_hints(model, str(path))
    assert hints.mean == (0.5,) * 3 and hints.resize == 9
    data = load_data(str(noise_folder(tmp_path / "imgs", size=(12, 10))), stream=True,
                     hints=hints)
    check_fits(model, data)
    x, _ = next(data.batches("test"))
    assert list(x) == ["pixel_values"]  # the model's keyword
    x = x["pixel_values"]
    assert x.shape[1:] == (3, 8, 8) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    eager = load_data(str(tmp_path / "imgs"), hints=hints)  # in memory: named the same
    torch.testing.assert_close(eager.x_test["pixel_values"], x, rtol=0, atol=0)


def test_an_unreadable_image_is_named_when_its_batch_is_read(tmp_path):
    root = noise_folder(tmp_path / "imgs", per_class=4)
    bad = root / "a" / "3.png"
    bad.write_bytes(bad.read_bytes()[:-40])
    data = load_data(str(root), stream=True, test_fraction=0.5,
                     options=DataOptions(batch_size=1))
    with pytest.raises(DataError) as err:
        for _ in data.batches("train"):
            pass
        for _ in data.batches("test"):
            pass
    assert str(err.value).startswith(f"cannot read image {bad}: ")
