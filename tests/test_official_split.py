"""HyperKvasir's official split file (``official_splits/2_fold_split.csv``) read as the dataset ships it, and the
project's own split format beside it."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from util.data.transfer import build_dataset, csv_folds


def hyperkvasir_tree(root: Path) -> Path:
    """labeled-images/<tract>/<category>/<class>/<name>.jpg and official_splits/2_fold_split.csv as the dataset
    ships it (';'-separated, bare file names); the same name in two classes tests the class-folder tie-break."""
    rows = [("a1.jpg", "cecum", "lower-gi-tract/anatomical-landmarks", 0),
            ("a2.jpg", "cecum", "lower-gi-tract/anatomical-landmarks", 1),
            ("same.jpg", "polyps", "lower-gi-tract/pathological-findings", 0),
            ("same.jpg", "barretts", "upper-gi-tract/pathological-findings", 1),
            ("b3.jpg", "barretts", "upper-gi-tract/pathological-findings", 1)]
    for i, (name, cls, where, _) in enumerate(rows):
        path = root / "labeled-images" / where / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(path)
    split = root / "official_splits" / "2_fold_split.csv"
    split.parent.mkdir()
    split.write_text("file-name;class-name;split-index\n" + "".join(f"{n};{c};{k}\n" for n, c, _, k in rows))
    return split


def test_hyperkvasir_official_split_is_read_as_it_is(tmp_path):
    split = hyperkvasir_tree(tmp_path)
    root = str(tmp_path / "labeled-images")
    assert csv_folds(root, str(split)) == [0, 1]
    train = build_dataset("folder", root, "train", None, split_file=str(split), fold=1)  # rows of fold 0
    val = build_dataset("folder", root, "val", None, split_file=str(split), fold=1)
    assert train.classes == val.classes == ["barretts", "cecum", "polyps"]
    names = lambda ds: sorted((Path(f).parent.name, Path(f).name, ds.classes[y]) for f, y in ds.samples)
    assert names(train) == [("cecum", "a1.jpg", "cecum"), ("polyps", "same.jpg", "polyps")]
    assert names(val) == [("barretts", "b3.jpg", "barretts"), ("barretts", "same.jpg", "barretts"),
                          ("cecum", "a2.jpg", "cecum")]
    img, label = val[0]
    assert img.size == (8, 8) and isinstance(label, int)


def test_official_split_names_missing_files(tmp_path):
    split = hyperkvasir_tree(tmp_path)
    (tmp_path / "labeled-images" / "lower-gi-tract" / "anatomical-landmarks" / "cecum" / "a2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 5 files .* a2\.jpg"):
        build_dataset("folder", str(tmp_path / "labeled-images"), "val", None, split_file=str(split), fold=1)


def test_project_split_format_still_works(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("p.png", "q.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "x" / name)
    (tmp_path / "s.csv").write_text("file,label,fold\nx/p.png,a,0\nx/q.png,b,1\n")
    val = build_dataset("folder", str(tmp_path), "val", None, split_file="s.csv", fold=1)
    assert [(Path(f).name, val.classes[y]) for f, y in val.samples] == [("q.png", "b")]

