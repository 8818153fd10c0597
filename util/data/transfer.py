"""Datasets for transfer fine-tuning, linear probing and k-NN: ImageNet-style folders, CIFAR, Flowers, Pets, Cars,
iNaturalist, cross-validation folds from a CSV, and the synthetic demo set. Local files only; nothing is fetched
unless ``download=True`` (CIFAR, Flowers, Pets, through torchvision).

Splits follow the recipes we reproduce:
- CIFAR-10/100, Flowers-102, Oxford-IIIT Pets: MoCo v3's ``transfer/datasets.py`` (Chen et al., ICCV 2021;
  github.com/facebookresearch/moco-v3). Flowers train = ``trnid`` + ``valid`` (2040 images), test = ``tstid``
  (6149), labels 1-based in ``imagelabels.mat``; Pets ``trainval.txt`` (3680) / ``test.txt`` (3669), label =
  class id - 1. These sets have no separate validation split, so ``'val'`` means the test split.
- Stanford Cars: torchvision's ``StanfordCars`` layout and label rule (class - 1); iNaturalist 2018/2019: the
  official JSON annotations (``images[].file_name`` relative to the root, ``annotations[].category_id``), as in
  DeiT's ``INatDataset`` (github.com/facebookresearch/deit ``datasets.py``) used by dBOT; ``'test'`` means
  ``val`` (the test labels were never released).
- Medical k-fold protocols (HyperKvasir 2-fold, GastroVision, as in the MAE-on-GastroVision
  report): a CSV with columns ``file,label,fold``,
  or HyperKvasir's own ``official_splits/2_fold_split.csv`` as it is (``file-name;class-name;split-index``).

File-list datasets are ``util.data.folder.ImageFileDataset`` (RGB conversion, corrupt files reported and skipped).
Every missing annotation file or folder raises ``FileNotFoundError`` naming it; an empty split raises ValueError.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, Flowers102, OxfordIIITPet

from util.data.demo import DEMO_SEEDS, DemoDataset

from util.data.folder import build_folder_dataset, ImageFileDataset

from util.data.subsets import few_shot_subset

logger = logging.getLogger("vitfreeze")

__all__ = ["DATASETS", "SPLITS", "build_dataset", "build_splits", "class_names", "num_classes", "csv_folds"]

DATASETS = ("folder", "imagenet", "cifar10", "cifar100", "flowers", "pets", "cars", "inat18", "inat19", "demo")
SPLITS = ("train", "val", "test")
_DOWNLOADABLE = ("cifar10", "cifar100", "flowers", "pets")


def build_dataset(name: str, root: str, split: str, transform: Callable | None, *, download: bool = False,
                  split_file: str | None = None, fold: int | None = None) -> Dataset:
    """A classification dataset of (image, label) items with ``.classes`` and ``.targets``.

    Args:
        name: one of ``DATASETS``.
        root: dataset folder (unused for ``'demo'``); the layouts are described per dataset in the module docs.
        split: ``'train'``, ``'val'`` or ``'test'``; datasets without a validation split map ``'val'`` to their
            test split (CIFAR, Flowers, Pets, Cars) and iNaturalist maps ``'test'`` to ``val``.
        transform: applied to each PIL RGB image.
        download: fetch CIFAR / Flowers / Pets into ``root`` with torchvision if missing (others: ValueError).
        split_file: ``name='folder'`` only: CSV with columns ``file,label,fold`` (file relative to ``root``);
            ``'train'`` = rows whose fold differs from ``fold``, ``'val'`` / ``'test'`` = rows of fold ``fold``.
        fold: the held-out fold of ``split_file``.

    Returns:
        The dataset; ``classes[label]`` names a label, ``targets[i]`` is the label of item i.

    Raises:
        ValueError: unknown name or split, options that do not apply, or an empty split.
        FileNotFoundError: a split folder, annotation file or CSV is missing (its path is in the message).
        ImportError: Flowers / Cars need scipy to read their ``.mat`` files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split_file is not None and name != "folder":
        raise ValueError(f"split_file applies to name='folder' only, got name={name!r}")
    if fold is not None and split_file is None:
        raise ValueError("fold needs a split_file (CSV with columns file,label,fold)")
    if download and name not in _DOWNLOADABLE:
        raise ValueError(f"{name!r} cannot be downloaded here (only {_DOWNLOADABLE}); place the files under {root!r}")
    root = os.path.expanduser(str(root))
    if name == "demo":
        dataset = DemoDataset(seed=DEMO_SEEDS[split], transform=transform)
    elif name in ("folder", "imagenet"):
        dataset = (_csv_folds(root, split, transform, split_file, fold) if split_file is not None
                   else build_folder_dataset(os.path.join(root, split), transform))
    elif name in ("cifar10", "cifar100"):
        dataset = _cifar(name, root, split, transform, download)
    else:
        build = {"flowers": _flowers, "pets": _pets, "cars": _cars, "inat18": _inat, "inat19": _inat}[name]
        dataset = build(root, split, transform, download=download, year=2018 if name == "inat18" else 2019)
    if len(dataset) == 0:
        raise ValueError(f"dataset {name!r} split {split!r} under {root!r} is empty")
    if name not in ("folder", "imagenet") or split_file is not None:  # build_folder_dataset logged the folder's
        where = "generated in memory" if name == "demo" else root
        logger.info("dataset %s/%s: %d images, %d classes (%s)", name, split, len(dataset), num_classes(dataset),
                    where, extra={"preflight": "data"})
    return dataset


