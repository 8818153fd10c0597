"""Training-step throughput and peak memory of the dense tasks next to classification fine-tuning, same backbone.

One JSON line per task: images/s over the timed steps (after warm-up), seconds per step, peak memory (CUDA: max
allocated, reset after warm-up; CPU: the process's max RSS, so every task runs in its own subprocess).
Tasks: ``upernet`` (UperNet + auxiliary FCN on the ViT pyramid, MAE's / dBOT's ADE20K model: 150 classes, 768
channels, BEiT neck, taps 3/5/7/11; batch >= 2 per process: the PPM's 1x1 BatchNorm needs it), ``classify``
(timm ViT fine-tuning step, 1000 classes, same layer-decay groups), ``cascade_mask_rcnn`` / ``mask_rcnn``
(``main_detect``'s model: ViT pyramid + torchvision heads, 80 classes, on large-scale-jitter canvases of
``--det_size``, ViTDet's 1024 with window attention 14 and global blocks 2/5/8/11, targets from synthetic scenes);
``adapter_mask_rcnn`` (the same Mask R-CNN on ``--adapter``, a ViT-Adapter + FPN neck, ``models/adapter.py``,
next to ``mask_rcnn`` on the plain pyramid at the same ``--det_size``); ``all`` runs upernet, classify and
cascade_mask_rcnn in turn. Cascade Mask R-CNN ViT-B 1024 on a GPU: ``--task cascade_mask_rcnn --batch_size 2``;
on CPU at a small size: ``--task cascade_mask_rcnn --det_size 256 --batch_size 1 --steps 1 --warmup 1``. Full size on a GPU: ``python benchmarks/dense_step.py --input_size 512 --batch_size 2``
(dBOT's 2 images per GPU); a small CPU check: ``--input_size 128 --batch_size 1 --steps 2 --warmup 1``.
What is timed is the training loop itself, ``engine.train.train_one_epoch`` with the scripts' step functions
(``engine.segment.segment_step``, ``engine.detect.detect_step``, ``engine.finetune.classify_step``): autocast, the
loss scaler for fp16, the gradient norm and the one host sync per update, AdamW with the layer-decay groups. One
batch is made once and fed again at every step (already on the device), so data loading is left out.
Timing discipline: warm-up steps excluded, ``cuda.synchronize()`` before each clock read on GPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from engine.detect import detect_step  # noqa: E402
from engine.finetune import classify_step  # noqa: E402
from engine.segment import segment_step  # noqa: E402
from engine.train import EpochProgress, LoopConfig, train_one_epoch  # noqa: E402
from models.adapter import create_adapter  # noqa: E402
from models.detectors import build_detector, detector_layer_id  # noqa: E402
from models.pyramid import ViTFeaturePyramid  # noqa: E402
from models.seg_heads import UperNetSegmentor  # noqa: E402
from util.param_groups import param_groups  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
TASKS = ("upernet", "classify", "cascade_mask_rcnn")
DETECTORS = ("cascade_mask_rcnn", "mask_rcnn", "adapter_mask_rcnn")


def scene_targets(batch_size: int, size: int, device: torch.device) -> tuple[list, list]:
    """Synthetic scenes [3, size, size] and their detection targets (labels 1..K, boxes xyxy, masks)."""
    import numpy as np
    from util.data.scenes import render_scene
    rng = np.random.default_rng(0)
    images, targets = [], []
    for _ in range(batch_size):
        scene = render_scene(size, rng)
        images.append(torch.from_numpy(scene["image"]).permute(2, 0, 1).float().div(255).to(device))
        inst = scene["instances"]
        targets.append({"boxes": torch.tensor([i["box"] for i in inst], dtype=torch.float32, device=device),
                        "labels": torch.tensor([i["label"] + 1 for i in inst], device=device),
                        "masks": torch.from_numpy(np.stack([i["mask"] for i in inst])).to(device, torch.uint8)})
    return images, targets


def build(task: str, args: argparse.Namespace, device: torch.device):
    """(model, step_fn(batch, step) -> {'loss', ...}, batch) for ``task``: the entry script's step function on one
    batch of the task's inputs."""
    if task == "adapter_mask_rcnn":  # window attention as the pyramid's, ViT-Adapter's DINOv2 configs
        window = 14 if args.det_size >= 512 else 0
        backbone = create_adapter(args.adapter, fpn_channels=256, drop_path_rate=0.1, window_size=window,
                                  global_blocks=(2, 5, 8, 11), grad_checkpointing=args.grad_checkpointing)
        model = build_detector("mask_rcnn", backbone, 80, img_size=args.det_size).to(device)
        batch = scene_targets(args.batch_size, args.det_size, device)
        model.layer_id = lambda name: detector_layer_id(name, backbone)
        return model, lambda b, step: detect_step(model, b, step, device=device), batch
    if task in DETECTORS:
        window = 14 if args.det_size >= 512 else 0
        backbone = ViTFeaturePyramid(args.model, img_size=args.det_size, extra_pool=True, drop_path_rate=0.1,
                                     window_size=window, global_blocks=(2, 5, 8, 11),
                                     grad_checkpointing=args.grad_checkpointing, use_rel_pos=args.use_rel_pos)
        model = build_detector(task, backbone, 80, img_size=args.det_size).to(device)
        batch = scene_targets(args.batch_size, args.det_size, device)
        model.layer_id = lambda name: detector_layer_id(name, backbone)  # None (scale 1) for the heads
        return model, lambda b, step: detect_step(model, b, step, device=device), batch
    if task == "upernet":
        backbone = ViTFeaturePyramid(args.model, img_size=args.input_size, drop_path_rate=0.1, neck="beit",
                                     tap_blocks=(3, 5, 7, 11), grad_checkpointing=args.grad_checkpointing,
                                     use_rel_pos=args.use_rel_pos, rel_pos_bias=args.rel_pos_bias,
                                     layer_scale_init_value=1.0 if args.rel_pos_bias else None)
        model = UperNetSegmentor(backbone, 150, channels=768, aux_channels=256).to(device)
        batch = (images(args, device), torch.randint(0, 150, (args.batch_size, args.input_size, args.input_size),
                                                     device=device))
        return model, lambda b, step: segment_step(model, b, step, device=device), batch
    model = models.create_model(args.model, img_size=args.input_size, num_classes=1000, global_pool="avg",
                                drop_path_rate=0.1).to(device)
    batch = (images(args, device), torch.randint(0, 1000, (args.batch_size,), device=device))
    model.layer_id = lambda name: models.vit.unit_of(name, depth=len(model.blocks))
    criterion = nn.CrossEntropyLoss()
    return model, lambda b, step: classify_step(model, b, step, criterion=criterion, device=device), batch


