"""Images/s of the pretraining input per worker core: today's path (``--decode pil``), the new CPU path and the
device path, on realistic JPEGs.

Our Imagenette copy is stored at 224x224, which hides the decode cost, so the benchmark first writes its own test
set: ``--num_images`` Imagenette training images upscaled to ``--width`` x ``--height`` (500x375, a typical
ImageNet photo) and re-encoded at JPEG quality 90, into a temporary ImageFolder.

For each path it times what one loader worker does for the whole set (``KeyedSamples`` items, read + plan +
decode/crop + collate into batches), in this process, on one core: ``worker_images_per_s`` is therefore images/s
per worker core. It also times the main-process side (``to_model_input``: normalization; for ``device``,
decode + crop + normalize) on ``--device``, reported as ``device_images_per_s`` (on a CPU-only machine this is
CPU time the GPU would do). Prints one JSON line per path and a last line with ``cpu_speedup_per_core`` (the new
CPU path's worker images/s over today's; target >= 1.5) and ``device_speedup_per_core``.

Example: ``OMP_NUM_THREADS=1 python benchmarks/input_pipeline.py --num_images 256``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from util.data.decode import build_fast_input, collate, to_model_input, use_fast_input  # noqa: E402
from util.data.folder import build_folder_dataset  # noqa: E402
from util.data.loaders import KeyedSamples  # noqa: E402
from util.data.transforms import pretrain_transform  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenette" / "train"


def make_test_set(source: Path, out: Path, *, num_images: int, width: int, height: int, quality: int) -> int:
    """Upscale the first ``num_images`` images of ``source`` (round-robin over classes) to width x height and
    write them as JPEG ``quality`` into ``out/<class>/``; returns the mean file size in bytes."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    per_class = [sorted(c.iterdir()) for c in classes]
    sizes = []
    for n in range(num_images):
        cls = n % len(classes)
        src = per_class[cls][(n // len(classes)) % len(per_class[cls])]
        dst = out / classes[cls].name / f"{n:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as img:
            img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(dst, quality=quality)
        sizes.append(dst.stat().st_size)
    return int(sum(sizes) / len(sizes))


def measure(root: Path, decode: str, *, input_size: int, batch_size: int, device: torch.device,
            repeats: int) -> dict:
    dataset = use_fast_input(build_folder_dataset(str(root), pretrain_transform(input_size)),
                             build_fast_input(decode, input_size))
    keyed = KeyedSamples(dataset, seed=0)
    n = len(keyed) // batch_size * batch_size
    worker_s = main_s = 0.0
    for epoch in range(repeats + 1):  # the first pass warms the page cache and allocators; not timed
        keyed.set_epoch(epoch)
        tic = time.perf_counter()
        batches = [collate([keyed[i] for i in range(b, b + batch_size)]) for b in range(0, n, batch_size)]
        mid = time.perf_counter()
        for batch in batches:
            out = to_model_input(batch[0], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        if epoch:
            worker_s, main_s = worker_s + mid - tic, main_s + end - mid
    assert out.shape == (batch_size, 3, input_size, input_size) and out.dtype == torch.float32
    images = n * repeats
    return {"benchmark": "input_pipeline", "path": decode, "images": images, "input_size": input_size,
            "worker_images_per_s": round(images / worker_s, 1), "device": str(device),
            "device_images_per_s": round(images / main_s, 1),
            "bytes_per_image_to_device": _bytes_per_image(batches[0][0])}


def _bytes_per_image(images) -> int:
    if isinstance(images, torch.Tensor):
        return images[0].numel() * images.element_size()
    return int(sum(d.numel() for d in images.data) / len(images.data))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="ImageFolder to take images from")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the set (one more untimed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", nargs="+", default=["pil", "cpu", "device"], choices=["pil", "cpu", "device"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        mean_bytes = make_test_set(Path(args.source), Path(tmp), num_images=args.num_images, width=args.width,
                                   height=args.height, quality=args.quality)
        for decode in args.paths:
            row = measure(Path(tmp), decode, input_size=args.input_size, batch_size=min(args.batch_size,
                          args.num_images), device=torch.device(args.device), repeats=args.repeats)
            row.update(file_size=f"{args.width}x{args.height} q{args.quality}", mean_file_bytes=mean_bytes,
                       cpu_count=os.cpu_count())
            print(json.dumps(row), flush=True)
            rows.append(row)
    by_path = {r["path"]: r["worker_images_per_s"] for r in rows}
    if "pil" in by_path:
        summary = {"benchmark": "input_pipeline_summary",
                   "cpu_speedup_per_core": round(by_path["cpu"] / by_path["pil"], 3) if "cpu" in by_path else None,
                   "device_speedup_per_core": (round(by_path["device"] / by_path["pil"], 3)
                                               if "device" in by_path else None)}
        print(json.dumps(summary), flush=True)
        rows.append(summary)
    return rows


if __name__ == "__main__":
    main()