def build_splits(name: str, root: str, *, train_transform: Callable | None, eval_transform: Callable | None,
                 download: bool = False, split_file: str | None = None, fold: int | None = None,
                 train_per_class: int = 0, seed: int = 0, nb_classes: int | None = None,
                 test_split: bool = True) -> tuple[Dataset, dict[str, Dataset], list[str]]:
    """Training set, evaluation sets (``val``; ``test`` too for a folder tree that has one) and class names.

    Args:
        name, root, download, split_file, fold: as in :func:`build_dataset`.
        train_transform, eval_transform: for the training split and for the evaluation splits.
        train_per_class: keep N training images per class (0: all), the same draw for the same ``seed``
            (few labels, the semi-supervised protocol; ``util.data.subsets.few_shot_subset``).
        nb_classes: the number of classes the caller expects (None: whatever the data has).
        test_split: also load ``test`` where a folder tree has one (False: ``val`` only).

    Raises:
        ValueError: the splits disagree on their classes, ``nb_classes`` differs from the data's classes, or a
            class has fewer than ``train_per_class`` images.
    """
    def load(split: str, transform: Callable | None) -> Dataset:
        return build_dataset(name, root, split, transform, download=download, split_file=split_file, fold=fold)

    train_set = load("train", train_transform)
    if train_per_class:
        try:
            train_set = few_shot_subset(train_set, n_per_class=train_per_class, seed=seed)
        except ValueError as err:
            raise ValueError(f"--train_per_class {train_per_class}: {err}") from err
    splits = ["val"] + (["test"] if test_split and name in ("folder", "imagenet") and not split_file
                        and (Path(root) / "test").is_dir() else [])
    eval_sets = {split: load(split, eval_transform) for split in splits}
    names = class_names(train_set)
    for split, dataset in eval_sets.items():
        other = class_names(dataset)
        if other != names:
            raise ValueError(f"{split} and train classes differ under {root} ({len(other)} vs {len(names)}): "
                             f"only in train {sorted(set(names) - set(other))[:8]}, only in {split} "
                             f"{sorted(set(other) - set(names))[:8]}")
    if nb_classes is not None and nb_classes != len(names):
        raise ValueError(f"--nb_classes {nb_classes} does not match the data: {name} under {root!r} has "
                         f"{len(names)} classes")
    return train_set, eval_sets, names