def images(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    return torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)


def run(task: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, step_fn, batch = build(task, args, device)
    depth = model.backbone.depth if task != "classify" else len(model.blocks)
    unit_of = lambda n: (lambda i: None if i is None or i > depth else i)(model.layer_id(n))  # noqa: E731
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05, unit_of=unit_of, layer_decay=0.65,
                                         num_layers=depth + 1), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=AMP[args.amp] == torch.float16)
    model.train()
    done = 0

    def steps(count: int) -> None:
        """``count`` updates of the real loop (one 'epoch' of that length, continuing the step count)."""
        nonlocal done
        config = LoopConfig(steps_per_epoch=count, amp_dtype=AMP[args.amp], device=device, print_freq=10**9)
        train_one_epoch(step_fn, [batch] * count, opt, scaler, config, EpochProgress(epoch=0, first_step=done),
                        before_update=lambda step: None)
        done += count

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.warmup:
        steps(args.warmup)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    steps(args.steps)
    sync()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    name = args.adapter if task == "adapter_mask_rcnn" else args.model
    return {"benchmark": "dense_step", "task": task, "model": name, "batch_size": args.batch_size,
            "input_size": args.det_size if task in DETECTORS else args.input_size, "amp": args.amp, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "steps": args.steps,
            "use_rel_pos": args.use_rel_pos, "rel_pos_bias": args.rel_pos_bias, "timed": "engine.train.train_one_epoch",
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "images_per_s": round(args.batch_size * args.steps / elapsed, 3),
            "s_per_step": round(elapsed / args.steps, 4), "peak_mem_mib": round(peak / 2**20, 1),
            "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="all", choices=("all", "mask_rcnn", "adapter_mask_rcnn") + TASKS)
    parser.add_argument("--adapter", default="adapter_dinov2_small", help="ViT-Adapter of adapter_mask_rcnn")
    parser.add_argument("--model", default="vit_base_patch16")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--input_size", type=int, default=512)
    parser.add_argument("--det_size", type=int, default=1024, help="detection canvas (large-scale jitter size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="none", choices=list(AMP))
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--use_rel_pos", action="store_true",
                        help="ViTDet's decomposed relative position in the pyramid's ViT (detection / upernet)")
    parser.add_argument("--rel_pos_bias", action="store_true",
                        help="upernet: BEiT's relative position bias with LayerScale 1.0 (the ADE20K recipe)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args, _ = parser.parse_known_args(argv)
    if args.task == "all":  # one process per task: a process's peak memory is its own
        for task in TASKS:
            argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("task", "grad_checkpointing")]
            argv += ["--grad_checkpointing"] if args.grad_checkpointing else []
            subprocess.run([sys.executable, __file__, "--task", task, *argv], check=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args.task, args)), flush=True)


if __name__ == "__main__":
    main()
