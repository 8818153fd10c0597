"""util/data/transfer.py on tiny fake trees of each on-disk format (no network)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from util.data.transfer import DATASETS, build_dataset, num_classes


def write_image(path: Path, value: int = 128, mode: str = "RGB", size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value, 255 - value, 7)).save(path)
    return path


# ---- folder / imagenet / CSV folds -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_folder_reads_root_split(tmp_path, name):
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            for i in range(n):
                write_image(tmp_path / split / cls / f"{i}.png", 40 * i)
    train = build_dataset(name, str(tmp_path), "train", None)
    val = build_dataset(name, str(tmp_path), "val", None)
    assert (len(train), len(val)) == (6, 2) and train.classes == val.classes == ["cat", "dog"]
    assert train.targets == [0, 0, 0, 1, 1, 1] and num_classes(train) == 2
    img, label = val[1]
    assert img.mode == "RGB" and label == 1
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset(name, str(tmp_path), "test", None)


def write_folds(root: Path) -> Path:
    rows = [("imgs/a.png", "polyp", 1), ("imgs/b.png", "normal", 1), ("imgs/c.png", "ulcer", 2),
            ("imgs/d.png", "polyp", 2), ("imgs/e.png", "polyp", 2)]
    for file, _, _ in rows:
        write_image(root / file)
    csv_path = root / "folds.csv"
    csv_path.write_text("file,label,fold\n" + "".join(f"{f},{lab},{k}\n" for f, lab, k in rows))
    return csv_path


def test_csv_folds(tmp_path):
    csv_path = write_folds(tmp_path)
    train = build_dataset("folder", str(tmp_path), "train", None, split_file=str(csv_path), fold=1)
    val = build_dataset("folder", str(tmp_path), "val", None, split_file="folds.csv", fold=1)  # relative to root
    assert train.classes == val.classes == ["normal", "polyp", "ulcer"]
    assert [Path(p).name for p, _ in train.samples] == ["c.png", "d.png", "e.png"] and train.targets == [2, 1, 1]
    assert [Path(p).name for p, _ in val.samples] == ["a.png", "b.png"] and val.targets == [1, 0]
    test2 = build_dataset("folder", str(tmp_path), "test", None, split_file=str(csv_path), fold=2)
    assert len(test2) == 3 and num_classes(test2) == 3
    assert val[0][0].size == (8, 8)


def test_csv_fold_errors(tmp_path):
    csv_path = write_folds(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build_dataset("folder", str(tmp_path), "train", None, split_file=str(tmp_path / "nope.csv"), fold=1)
    with pytest.raises(ValueError, match="fold 3 does not occur"):
        build_dataset("folder", str(tmp_path), "val", None, split_file=str(csv_path), fold=3)
    with pytest.raises(ValueError, match="needs fold"):
        build_dataset("folder", str(tmp_path), "val", None, split_file=str(csv_path))
    with pytest.raises(ValueError, match="needs a split_file"):
        build_dataset("folder", str(tmp_path), "val", None, fold=1)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,fold\nimgs/a.png,x,1\n")
    with pytest.raises(ValueError, match="file"):
        build_dataset("folder", str(tmp_path), "val", None, split_file=str(bad), fold=1)
    one = tmp_path / "one.csv"
    one.write_text("file,label,fold\nimgs/a.png,x,1\n")
    with pytest.raises(ValueError, match="empty"):  # every row is held out: nothing to train on
        build_dataset("folder", str(tmp_path), "train", None, split_file=str(one), fold=1)


# ---- CIFAR -------------------------------------------------------------------------------------------------------

def write_cifar(root: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        test = "test_batch"
    else:
        folder, files, key = root / "cifar-100-python", ["train"], "fine_labels"
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
        test = "test"
    folder.mkdir(parents=True)
    for i, file in enumerate(files + [test]):
        n = 2 if file != test else 3
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: [(i + j) % 10 for j in range(n)]}
        (folder / file).write_bytes(pickle.dumps(entry))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))


@pytest.mark.parametrize("name,classes,train_len", [("cifar10", 10, 10), ("cifar100", 100, 2)])
def test_cifar_python_batches(tmp_path, monkeypatch, name, classes, train_len):
    write_cifar(tmp_path, name)
    # The md5 sums of the real files cannot be matched by fake ones: skip torchvision's integrity checks.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    train = build_dataset(name, str(tmp_path), "train", None)
    val = build_dataset(name, str(tmp_path), "val", None)
    assert (len(train), len(val)) == (train_len, 3) and num_classes(train) == classes
    assert val.targets == [5 if name == "cifar10" else 1, 6 if name == "cifar10" else 2, 7 if name == "cifar10" else 3]
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 0


def test_cifar_missing_or_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10", str(tmp_path), "train", None)
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match="corrupted"):  # fake files fail torchvision's md5 check
        build_dataset("cifar10", str(tmp_path), "test", None)


# ---- Flowers-102 (scipy .mat files) ------------------------------------------------------------------------------

def write_flowers(base: Path) -> None:
    sio = pytest.importorskip("scipy.io")
    for i in range(1, 7):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", 30 * i)
    sio.savemat(base / "imagelabels.mat", {"labels": np.array([[3, 1, 2, 102, 1, 3]])})
    sio.savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]),
                                     "tstid": np.array([[4, 5, 6]])})


@pytest.mark.parametrize("subdir", ["", "flowers-102"])
def test_flowers_moco_split(tmp_path, subdir):
    write_flowers(tmp_path / subdir)
    train = build_dataset("flowers", str(tmp_path), "train", None)
    test = build_dataset("flowers", str(tmp_path), "test", None)
    assert [Path(p).name for p, _ in train.samples] == ["image_00001.jpg", "image_00002.jpg", "image_00003.jpg"]
    assert train.targets == [2, 0, 1] and test.targets == [101, 0, 2]  # 1-based -> 0-based
    assert num_classes(train) == 102 and train.classes[0] == "pink primrose"
    assert build_dataset("flowers", str(tmp_path), "val", None).targets == test.targets  # no val split: test
    assert train[0][0].mode == "RGB"


def test_flowers_missing_files(tmp_path):
    write_flowers(tmp_path)
    (tmp_path / "setid.mat").unlink()
    with pytest.raises(FileNotFoundError, match="setid.mat"):
        build_dataset("flowers", str(tmp_path), "train", None)
    with pytest.raises(FileNotFoundError, match="imagelabels.mat"):
        build_dataset("flowers", str(tmp_path / "nowhere"), "train", None)


# ---- Pets ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("subdir", ["", "oxford-iiit-pet"])
def test_pets_lists_and_rgb(tmp_path, subdir):
    base = tmp_path / subdir
    write_image(base / "images" / "Abyssinian_1.jpg")
    write_image(base / "images" / "american_bulldog_2.jpg", mode="L")  # greyscale files occur in Pets
    write_image(base / "images" / "Bengal_3.jpg")
    (base / "annotations").mkdir()
    (base / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\namerican_bulldog_2 2 2 1\n")
    (base / "annotations" / "test.txt").write_text("Bengal_3 4 1 3\n")
    train = build_dataset("pets", str(tmp_path), "train", None)
    test = build_dataset("pets", str(tmp_path), "test", None)
    assert train.targets == [0, 1] and test.targets == [3]
    assert train.classes == test.classes == ["Abyssinian", "American Bulldog", "3", "Bengal"]
    assert train[1][0].mode == "RGB"
    (base / "annotations" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        build_dataset("pets", str(tmp_path), "val", None)


# ---- Stanford Cars -----------------------------------------------------------------------------------------------

def test_cars_torchvision_layout(tmp_path):
    sio = pytest.importorskip("scipy.io")
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    for folder, names in (("cars_train", ["00001.jpg", "00002.jpg"]), ("cars_test", ["00001.jpg"])):
        for n in names:
            write_image(base / folder / n)
    record = [("fname", "O"), ("class", "O")]
    sio.savemat(base / "devkit" / "cars_train_annos.mat",
                {"annotations": np.array([("00001.jpg", 2), ("00002.jpg", 1)], dtype=record)})
    sio.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": np.array([("00001.jpg", 3)], dtype=record)})
    sio.savemat(base / "devkit" / "cars_meta.mat",
                {"class_names": np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8"], dtype=object)})
    train = build_dataset("cars", str(tmp_path), "train", None)
    test = build_dataset("cars", str(base), "val", None)  # root may be the stanford_cars folder itself
    assert train.targets == [1, 0] and test.targets == [2] and num_classes(train) == 3
    assert train.classes[1] == "Acura RL Sedan 2012" and Path(test.samples[0][0]).parent.name == "cars_test"
    with pytest.raises(FileNotFoundError, match="devkit"):
        build_dataset("cars", str(tmp_path / "none"), "train", None)


# ---- iNaturalist -------------------------------------------------------------------------------------------------

def test_inat_json(tmp_path):
    files = ["train_val2019/Plants/400/a.jpg", "train_val2019/Plants/401/b.jpg", "train_val2019/Birds/2/c.jpg"]
    for f in files:
        write_image(tmp_path / f)
    cats = [{"id": 2, "name": "Turdus"}, {"id": 400, "name": "Quercus"}, {"id": 401, "name": "Pinus"}]
    train = {"images": [{"id": 10 + i, "file_name": f} for i, f in enumerate(files)],
             "annotations": [{"id": 0, "image_id": 12, "category_id": 2},
                             {"id": 1, "image_id": 10, "category_id": 400},
                             {"id": 2, "image_id": 11, "category_id": 401}],
             "categories": cats}
    val = {"images": [{"id": 5, "file_name": files[1]}], "annotations": [{"id": 0, "image_id": 5, "category_id": 401}]}
    (tmp_path / "train2019.json").write_text(json.dumps(train))
    (tmp_path / "val2019.json").write_text(json.dumps(val))  # no categories: taken from train2019.json
    tr = build_dataset("inat19", str(tmp_path), "train", None)
    te = build_dataset("inat19", str(tmp_path), "test", None)
    assert tr.classes == te.classes == ["Turdus", "Quercus", "Pinus"]
    assert tr.targets == [1, 2, 0] and te.targets == [2]
    assert tr.samples[0][0] == str(tmp_path / files[0]) and tr[2][0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match="train2018.json"):
        build_dataset("inat18", str(tmp_path), "train", None)


# ---- demo and argument errors ------------------------------------------------------------------------------------

def test_demo_has_held_out_split():
    train = build_dataset("demo", "", "train", None)
    val = build_dataset("demo", "unused", "val", None)
    assert train.classes == val.classes and len(train) == len(val) and num_classes(val) == 8
    assert not np.array_equal(train.images, val.images)


def test_argument_errors(tmp_path):
    assert len(DATASETS) == 10
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("svhn", str(tmp_path), "train", None)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("demo", str(tmp_path), "training", None)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        build_dataset("cars", str(tmp_path), "train", None, download=True)
    with pytest.raises(ValueError, match="split_file"):
        build_dataset("cifar10", str(tmp_path), "train", None, split_file="x.csv", fold=0)
    with pytest.raises(ValueError, match="classes"):
        num_classes(object())