def labelled_splits(name: str, root: str, *, train_transform: Callable | None, eval_transform: Callable | None,
                    nb_classes: int | None = None) -> tuple[Dataset, Dataset, int]:
    """``train`` and ``val`` of a dataset and its number of classes, checked against each other and against
    ``nb_classes`` (:func:`build_splits` without ``test``): the k-NN and linear-probe splits."""
    train_set, eval_sets, names = build_splits(name, root, train_transform=train_transform,
                                               eval_transform=eval_transform, nb_classes=nb_classes,
                                               test_split=False)
    return train_set, eval_sets["val"], len(names)


def class_names(dataset: Dataset) -> list[str]:
    """``dataset.classes`` as strings, else the class indices as strings."""
    names = getattr(dataset, "classes", None)
    return [str(n) for n in names] if names else [str(c) for c in range(num_classes(dataset))]


def num_classes(dataset: Dataset) -> int:
    """Number of classes: ``len(dataset.classes)``, else ``max(dataset.targets) + 1``.

    Raises:
        ValueError: the dataset has neither attribute.
    """
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets):
        return int(max(targets)) + 1
    raise ValueError(f"{type(dataset).__name__} has no 'classes' or 'targets' to count classes from")


# ---- helpers -----------------------------------------------------------------------------------------------------

def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _base(root: str, subdir: str, marker: str) -> Path:
    """``root`` if it holds ``marker``, else ``root/subdir`` (torchvision's layout) if that does."""
    for base in (Path(root), Path(root) / subdir):
        if (base / marker).exists():
            return base
    raise FileNotFoundError(f"{marker} not found: {Path(root) / marker} (nor {Path(root) / subdir / marker})")


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError(f"reading {path} needs scipy: pip install scipy") from err
    return loadmat(str(path), squeeze_me=True)


def _ints(values: Any) -> list[int]:
    return np.atleast_1d(values).astype(np.int64).tolist()  # squeeze_me turns 1-element arrays into scalars


# ---- CIFAR -------------------------------------------------------------------------------------------------------

