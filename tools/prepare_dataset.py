"""Write a resized JPEG copy of an image folder tree (an ImageFolder, or any tree of images), as fast MAE
pipelines do before training: decode cost grows with the stored pixels, and ImageNet keeps photos of up to
several megapixels for 224-pixel crops.

- Every image under ``--src`` (symlinked folders followed, as torchvision's ``make_dataset`` that reads the
  result follows them) goes to the same relative path under ``--dst`` (non-JPEG names get ``.jpg`` appended; two
  sources that would share an output, ``a.png`` and ``a.png.jpg``, are refused before anything is written), as
  RGB JPEG at ``--quality``, its shorter side capped at ``--max_short`` (or its longer side at
  ``--max_long``), aspect ratio kept, never enlarged. A JPEG already within the cap is copied byte for byte (no
  second generation of compression loss). Decoding uses libjpeg's DCT scaling where it shrinks 2x or more
  (``PIL.Image.draft``) and Pillow's antialiased resize for the rest.
- Resumable: a file is written to a temporary name and renamed, so an output that exists is complete; a rerun
  skips it. The source is only read (``--dst`` inside ``--src`` or the other way round is refused).
- Unreadable files are reported and skipped (their count is printed); non-image files are ignored.
- A progress bar (tqdm), and ``--workers`` processes.

Example: ``python tools/prepare_dataset.py --src ~/imagenet --dst ~/imagenet_s320 --max_short 320 --quality 90``.
Prints one JSON line with the counts at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from util.data.folder import _DECODE_ERRORS, IMG_EXTENSIONS  # noqa: E402

JPEG_SUFFIXES = (".jpg", ".jpeg")


def target_size(width: int, height: int, *, max_short: int | None, max_long: int | None) -> tuple[int, int]:
    """(width, height) with the capped side at most its cap, aspect ratio kept (rounded), never enlarged."""
    side, cap = (min(width, height), max_short) if max_short else (max(width, height), max_long)
    if not cap or side <= cap:
        return width, height
    scale = cap / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_path(src_root: Path, dst_root: Path, path: Path) -> Path:
    rel = path.relative_to(src_root)
    return dst_root / (rel if rel.suffix.lower() in JPEG_SUFFIXES else rel.with_name(rel.name + ".jpg"))


def convert_one(path: Path, out: Path, *, max_short: int | None, max_long: int | None, quality: int) -> str:
    """Write ``out`` from ``path``; returns 'written', 'copied', 'skipped' (exists) or 'unreadable: <error>'."""
    if out.exists():
        return "skipped"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with Image.open(path) as img:
            size = target_size(*img.size, max_short=max_short, max_long=max_long)
            if size == img.size and img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.load()  # a corrupt or truncated file is reported, not copied
                shutil.copyfile(path, tmp)
                os.replace(tmp, out)
                return "copied"
            if img.format == "JPEG":
                img.draft(img.mode, size)  # DCT scaling: decodes at 1/2..1/8 while still >= size
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
            if img.size != size:
                img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
            img.save(tmp, "JPEG", quality=quality)
        os.replace(tmp, out)
        return "written"
    except _DECODE_ERRORS as err:
        tmp.unlink(missing_ok=True)
        return f"unreadable: {err!r}"


def _job(args: tuple) -> tuple[str, str]:
    path, out, kwargs = args
    return str(path), convert_one(path, out, **kwargs)


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, through symlinked folders too (``os.walk(followlinks=True)``, as torchvision's
    ``make_dataset``), each real folder visited once (a link back up the tree is not a loop)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMG_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def check_outputs(jobs: list[tuple]) -> None:
    """Two sources may not map to one output (``a.png`` -> ``a.png.jpg`` beside a JPEG named ``a.png.jpg``)."""
    first: dict[Path, Path] = {}
    for path, out, _ in jobs:
        if out in first:
            raise ValueError(f"{first[out]} and {path} would both be written to {out}: rename one of them")
        first[out] = path


def check_options(*, max_short: int | None, max_long: int | None, quality: int) -> None:
    if (max_short is None) == (max_long is None):
        raise ValueError("give exactly one of --max_short and --max_long")
    cap = max_short if max_short is not None else max_long
    if cap < 1:
        raise ValueError(f"--max_short / --max_long must be a positive number of pixels, got {cap}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be a JPEG quality in 1..100 (PIL advises at most 95), got {quality}")


def prepare(src: str | Path, dst: str | Path, *, max_short: int | None = None, max_long: int | None = None,
            quality: int = 90, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Copy ``src`` to ``dst`` resized (see the module docstring); returns counts per outcome."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    check_options(max_short=max_short, max_long=max_long, quality=quality)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    if src == dst or src in dst.parents or dst in src.parents:
        raise ValueError(f"--dst {dst} must lie outside --src {src} (and not contain it): the source is read only")
    kwargs = {"max_short": max_short, "max_long": max_long, "quality": quality}
    jobs = [(p, output_path(src, dst, p), kwargs) for p in list_images(src)]
    check_outputs(jobs)
    counts = {"written": 0, "copied": 0, "skipped": 0, "unreadable": 0}
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="img", disable=not progress, desc=f"{src.name} -> {dst.name}")
    except ImportError:  # tqdm is a dependency; keep the tool usable without it
        bar = None
    def consume(results) -> None:
        for path, outcome in results:
            if outcome.startswith("unreadable"):
                print(f"skipping unreadable {path}: {outcome}", file=sys.stderr)
                outcome = "unreadable"
            counts[outcome] += 1
            if bar is not None:
                bar.update()

    if workers <= 1:
        consume(map(_job, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            consume(pool.map(_job, jobs, chunksize=max(1, len(jobs) // (workers * 16))))
    if bar is not None:
        bar.close()
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="image tree to read (never modified)")
    parser.add_argument("--dst", required=True, help="where the resized copy goes (resumes if it exists)")
    cap = parser.add_mutually_exclusive_group(required=True)
    cap.add_argument("--max_short", type=int, help="cap of the shorter side in pixels (e.g. 320)")
    cap.add_argument("--max_long", type=int, help="cap of the longer side in pixels (e.g. 500)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.src, args.dst, max_short=args.max_short, max_long=args.max_long, quality=args.quality,
                         workers=args.workers, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:  # a bad option or tree: one line, exit status 2
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(json.dumps({"tool": "prepare_dataset", "src": args.src, "dst": args.dst, **counts}))
    return counts


if __name__ == "__main__":
    main()
