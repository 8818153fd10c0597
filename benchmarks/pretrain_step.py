"""Throughput of full pretraining steps (forward, backward, AdamW update) on synthetic images.

What is timed is the training loop itself, ``engine.train.train_one_epoch`` with ``engine.pretrain.mim_step`` (the
code ``main_pretrain.py`` runs: autocast, loss scaler for fp16, the per-step finite check and its one host sync),
fed a batch already on the device, so data loading is left out.
Prints one JSON line: images/s over the timed steps (after warm-up), seconds per step, peak memory.
Example: ``python benchmarks/pretrain_step.py --model mae_vit_base_patch16 --batch_size 8 --steps 10``.
Timing discipline: warm-up steps excluded, ``cuda.synchronize()`` before each clock read on GPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from engine.pretrain import mim_step  # noqa: E402
from engine.train import EpochProgress, LoopConfig, train_one_epoch  # noqa: E402
from util.param_groups import param_groups  # noqa: E402
from util.runtime import AMP_DTYPES as AMP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="none", choices=list(AMP))
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--norm_pix_loss", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss).to(device)
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05, unit_of=model.unit_of), lr=1e-4,
                            betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=AMP[args.amp] == torch.float16)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    batches = [(imgs, None)] * max(args.steps, args.warmup)

    def run(steps: int) -> None:
        """``steps`` updates of the real loop (one 'epoch' of that length)."""
        config = LoopConfig(steps_per_epoch=steps, amp_dtype=AMP[args.amp], device=device, print_freq=10**9)
        train_one_epoch(lambda batch, step: mim_step(model, batch, step, mask_ratio=args.mask_ratio, device=device),
                        batches, opt, scaler, config, EpochProgress(epoch=0, first_step=0),
                        before_update=lambda step: None)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.warmup:
        run(args.warmup)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(args.steps)
    sync()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"benchmark": "pretrain_step", "model": args.model, "batch_size": args.batch_size,
                      "input_size": args.input_size, "amp": args.amp, "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "threads": torch.get_num_threads(), "steps": args.steps, "timed": "engine.train.train_one_epoch",
                      "images_per_s": round(args.batch_size * args.steps / elapsed, 3),
                      "s_per_step": round(elapsed / args.steps, 4),
                      "peak_mem_mib": round(peak / 2**20, 1),
                      "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}))


if __name__ == "__main__":
    main()