def _cifar(name: str, root: str, split: str, transform: Callable | None, download: bool) -> Dataset:
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = Path(root) / cls.base_folder
    if not download and not folder.is_dir():
        raise FileNotFoundError(f"{name} folder not found: {folder} (torchvision's python-batch layout; "
                                "add --download to fetch it)")
    try:
        return cls(root, train=split == "train", transform=transform, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted" (a file is missing or its md5 differs)
        raise ValueError(f"{name} files in {folder} are incomplete or corrupted: {err}") from err


# ---- Flowers-102 -------------------------------------------------------------------------------------------------

def _flowers(root: str, split: str, transform: Callable | None, *, download: bool, **_: Any) -> ImageFileDataset:
    if download:
        Flowers102(root, split="train", download=True)  # fetches into root/flowers-102
    base = _base(root, "flowers-102", "imagelabels.mat")
    images = _require(base / "jpg", "Flowers-102 image folder")
    labels = _ints(_loadmat(base / "imagelabels.mat")["labels"])
    set_ids = _loadmat(_require(base / "setid.mat", "Flowers-102 split file"))
    keys = ("trnid", "valid") if split == "train" else ("tstid",)  # MoCo v3: train on train + val
    ids = [i for key in keys for i in _ints(set_ids[key])]
    samples = [(str(images / f"image_{i:05d}.jpg"), labels[i - 1] - 1) for i in ids]
    classes = list(getattr(Flowers102, "classes", []))
    if len(classes) <= max(labels) - 1:
        classes = [str(c) for c in range(1, max(labels) + 1)]
    return ImageFileDataset(samples, classes, transform)


# ---- Oxford-IIIT Pets --------------------------------------------------------------------------------------------

def _read_pets_list(path: Path) -> list[tuple[str, int]]:
    """Lines ``Abyssinian_100 1 1 1`` (image id, class id 1..37, species, breed) -> (image id, class id - 1)."""
    entries = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            image_id, label = line.split()[:2]
            entries.append((image_id, int(label) - 1))
    return entries


def _pets(root: str, split: str, transform: Callable | None, *, download: bool, **_: Any) -> ImageFileDataset:
    if download:
        OxfordIIITPet(root, split="trainval", download=True)  # fetches into root/oxford-iiit-pet
    base = _base(root, "oxford-iiit-pet", "annotations")
    images = _require(base / "images", "Pets image folder")
    entries = _read_pets_list(_require(base / "annotations" / ("trainval.txt" if split == "train" else "test.txt"),
                                       "Pets split file"))
    # Class names from both split files (torchvision's rule: breed from the image id), so train and test agree.
    named = {label: image_id.rsplit("_", 1)[0] for f in ("trainval.txt", "test.txt")
             if (base / "annotations" / f).exists() for image_id, label in _read_pets_list(base / "annotations" / f)}
    classes = [" ".join(p.title() for p in named[c].split("_")) if c in named else str(c + 1)
               for c in range(max(named) + 1)] if named else []
    return ImageFileDataset([(str(images / f"{image_id}.jpg"), label) for image_id, label in entries], classes,
                            transform)


# ---- Stanford Cars -----------------------------------------------------------------------------------------------

def _cars(root: str, split: str, transform: Callable | None, **_: Any) -> ImageFileDataset:
    base = _base(root, "stanford_cars", "devkit")
    if split == "train":
        annotations, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annotations, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    _require(images, "Stanford Cars image folder")
    records = np.atleast_1d(_loadmat(_require(annotations, "Stanford Cars annotation file"))["annotations"])
    samples = [(str(images / str(r["fname"])), int(r["class"]) - 1) for r in records]
    meta = _loadmat(_require(base / "devkit" / "cars_meta.mat", "Stanford Cars class names"))
    classes = [str(c) for c in np.atleast_1d(meta["class_names"]).tolist()]
    return ImageFileDataset(samples, classes, transform)


# ---- iNaturalist 2018 / 2019 -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    with open(_require(path, "iNaturalist annotation file")) as handle:
        return json.load(handle)


def _inat(root: str, split: str, transform: Callable | None, *, year: int, **_: Any) -> ImageFileDataset:
    data = _read_json(Path(root) / f"{'train' if split == 'train' else 'val'}{year}.json")
    images, annotations = data.get("images", []), data.get("annotations", [])
    if annotations and "image_id" in annotations[0]:
        category_of = {a["image_id"]: a["category_id"] for a in annotations}
        categories = [category_of.get(img["id"]) for img in images]
    elif len(annotations) == len(images):
        categories = [a["category_id"] for a in annotations]
    else:
        raise ValueError(f"iNaturalist {year} {split}: {len(images)} images but {len(annotations)} annotations")
    # Class index = rank of the category id among the training categories (ids are 0..N-1 in both years).
    source = data if data.get("categories") or split == "train" else _read_json(Path(root) / f"train{year}.json")
    names = {c["id"]: str(c.get("name", c["id"])) for c in source.get("categories", [])}
    if not names:
        names = {a["category_id"]: str(a["category_id"]) for a in source.get("annotations", []) + annotations}
    index = {cid: i for i, cid in enumerate(sorted(names))}
    missing = {c for c in categories if c not in index}
    if missing:
        raise ValueError(f"iNaturalist {year} {split}: images without a known category: {sorted(missing)[:8]}")
    samples = [(os.path.join(root, img["file_name"]), index[c]) for img, c in zip(images, categories)]
    return ImageFileDataset(samples, [names[cid] for cid in sorted(names)], transform)


# ---- folds from a CSV (medical protocols) --------------------------------------------------------------------------

def csv_folds(root: str, split_file: str) -> list[int]:
    """The distinct folds of a ``file,label,fold`` CSV, sorted (the file is found as ``build_dataset`` finds it).

    Raises:
        FileNotFoundError: no such file (neither as given nor under ``root``).
        ValueError: a column is missing or a fold is not an integer.
    """
    return sorted(set(_read_split_file(root, split_file)[2]))


# HyperKvasir's official split (github.com/simula/hyper-kvasir ``official_splits/2_fold_split.csv``) is read as it
# is: ';'-separated, header ``file-name;class-name;split-index``, file names without their folder.
SPLIT_COLUMNS = {"file-name": "file", "class-name": "label", "split-index": "fold"}


def _read_split_file(root: str, split_file: str) -> tuple[Path, list[dict[str, str]], list[int]]:
    """(resolved path, rows, fold of each row) of a split CSV; relative paths may be under root.

    Two formats: the project's ``file,label,fold`` (comma-separated) and HyperKvasir's official
    ``file-name;class-name;split-index`` (semicolon-separated); rows come back with the keys file, label, fold.
    """
    path = Path(split_file)
    if not path.exists() and (Path(root) / split_file).exists():
        path = Path(root) / split_file
    _require(path, "split file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        header = handle.readline()
        handle.seek(0)
        delimiter = ";" if header.count(";") > header.count(",") else ","
        reader = csv.DictReader(handle, delimiter=delimiter)
        fields = [SPLIT_COLUMNS.get(name.strip().lower(), name.strip()) for name in reader.fieldnames or []]
        missing = {"file", "label", "fold"} - set(fields)
        if missing:
            raise ValueError(f"split file {path} lacks column(s) {sorted(missing)}; header: {reader.fieldnames} "
                             "(expected file,label,fold or HyperKvasir's file-name;class-name;split-index)")
        reader.fieldnames = fields
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    try:
        folds = [int(row["fold"]) for row in rows]
    except ValueError as err:
        raise ValueError(f"split file {path}: fold values must be integers ({err})") from err
    return path, rows, folds


def _locate(root: str, rows: list[dict[str, str]], path: Path) -> list[str]:
    """File of each row: ``root/file`` when it exists, else found by name under ``root`` (HyperKvasir's split names
    bare files that sit in ``<gi-tract>/<category>/<class>/``; a name found twice is taken from its class folder).

    Raises:
        FileNotFoundError: some files are nowhere under ``root`` (the message counts them and names a few).
    """
    direct = [os.path.join(root, row["file"]) for row in rows]
    if all(os.path.exists(f) for f in direct):
        return direct
    found: dict[str, list[str]] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            found.setdefault(name, []).append(os.path.join(folder, name))
    out, lost = [], []
    for row, first in zip(rows, direct):
        candidates = [first] if os.path.exists(first) else found.get(os.path.basename(row["file"]), [])
        if len(candidates) > 1:
            candidates = [c for c in candidates if Path(c).parent.name == row["label"]] or candidates
        if not candidates:
            lost.append(row["file"])
        out.append(candidates[0] if candidates else "")
    if lost:
        raise FileNotFoundError(f"{len(lost)} of {len(rows)} files of split file {path} are not under {root}: "
                                f"{', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}")
    return out


def _csv_folds(root: str, split: str, transform: Callable | None, split_file: str,
               fold: int | None) -> ImageFileDataset:
    if fold is None:
        raise ValueError(f"split_file {split_file!r} needs fold=K (the held-out fold)")
    path, rows, folds = _read_split_file(root, split_file)
    if fold not in folds:
        raise ValueError(f"fold {fold} does not occur in {path}; folds: {sorted(set(folds))}")
    classes = sorted({row["label"] for row in rows})  # over all rows, so every fold uses the same labels
    index = {name: i for i, name in enumerate(classes)}
    keep = (lambda f: f != fold) if split == "train" else (lambda f: f == fold)
    files = _locate(root, rows, path)
    samples = [(file, index[row["label"]]) for file, row, f in zip(files, rows, folds) if keep(f)]
    return ImageFileDataset(samples, classes, transform)
