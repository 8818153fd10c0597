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

import models
from engine.evaluate import eval_shard, evaluate_heads
from engine.finetune import classify_step
from engine.train import begin_epoch, EpochProgress, LoopConfig, NonFiniteLossError, train_one_epoch
from engine.knn import embed
from models.backbone import build_backbone
from models.heads import LinearProbe
from util import args as cli
from util.checkpoint import NonFiniteStateError, RunCheckpoints, load_checkpoint, training_state
from util.data.decode import DeviceInput, collate, use_eval_decode
from util.data.transfer import class_names, labelled_splits
from util.param_groups import lars_groups
from util.distributed import barrier, broadcast_buffers, wrap_ddp
from util.data.loaders import build_train_loader
from util.metrics import per_class_table
from util.logging import MetricWriter, write_results
from util.lr_sched import apply_lr, cosine_lr, training_budget
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record
from util.data.transforms import eval_transform, linprobe_transform
from util.cli_help import DefaultsHelpFormatter
from util.launch import Preemption, add_launch_args, parse_or_dispatch

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze linear probing", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="vit_base_patch16")
    cli.add_backbone_args(parser)
    cli.add_labelled_data_args(parser)
    cli.add_decode_args(parser, what="evaluation crops (resize + center crop; training crops stay PIL)")
    cli.add_linprobe_args(parser)
    cli.add_optim_args(parser, blr=0.1, weight_decay=0.0, epochs=90, warmup_epochs=10, batch_size=512)
    cli.add_dist_args(parser)
    cli.add_output_args(parser, save_every=1000)
    add_launch_args(parser)
    return parser


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
    backbone = build_backbone(args.model, img_size=args.input_size, global_pool=args.global_pool,
                              checkpoint=load_checkpoint(args.finetune) if args.finetune else None,
                              checkpoint_source=args.checkpoint_source, name=args.finetune).to(device)
    splits = partial(labelled_splits, args.data_set, args.data_path, nb_classes=args.nb_classes)
    if args.cache_features:  # no augmentation: embed once, then epochs over tensors (SPEC 6 uses fresh crops)
        train_set, val_set, classes = splits(train_transform=eval_transform(args.input_size),
                                             eval_transform=eval_transform(args.input_size))
        names = class_names(val_set)
        use_eval_decode(args.decode, args.input_size, train_set, val_set)
        train_set, val_set = (TensorDataset(*(t.cpu() for t in embed(
            backbone, d, device=device, rank=info.rank, world_size=info.world_size, batch_size=args.batch_size,
            num_workers=args.num_workers, pin_memory=args.pin_mem, amp_dtype=amp_dtype))) for d in (train_set, val_set))
    else:  # MAE's linear-probe augmentation: its TF-style RandomResizedCrop + flip; eval: resize + center crop
        train_set, val_set, classes = splits(train_transform=linprobe_transform(args.input_size),
                                             eval_transform=eval_transform(args.input_size))
        names = class_names(val_set)
        use_eval_decode(args.decode, args.input_size, val_set)
    workers = 0 if args.cache_features else args.num_workers
    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=workers, pin_memory=args.pin_mem,
                                rank=info.rank, world_size=info.world_size, seed=args.seed,
                                keyed=not args.cache_features, device=device)
    val_loader = DeviceInput(DataLoader(eval_shard(val_set, rank=info.rank, world_size=info.world_size),
                                        batch_size=args.batch_size, num_workers=workers, shuffle=False,
                                        collate_fn=collate), device)
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
    writer = MetricWriter(args.output_dir, args.log_dir or Path(args.output_dir) / "tensorboard", enabled=info.is_main)
    ckpts = RunCheckpoints(args.output_dir, epochs=args.epochs, save_every=args.save_every, enabled=info.is_main,
                           log_epoch=writer.log_epoch)
    # the probe's checkpoints hold the heads only ("model"); no FreezeOut, so nothing to sync
    checkpoint = ckpts.resume(args.resume, auto=args.auto_resume, model=probe.heads, optimizer=optimizer,
                              scaler=scaler, sync=lambda step: None, steps_per_epoch=steps_per_epoch,
                              required=("model", "optimizer", "epoch", "best"),
                              hint="a pretrained backbone goes to --finetune")
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else args.start_epoch
    best = checkpoint["best"] if checkpoint else {"acc1": -1.0}
    if info.is_main:
        protocol = "cached features, no augmentation" if args.cache_features else "MAE: fresh RandomResizedCrop + flip"
        write_run_record(args.output_dir, vars(args), {"lrs": lrs, "effective_batch": eff_batch, "classes": classes,
                         "protocol": protocol, "steps_per_epoch": steps_per_epoch, "world_size": info.world_size}, argv)
    # one multiplier schedule for every head: group lr = cosine(step) * head lr (apply_lr uses lr_scale)
    schedule = partial(cosine_lr, base_lr=1.0, min_lr=args.min_lr / lr, warmup_steps=args.warmup_epochs *
                       steps_per_epoch, total_steps=args.epochs * steps_per_epoch)
    ddp_probe = wrap_ddp(probe, info)
    step_fn = partial(classify_step, ddp_probe, criterion=nn.CrossEntropyLoss(), device=device)
    loop = LoopConfig(steps_per_epoch=steps_per_epoch, accum_steps=args.accum_iter, clip_grad=args.clip_grad,
                      amp_dtype=amp_dtype, device=device, max_skipped_steps=args.max_skipped_steps,
                      print_freq=args.print_freq, images_per_update=eff_batch, save_every_steps=args.save_every_steps,
                      total_steps=args.epochs * steps_per_epoch)

    def state(epoch: int, progress: EpochProgress, **extra) -> dict:
        return training_state(probe.heads, optimizer, scaler, epoch=epoch, step=progress.step,
                              skipped=progress.skipped, args=vars(args), best=best, lrs=lrs, **extra)

    result: dict[str, float] = checkpoint.get("metrics", {}) if checkpoint else {}
    skipped = checkpoint.get("skipped_steps", 0) if checkpoint else 0
    with Preemption(Path(__file__).name, argv) as preemption, ckpts:
        for epoch in range(start_epoch, args.epochs):
            progress = begin_epoch(loader, checkpoint, epoch, info, seed=args.seed, steps_per_epoch=steps_per_epoch,
                                   accum_steps=args.accum_iter, skipped=skipped)
            probe.train()
            stats = train_one_epoch(step_fn, loader, optimizer, scaler, loop, progress,
                                    before_update=lambda s: apply_lr(optimizer, schedule(s)),
                                    no_sync=getattr(ddp_probe, "no_sync", None), log_fn=writer.log,
                                    should_stop=preemption.requested,
                                    checkpoint_fn=lambda p: ckpts.save_position(state(p.epoch - 1, p), p.state_dict()))
            preemption.exit_if_stopped(progress, steps_per_epoch=steps_per_epoch,
                                       saved=ckpts.output_dir / "checkpoint-last.pth")
            skipped = progress.skipped
            broadcast_buffers(probe.heads)  # every rank evaluates with rank 0's BatchNorm statistics
            heads = evaluate_heads(probe, val_loader, device=device, num_classes=classes, amp_dtype=amp_dtype)
            h = max(range(len(heads)), key=lambda i: heads[i]["acc1"])
            result = {k: v for k, v in heads[h].items() if k != "confusion"}
            result.update({"lr": lrs[h], **{f"acc1_lr{x:g}": m["acc1"] for x, m in zip(lrs, heads)}})
            is_best = result["acc1"] > best["acc1"]
            if is_best:  # the confusion matrix travels in the checkpoint's "best", for the pictures after a resume
                best = {**result, "epoch": epoch, "confusion": heads[h]["confusion"]}
            result["best_acc1"] = best["acc1"]
            writer.log_validation(result, epoch)
            logger.info("epoch %d: acc1 %.2f  acc5 %.2f  f1 %.2f  mcc %.2f  (lr %.3e; best acc1 %.2f)", epoch,
                        result["acc1"], result["acc5"], result["f1"], result["mcc"], lrs[h], best["acc1"])
            ckpts.end_epoch(epoch, state(epoch, progress, metrics=result), is_best=is_best,
                            log={**{f"train_{k}": v for k, v in stats.items()}, **result, "epoch": epoch})
            if epoch + 1 < args.epochs and preemption.requested_anywhere(device):
                barrier()
                preemption.exit(f"at the end of epoch {epoch}; saved {ckpts.output_dir / 'checkpoint-last.pth'}")
    writer.close()
    if info.is_main and "confusion" in best:  # as fine-tuning: the best epoch's per-class table and picture
        from util.vis import save_confusion_png  # lazy: pictures are optional
        (ckpts.output_dir / "per_class_val.txt").write_text(per_class_table(best["confusion"], names) + "\n")
        logger.info("wrote %s", save_confusion_png(ckpts.output_dir / "confusion_val.png", best["confusion"], names))
    return write_results(ckpts.output_dir if info.is_main else None,
                         {**result, "best_acc1": best["acc1"], "best_epoch": best.get("epoch"),
                          "best_lr": best.get("lr")})


if __name__ == "__main__":
    run_cli(main, NonFiniteLossError, NonFiniteStateError)
