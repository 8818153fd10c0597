"""tools/prepare_dataset.py on a tiny tree: sizes capped, quality set, source untouched, resumable."""
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from prepare_dataset import main, prepare, target_size  # noqa: E402


def tree(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    pixels = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    files = {"big": root / "a" / "big.JPEG", "small": root / "a" / "small.jpg", "png": root / "b" / "alpha.png",
             "cmyk": root / "b" / "cmyk.jpg", "bad": root / "b" / "bad.jpg", "txt": root / "b" / "notes.txt"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    pixels(300, 200).save(files["big"], quality=95)
    pixels(60, 40).save(files["small"], quality=95)
    pixels(150, 240).convert("RGBA").save(files["png"])
    pixels(200, 120).convert("CMYK").save(files["cmyk"], quality=95)
    files["bad"].write_bytes(files["big"].read_bytes()[:500])
    files["txt"].write_text("not an image")
    return files


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_target_size_rule():
    assert target_size(300, 200, max_short=100, max_long=None) == (150, 100)
    assert target_size(200, 300, max_short=None, max_long=100) == (67, 100)
    assert target_size(60, 40, max_short=100, max_long=None) == (60, 40)  # never enlarged


def test_resized_copy_of_a_tree(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = tree(src)
    before = digest(src)
    counts = main(["--src", str(src), "--dst", str(dst), "--max_short", "100", "--quality", "75", "--workers", "1",
                   "--no_progress"])
    assert counts == {"written": 3, "copied": 1, "skipped": 0, "unreadable": 1}
    assert digest(src) == before  # the source is only read
    sizes = {p.relative_to(dst).as_posix(): Image.open(p).size for p in dst.rglob("*") if p.is_file()}
    assert sizes == {"a/big.JPEG": (150, 100), "a/small.jpg": (60, 40), "b/alpha.png.jpg": (100, 160),
                     "b/cmyk.jpg": (167, 100)}
    assert (dst / "a" / "small.jpg").read_bytes() == files["small"].read_bytes()  # within the cap: copied
    for name in ("a/big.JPEG", "b/alpha.png.jpg", "b/cmyk.jpg"):
        with Image.open(dst / name) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
    # quality 75 vs 95: the re-encoded file is smaller than one saved at 95 from the same pixels
    with Image.open(dst / "a" / "big.JPEG") as img:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
    assert (dst / "a" / "big.JPEG").stat().st_size < len(buf.getvalue())
    assert "bad.jpg" in capsys.readouterr().err

    # resumable: a rerun writes nothing; a lost output is rewritten alone
    (dst / "b" / "cmyk.jpg").unlink()
    again = prepare(src, dst, max_short=100, quality=75, progress=False)
    assert again == {"written": 1, "copied": 0, "skipped": 3, "unreadable": 1}
    assert not list(dst.rglob("*.tmp"))


def test_refuses_to_write_inside_the_source(tmp_path):
    tree(tmp_path / "src")
    with pytest.raises(ValueError, match="outside"):
        prepare(tmp_path / "src", tmp_path / "src" / "small", max_short=100, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        prepare(tmp_path / "src", tmp_path / "dst", progress=False)


def test_two_workers_write_the_same_files(tmp_path):
    src = tmp_path / "src"
    tree(src)
    prepare(src, tmp_path / "one", max_long=120, workers=1, progress=False)
    prepare(src, tmp_path / "two", max_long=120, workers=2, progress=False)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_a_symlinked_class_folder_is_copied_as_training_reads_it(tmp_path):
    from torchvision.datasets.folder import make_dataset
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere" / "cls_b"
    tree(src)
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (50, 40), (9, 9, 9)).save(elsewhere / "linked.jpg")
    (src / "c").symlink_to(elsewhere, target_is_directory=True)
    # the class folder training's reader (torchvision make_dataset, os.walk followlinks=True) sees
    assert [Path(p).name for p, _ in make_dataset(str(src), {"c": 0}, extensions=(".jpg",))] == ["linked.jpg"]
    (src / "c" / "loop").symlink_to(src, target_is_directory=True)  # a link back up the tree is not a loop
    counts = prepare(src, tmp_path / "dst", max_short=100, progress=False)
    assert counts == {"written": 3, "copied": 2, "skipped": 0, "unreadable": 1}
    assert Image.open(tmp_path / "dst" / "c" / "linked.jpg").size == (50, 40)
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*.*")) == [
        "a/big.JPEG", "a/small.jpg", "b/alpha.png.jpg", "b/cmyk.jpg", "c/linked.jpg"]


def test_two_sources_that_would_share_an_output_are_refused_before_writing(tmp_path, capsys):
    src = tmp_path / "src"
    tree(src)
    Image.new("RGB", (20, 20)).save(src / "b" / "alpha.png.jpg")  # alpha.png also becomes b/alpha.png.jpg
    with pytest.raises(SystemExit) as info:
        main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--max_short", "100", "--no_progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "alpha.png and " in err and "alpha.png.jpg would both be written to" in err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("args, needle", [
    (["--dst", "{src}/inside", "--max_short", "100"], "must lie outside --src"),
    (["--src", "{tmp}/missing", "--max_short", "100"], "is not a folder"),
    (["--max_short", "-5"], "--max_short / --max_long must be a positive number of pixels, got -5"),
    (["--max_long", "0"], "must be a positive number of pixels, got 0"),
    (["--max_short", "100", "--quality", "999"], "--quality must be a JPEG quality in 1..100"),
    (["--max_short", "100", "--quality", "0"], "--quality must be a JPEG quality in 1..100"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, needle):
    src = tmp_path / "src"
    tree(src)
    argv = ["--src", str(src), "--dst", str(tmp_path / "dst"), "--no_progress"]
    argv += [a.format(src=src, tmp=tmp_path) for a in args]  # later --src / --dst win (argparse)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "dst").exists() and not (src / "inside").exists()
