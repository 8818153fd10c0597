"""Linear probing of a frozen backbone (MAE protocol, SPEC 6): BatchNorm(affine=False) + Linear, LARS, cosine.

Flags follow MAE's ``main_linprobe.py`` (``--finetune``, ``--cls_token`` / ``--global_pool``, ``--blr 0.1``,
``--accum_iter``, ``--dist_eval``); ``--cache_features`` embeds the images once without augmentation and trains on
the features, and ``--lr_grid`` trains one head per base lr on them in the same pass (DINOv2's linear evaluation).
Example: ``python main_linprobe.py --config configs/linprobe/demo.yaml --finetune output/demo/checkpoint-last.pth``.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from timm.optim import Lars
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms as T

from engine.evaluate import eval_shard, evaluate_heads
from engine.finetune import classify_step
from engine.train import NonFiniteLossError, train_one_epoch
from main_knn import build_backbone, embed, labelled_splits
import models
from models.heads import LinearProbe
from util import args as cli
from util.checkpoint import find_latest, load_checkpoint, save_checkpoint
from util.distributed import broadcast_buffers, wrap_ddp
from util.data.loaders import build_train_loader, epoch_seed, set_loader_epoch
from util.logging import MetricWriter
from util.lr_sched import apply_lr, cosine_lr, training_budget
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record
from util.data.transforms import MEAN, STD, eval_transform
from util.launch import add_launch_args, parse_or_dispatch

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze linear probing", allow_abbrev=False)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="vit_base_patch16")
    cli.add_backbone_args(parser)
    cli.add_labelled_data_args(parser)
    cli.add_linprobe_args(parser)
    cli.add_optim_args(parser, blr=0.1, weight_decay=0.0, epochs=90, warmup_epochs=10, batch_size=512)
    cli.add_dist_args(parser)
    cli.add_output_args(parser, save_every=1000)
    add_launch_args(parser)
    return parser


def lars_groups(probe: LinearProbe, lrs: list[float], weight_decay: float) -> list[dict]:
    """Head h's groups with ``lr_scale`` = its lr. MoCo v3's LARS (SPEC 6) = timm ``Lars`` with the trust ratio
    and weight decay on >1-D params only (``always_adapt``) and ``eps=0``; 1-D params take the raw gradient."""
    groups = []
    for head, lr in zip(probe.heads, lrs):
        params = [p for p in head.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr_scale": lr, "weight_decay": weight_decay,
                       "always_adapt": True})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr_scale": lr, "weight_decay": 0.0,
                       "always_adapt": False})
    return groups


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Probe as ``argv`` says; returns the best head's metrics at the last epoch plus ``best_acc1``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_linprobe",
                                     models=[m for m in models.list_models() if m.startswith("vit_")])
    if result is not None:
        return result
    if args.lr_grid and not args.cache_features:
        raise ValueError("--lr_grid trains its heads on cached features: add --cache_features")
    info = setup_run(args)
    seed_everything(args.seed)  # the same random backbone and heads on every rank; epochs reseed per rank
    amp_dtype, device = resolve_amp(args.amp, info.device), info.device
    backbone = build_backbone(args, device)
    if args.cache_features:  # no augmentation: embed once, then epochs over tensors (SPEC 6 uses fresh crops)
        train_set, val_set, classes = labelled_splits(args, eval_transform(args.input_size),
                                                      eval_transform(args.input_size))
        train_set, val_set = (TensorDataset(*(t.cpu() for t in embed(backbone, d, args, info)))
                              for d in (train_set, val_set))
    else:  # MAE's linear-probe augmentation: RandomResizedCrop (bicubic) + flip; eval: resize + center crop
        train_tf = T.Compose([T.RandomResizedCrop(args.input_size, interpolation=T.InterpolationMode.BICUBIC),
                              T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
        train_set, val_set, classes = labelled_splits(args, train_tf, eval_transform(args.input_size))
    workers = 0 if args.cache_features else args.num_workers
    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=workers, pin_memory=args.pin_mem,
                                rank=info.rank, world_size=info.world_size, seed=args.seed,
                                keyed=not args.cache_features)
    val_loader = DataLoader(eval_shard(val_set, rank=info.rank, world_size=info.world_size),
                            batch_size=args.batch_size, num_workers=workers, shuffle=False)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(train_set), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)
    lrs = [b * eff_batch / 256 for b in args.lr_grid] if args.lr_grid else [lr]
    if args.lr_grid:
        logger.info("lr grid: one head per actual lr %s", ", ".join(f"{x:.3e}" for x in lrs))

    probe = LinearProbe(None if args.cache_features else backbone, backbone.num_features, classes,
                        num_heads=len(lrs)).to(device)
    optimizer = Lars(lars_groups(probe, lrs, args.weight_decay), lr=0.0, momentum=0.9, trust_coeff=0.001, eps=0.0)
    if args.weight_decay:
        logger.warning("LARS with weight decay: timm's trust ratio divides by |g| + wd |w|, MoCo v3's by |g + wd w|")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best = args.start_epoch, {"acc1": -1.0}
    resume = args.resume or (find_latest(args.output_dir) if args.auto_resume else None)
    if resume:
        checkpoint = load_checkpoint(resume)
        probe.heads.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best"]
        logger.info("resumed from %s (epoch %d done)", resume, checkpoint["epoch"])
    if info.is_main:
        protocol = "cached features, no augmentation" if args.cache_features else "MAE: fresh RandomResizedCrop + flip"
        write_run_record(args.output_dir, vars(args), {"lrs": lrs, "effective_batch": eff_batch, "classes": classes,
                         "protocol": protocol, "steps_per_epoch": steps_per_epoch, "world_size": info.world_size}, argv)
    # one multiplier schedule for every head: group lr = cosine(step) * head lr (apply_lr uses lr_scale)
    schedule = partial(cosine_lr, base_lr=1.0, min_lr=args.min_lr / lr, warmup_steps=args.warmup_epochs *
                       steps_per_epoch, total_steps=args.epochs * steps_per_epoch)
    ddp_probe = wrap_ddp(probe, info)
    step_fn = partial(classify_step, ddp_probe, criterion=nn.CrossEntropyLoss(), device=device)
    writer = MetricWriter(args.output_dir, args.log_dir or Path(args.output_dir) / "tensorboard", enabled=info.is_main)
    result: dict[str, float] = {}
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, epoch, info.rank))
        set_loader_epoch(loader, seed=args.seed, epoch=epoch, rank=info.rank)
        probe.train()
        stats = train_one_epoch(step_fn, loader, optimizer, scaler, before_update=lambda s: apply_lr(optimizer,
                                schedule(s)), start_step=epoch * steps_per_epoch, num_steps=steps_per_epoch,
                                accum_steps=args.accum_iter, amp_dtype=amp_dtype, device=device, model=ddp_probe,
                                clip_grad=args.clip_grad, max_skipped_steps=args.max_skipped_steps,
                                print_freq=args.print_freq, log_fn=writer.log, header=f"Epoch: [{epoch}]")
        broadcast_buffers(probe.heads)  # every rank evaluates with rank 0's BatchNorm statistics
        heads = evaluate_heads(probe, val_loader, device=device, num_classes=classes, amp_dtype=amp_dtype)
        h = max(range(len(heads)), key=lambda i: heads[i]["acc1"])
        result = {k: v for k, v in heads[h].items() if k != "confusion"}
        result.update({"lr": lrs[h], **{f"acc1_lr{x:g}": m["acc1"] for x, m in zip(lrs, heads)}})
        is_best = result["acc1"] > best["acc1"]
        best = {**result, "epoch": epoch} if is_best else best
        result["best_acc1"] = best["acc1"]
        logger.info("epoch %d: acc1 %.2f  acc5 %.2f  f1 %.2f  mcc %.2f  (lr %.3e; best acc1 %.2f)", epoch,
                    result["acc1"], result["acc5"], result["f1"], result["mcc"], lrs[h], best["acc1"])
        if info.is_main:
            state = {"model": probe.heads.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "scaler": scaler.state_dict(), "best": best, "lrs": lrs, "args": vars(args)}
            save_checkpoint(Path(args.output_dir) / "checkpoint-last.pth", state)
            if is_best:
                save_checkpoint(Path(args.output_dir) / "checkpoint-best.pth", state)
            if (epoch + 1) % args.save_every == 0:
                save_checkpoint(Path(args.output_dir) / f"checkpoint-{epoch}.pth", state)
            writer.log_epoch({**{f"train_{k}": v for k, v in stats.items()}, **result, "epoch": epoch})
    writer.close()
    return result


if __name__ == "__main__":
    run_cli(main, NonFiniteLossError)
