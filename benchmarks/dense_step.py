"""Training throughput and peak memory of dense-task steps, next to classification fine-tuning of the same ViT.

One JSON line per task: images/s over the timed steps (after warm-up) and peak memory, each step run through the
real loop (``engine.train.train_one_epoch``) with the task's step function, on synthetic scenes
(``util.data.scenes``) already in memory, so data loading is not timed. Tasks:

- ``cascade_mask_rcnn`` / ``mask_rcnn``: ``main_detect``'s model (ViT pyramid + torchvision heads) on
  large-scale-jitter canvases of ``--input_size`` (ViTDet: 1024, window attention 14 with 4 global blocks);
- ``finetune_cls``: the classification fine-tuning step of the same backbone at 224 (``engine.finetune``).

Full size on a GPU: ``python benchmarks/dense_step.py --model vit_base_patch16 --input_size 1024 --batch_size 2``;
CPU smoke at a small size: ``--input_size 256 --batch_size 1 --steps 2 --warmup 1``.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from engine.detect import detect_step  # noqa: E402
from engine.finetune import classify_step  # noqa: E402
from engine.train import train_one_epoch  # noqa: E402
from models.detectors import build_detector  # noqa: E402
from models.pyramid import ViTFeaturePyramid  # noqa: E402
from util.data.scenes import render_scene  # noqa: E402
from util.param_groups import param_groups  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def scene_batch(batch_size: int, size: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Synthetic images [3, size, size] and their COCO-style targets (labels 1..K)."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(batch_size):
        scene = render_scene(size, rng)
        images.append(torch.from_numpy(scene["image"]).permute(2, 0, 1).float() / 255)
        inst = scene["instances"]
        targets.append({"boxes": torch.tensor([i["box"] for i in inst], dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([i["label"] + 1 for i in inst], dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack([i["mask"] for i in inst]).astype(np.uint8))})
    return images, targets


def build(task: str, args: argparse.Namespace, device: torch.device):
    """(model, step_fn, batch) of one task."""
    if task == "finetune_cls":
        model = models.create_model(args.model, img_size=224, num_classes=1000, global_pool="avg",
                                    drop_path_rate=0.1)
        batch = (torch.randn(args.batch_size, 3, 224, 224), torch.randint(0, 1000, (args.batch_size,)))
        return model, partial(classify_step, model, criterion=torch.nn.CrossEntropyLoss(), device=device,
                              mixup_fn=None), batch
    window = 14 if args.input_size >= 512 else 0
    backbone = ViTFeaturePyramid(args.model, img_size=args.input_size, extra_pool=True, drop_path_rate=0.1,
                                 window_size=window, global_blocks=(2, 5, 8, 11))
    model = build_detector(task, backbone, 80, img_size=args.input_size)
    return model, partial(_detect, model, device=device), scene_batch(args.batch_size, args.input_size)


def _detect(model, batch, step, *, device):
    return detect_step(model, batch, step, device=device)


def run(task: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, step_fn, batch = build(task, args, device)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=AMP[args.amp] == torch.float16)
    loop = partial(train_one_epoch, step_fn, optimizer=opt, scaler=scaler, before_update=lambda step: None,
                   amp_dtype=AMP[args.amp], device=device, print_freq=10**9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loop([batch] * args.warmup, start_step=0, num_steps=args.warmup)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loop([batch] * args.steps, start_step=args.warmup, num_steps=args.steps)
    sync()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"benchmark": "dense_step", "task": task, "model": args.model,
            "input_size": 224 if task == "finetune_cls" else args.input_size, "batch_size": args.batch_size,
            "amp": args.amp, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "steps": args.steps,
            "images_per_s": round(args.batch_size * args.steps / elapsed, 3),
            "s_per_step": round(elapsed / args.steps, 4), "peak_mem_mib": round(peak / 2**20, 1),
            "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cascade_mask_rcnn", "finetune_cls"],
                        choices=["cascade_mask_rcnn", "mask_rcnn", "finetune_cls"])
    parser.add_argument("--model", default="vit_base_patch16")
    parser.add_argument("--input_size", type=int, default=1024, help="detection canvas (LSJ size)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="none", choices=list(AMP))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for task in args.tasks:  # CPU peak RSS is per process and only grows: run one task per process to compare
        print(json.dumps(run(task, args, device)), flush=True)


if __name__ == "__main__":
    main()
