"""Tests for util/data/folder.py: folder resolution, robust RGB loading, the demo dataset, debug subsets, indices,
few-shot subsets."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from util.data.demo import DemoDataset
from util.data.folder import build_folder_dataset, build_pretrain_dataset, CorruptImageError, ImageFileDataset
from util.data.subsets import few_shot_subset, IndexedDataset

IMAGENETTE = Path("/work/shared/data/imagenette")
REPO = Path(__file__).resolve().parents[1]
TO_TENSOR = T.ToTensor()


def _save(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 16, mode: str = "RGB",
          fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), colour)
    img = img.convert(mode) if mode != "RGB" else img
    img.save(path, format=fmt)
    return path


def _jpeg_bytes(colour: tuple[int, int, int] = (10, 200, 60), size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    arr = (np.array(colour, dtype=np.uint8) + rng.integers(0, 40, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def class_tree(tmp_path: Path) -> Path:
    """root/{zebra,apple,mango}/ with 2-3 images each (created out of order), plus a non-image file."""
    root = tmp_path / "root"
    for cls, n in (("zebra", 2), ("apple", 3), ("mango", 2)):
        for i in range(n):
            _save(root / cls / f"img{i}.png", colour=(40 * i, 100, 200))
    (root / "apple" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------- folders


def test_imagefolder_semantics_match_torchvision(class_tree: Path) -> None:
    ds = build_pretrain_dataset(str(class_tree), TO_TENSOR)
    ref = ImageFolder(str(class_tree))
    assert ds.classes == ["apple", "mango", "zebra"] == ref.classes
    assert ds.samples == ref.samples and ds.targets == ref.targets
    img, label = ds[len(ds) - 1]
    assert label == 2 and img.shape == (3, 16, 16)


def test_train_subfolder_is_preferred(class_tree: Path, tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    (top / "train").symlink_to(class_tree)
    _save(top / "val" / "other" / "x.png")
    ds = build_pretrain_dataset(str(top), TO_TENSOR)
    assert ds.classes == ["apple", "mango", "zebra"] and len(ds) == 7
    assert all(Path(p).parts[-3] == "train" for p, _ in ds.samples)


def test_folder_dataset_reads_the_given_split(class_tree: Path, tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    (top / "train").symlink_to(class_tree)
    _save(top / "val" / "apple" / "x.png")
    _save(top / "val" / "kiwi" / "y.png")
    val = build_folder_dataset(str(top / "val"), TO_TENSOR)
    assert val.classes == ["apple", "kiwi"] and val.targets == [0, 1]


def test_real_imagenette_files(tmp_path: Path) -> None:
    if not IMAGENETTE.is_dir():
        pytest.skip("imagenette not available")
    wnids = sorted(os.listdir(IMAGENETTE / "train"))[:3]
    grey = None
    for wnid in wnids:  # two files per class, plus one greyscale file if the class has one among its first 300
        files = sorted((IMAGENETTE / "train" / wnid).iterdir())
        picked = files[:2]
        for f in files[2:300]:
            if grey is None and Image.open(f).mode == "L":
                grey = f
                picked.append(f)
                break
        for f in picked:
            (tmp_path / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / wnid / f.name).symlink_to(f)
    ds = build_pretrain_dataset(str(tmp_path), T.Compose([T.CenterCrop(224), T.ToTensor()]))
    assert ds.classes == wnids and len(ds) == 6 + (grey is not None)
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 224, 224) and ds.classes[label] == Path(ds.samples[i][0]).parent.name
    if grey is not None:
        img, _ = ds[[p for p, _ in ds.samples].index(str(tmp_path / "train" / grey.parent.name / grey.name))]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_flat_folder_gets_label_zero_and_extensions_are_case_insensitive(tmp_path: Path) -> None:
    _save(tmp_path / "b.JPEG", fmt="JPEG")
    _save(tmp_path / "a.png")
    _save(tmp_path / "c.Tiff", fmt="TIFF")
    (tmp_path / "readme.md").write_text("x")
    ds = build_pretrain_dataset(str(tmp_path), TO_TENSOR)
    assert [Path(p).name for p, _ in ds.samples] == ["a.png", "b.JPEG", "c.Tiff"]
    assert ds.targets == [0, 0, 0] and len(ds.classes) == 1
    assert all(ds[i][1] == 0 for i in range(3))


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_pretrain_dataset(str(missing), TO_TENSOR)


@pytest.mark.parametrize("layout", ["empty", "subfolders_without_images"])
def test_no_images_raises_value_error(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if layout == "subfolders_without_images":
        (root / "cls").mkdir()
        (root / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError) as info:
        build_pretrain_dataset(str(root), TO_TENSOR)
    assert str(root) in str(info.value) and ".jpg" in str(info.value)


# ------------------------------------------------------------------------------------------------ bad files


@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    """0.jpg good, 1.jpg truncated JPEG, 2.jpg garbage bytes, 3.jpg good (different colour)."""
    data = _jpeg_bytes()
    (tmp_path / "0.jpg").write_bytes(data)
    (tmp_path / "1.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "2.jpg").write_bytes(b"this is not a jpeg" * 10)
    (tmp_path / "3.jpg").write_bytes(_jpeg_bytes(colour=(200, 10, 10)))
    return tmp_path


def test_corrupt_files_are_logged_and_replaced(bad_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = build_pretrain_dataset(str(bad_folder), TO_TENSOR)
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        img, label = ds[1]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad_folder / "1.jpg") in m for m in messages)  # truncated JPEG
    assert any(str(bad_folder / "2.jpg") in m for m in messages)  # garbage
    assert torch.equal(img, ds[3][0]) and label == 0  # deterministic: the next readable sample
    assert ds.num_skipped == 2
    assert torch.equal(ds[2][0], ds[3][0]) and ds.num_skipped == 3  # known-bad file skipped again


def test_every_file_corrupt_raises(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    ds = build_pretrain_dataset(str(tmp_path), TO_TENSOR)
    with pytest.raises(CorruptImageError, match="no readable image"):
        ds[0]


def test_strict_data_raises_with_path(bad_folder: Path) -> None:
    ds = build_pretrain_dataset(str(bad_folder), TO_TENSOR, strict_data=True)
    assert ds[0][0].shape == (3, 64, 64)
    with pytest.raises(OSError, match="1.jpg"):
        ds[1]


@pytest.mark.parametrize("mode,fmt,name", [("L", "JPEG", "grey.jpg"), ("CMYK", "JPEG", "cmyk.jpg"),
                                           ("P", "PNG", "palette.png"), ("RGBA", "PNG", "rgba.png"),
                                           ("LA", "PNG", "la.png")])
def test_every_mode_loads_as_three_channels(tmp_path: Path, mode: str, fmt: str, name: str) -> None:
    _save(tmp_path / name, colour=(255, 255, 255), mode=mode, fmt=fmt)
    ds = build_pretrain_dataset(str(tmp_path), TO_TENSOR)
    img, _ = ds[0]
    assert img.shape == (3, 16, 16)
    assert img.min() > 0.95  # white stays white in every mode (CMYK JPEGs are stored inverted by Adobe)


def test_palette_with_transparency_loads(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.save(tmp_path / "t.png", transparency=0)
    x, _ = build_pretrain_dataset(str(tmp_path), TO_TENSOR)[0]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------------------------------- debug


def test_debug_subset_is_small_balanced_and_deterministic(tmp_path: Path) -> None:
    for c in range(3):
        for i in range(12):
            _save(tmp_path / f"c{c}" / f"{i:02d}.png", size=4)
    full = build_pretrain_dataset(str(tmp_path), None)
    small = build_pretrain_dataset(str(tmp_path), None, debug=True)
    assert len(full) == 36 and len(small) == 24
    assert np.bincount(small.targets).tolist() == [8, 8, 8]
    assert small.samples == build_pretrain_dataset(str(tmp_path), None, debug=True).samples
    assert set(small.samples) <= set(full.samples)


def test_debug_subset_caps_total_over_many_classes(tmp_path: Path) -> None:
    for c in range(20):
        for i in range(5):
            _save(tmp_path / f"c{c:02d}" / f"{i}.png", size=4)
    small = build_pretrain_dataset(str(tmp_path), None, debug=True)
    counts = np.bincount(small.targets, minlength=20)
    assert len(small) == 64 and counts.max() - counts.min() <= 1  # spread over classes, not 8 classes x 8


def test_demo_pretraining_never_sees_the_evaluation_images() -> None:
    """Whatever --seed a pretraining run uses, it reads the demo train split; evaluation reads val."""
    from util.data.transfer import build_dataset
    pretrain = build_pretrain_dataset("demo", None)
    train, val = (build_dataset("demo", "", split, None) for split in ("train", "val"))
    assert np.array_equal(pretrain.images, train.images)
    assert not {hashlib.sha256(im.tobytes()).digest() for im in pretrain.images} & \
        {hashlib.sha256(im.tobytes()).digest() for im in val.images}


def test_demo_debug_is_small() -> None:
    ds = build_pretrain_dataset("demo", None, debug=True, demo_size=16)
    assert len(ds) <= 64 and len(ds.classes) == 8


# ----------------------------------------------------------------------------------------------------- demo


def _digest(ds: DemoDataset) -> str:
    return hashlib.sha256(ds.images.tobytes()).hexdigest()


def test_demo_is_deterministic_across_builds_and_processes() -> None:
    a, b = DemoDataset(per_class=4, size=32, seed=3), DemoDataset(per_class=4, size=32, seed=3)
    assert np.array_equal(a.images, b.images) and a.targets == b.targets
    assert _digest(a) != _digest(DemoDataset(per_class=4, size=32, seed=4))
    code = ("import hashlib; from util.data.demo import DemoDataset; "
            "print(hashlib.sha256(DemoDataset(per_class=4, size=32, seed=3).images.tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="123")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == _digest(a)


def test_demo_counts_and_types() -> None:
    ds = build_pretrain_dataset("demo", None)
    assert len(ds) == 512 and len(ds.classes) == 8 and len(set(ds.classes)) == 8
    assert np.bincount(ds.targets).tolist() == [64] * 8
    img, label = ds[100]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (64, 64) and label == 1
    x, _ = DemoDataset(num_classes=3, per_class=2, size=48, transform=TO_TENSOR)[0]
    assert x.shape == (3, 48, 48)
    with pytest.raises(ValueError):
        DemoDataset(num_classes=11)


def test_demo_classes_differ_by_shape_not_colour_and_samples_vary() -> None:
    ds = DemoDataset(num_classes=10, per_class=40, size=32)
    x = ds.images.astype(np.float64) / 255
    y = np.array(ds.targets)
    train, test = np.arange(len(ds)) % 2 == 0, np.arange(len(ds)) % 2 == 1

    def nearest_class_mean(features: np.ndarray) -> float:  # fitted on even samples, tested on odd ones
        means = np.stack([features[train & (y == c)].mean(0) for c in range(10)])
        pred = ((features[test][:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        return float((pred == y[test]).mean())

    # colour statistics say nothing about the class (chance is 10 %) ...
    assert nearest_class_mean(x.mean(axis=(1, 2))) < 0.25
    # ... structure does: amplitude spectrum of the standardised grey image (translation invariant), ~75 %
    grey = x.mean(-1)
    grey = (grey - grey.mean((1, 2), keepdims=True)) / grey.std((1, 2), keepdims=True)
    assert nearest_class_mean(np.abs(np.fft.fft2(grey)).reshape(len(ds), -1)) > 0.6
    # not trivial: samples of one class differ from each other
    assert all(x[y == c].std(0).mean() > 0.05 for c in range(10))


# -------------------------------------------------------------------------------------------------- indexed


def test_indexed_dataset_returns_index(class_tree: Path) -> None:
    base = build_pretrain_dataset(str(class_tree), TO_TENSOR)
    ds = IndexedDataset(base)
    assert len(ds) == len(base) and ds.classes == base.classes and ds.targets == base.targets
    for i in (0, 4, len(ds) - 1):
        img, label, index = ds[i]
        assert index == i and label == base.targets[i] and torch.equal(img, base[i][0])
    assert isinstance(base, ImageFileDataset)


def test_few_shot_subset_draws_n_per_class_with_a_seed() -> None:
    ds = DemoDataset(per_class=5, size=8)
    sub = few_shot_subset(ds, n_per_class=3, seed=0)
    assert len(sub) == 24 and np.bincount(sub.targets).tolist() == [3] * 8 and sub.classes == ds.classes
    assert len(set(sub.indices)) == 24 and [ds.targets[j] for j in sub.indices] == sub.targets
    for i, j in enumerate(sub.indices):  # item i of the subset is item indices[i] of the parent
        img, label = sub[i]
        assert np.array_equal(np.asarray(img), ds.images[j]) and label == sub.targets[i]
    assert few_shot_subset(ds, n_per_class=3, seed=0).indices == sub.indices  # deterministic for a seed
    assert few_shot_subset(ds, n_per_class=3, seed=1).indices != sub.indices
    with pytest.raises(ValueError, match=r"8 class\(es\) have fewer than the 6 training samples"):
        few_shot_subset(ds, n_per_class=6, seed=0)
    with pytest.raises(ValueError, match="no 'targets'"):
        few_shot_subset(list(range(4)), n_per_class=1, seed=0)
