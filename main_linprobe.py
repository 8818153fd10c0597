"""Linear probing of a frozen backbone (MAE's ``main_linprobe.py`` protocol): BatchNorm(affine=False) + Linear, LARS, cosine.

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

import models
from engine.evaluate import evaluate_heads
from engine.finetune import classify_step
from engine.run import Best, EpochEnd, fit, metric_writer, Outcome, Task
from engine.train import NonFiniteLossError
from engine.linprobe import build_data, build_loaders, check_args
from models.backbone import build_backbone
from models.heads import LinearProbe
from util import args as cli_args, preflight
from util.checkpoint import NonFiniteStateError, load_checkpoint
from util.param_groups import lars_groups
from util.distributed import broadcast_buffers, wrap_ddp
from engine.metrics import per_class_table
from util.logging import write_results
from util.lr_sched import apply_lr, cosine_lr, training_budget
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.outputs import write_text

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze linear probing", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli_args.add_config_args(parser)
    cli_args.add_model_args(parser, default_model="vit_base_patch16")
    cli_args.add_backbone_args(parser)
    cli_args.add_labelled_data_args(parser)
    cli_args.add_decode_args(parser, what="evaluation crops (resize + center crop; training crops stay PIL)")
    cli_args.add_linprobe_args(parser)
    cli_args.add_optim_args(parser, blr=0.1, weight_decay=0.0, epochs=90, warmup_epochs=10, batch_size=512)
    cli_args.add_dist_args(parser)
    cli_args.add_output_args(parser, save_every=1000)
    add_launch_args(parser)
    return parser


@preflight.entry_point
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Probe as ``argv`` says; returns the best head's metrics at the last epoch plus ``best_acc1``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_linprobe",
                                     models=[m for m in models.list_models() if m.startswith("vit_")])
    if result is not None:
        return result
    check_args(args)
    info = setup_run(args)
    seed_everything(args.seed)  # the same random backbone and heads on every rank; epochs reseed per rank
    amp_dtype, device = resolve_amp(args.amp, info.device), info.device
    backbone = build_backbone(args.model, img_size=args.input_size, global_pool=args.global_pool,
                              checkpoint=load_checkpoint(args.finetune) if args.finetune else None,
                              checkpoint_source=args.checkpoint_source, name=args.finetune).to(device)
    train_set, val_set, classes, names = build_data(args, backbone, info, amp_dtype)
    loader, val_loader = build_loaders(args, train_set, val_set, info)
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
    writer = metric_writer(args, info)
    # one multiplier schedule for every head: group lr = cosine(step) * head lr (apply_lr uses lr_scale)
    schedule = partial(cosine_lr, base_lr=1.0, min_lr=args.min_lr / lr, warmup_steps=args.warmup_epochs *
                       steps_per_epoch, total_steps=args.epochs * steps_per_epoch)
    ddp_probe = wrap_ddp(probe, info)

    def evaluate(epoch: int, progress) -> dict:
        """The best head's metrics (with its confusion matrix, for the best record) and every head's acc1."""
        broadcast_buffers(probe.heads)  # every rank evaluates with rank 0's BatchNorm statistics
        heads = evaluate_heads(probe, val_loader, device=device, num_classes=classes, amp_dtype=amp_dtype)
        h = max(range(len(heads)), key=lambda i: heads[i]["acc1"])
        return {**heads[h], "lr": lrs[h], **{f"acc1_lr{x:g}": m["acc1"] for x, m in zip(lrs, heads)}}

    def end_epoch(epoch: int, stats: dict, metrics: dict, run: Outcome) -> EpochEnd:
        result = {k: v for k, v in metrics.items() if k != "confusion"}
        result["best_acc1"] = run.best["acc1"]
        writer.log_validation(result, epoch)
        logger.info("epoch %d: acc1 %.2f  acc5 %.2f  f1 %.2f  mcc %.2f  (lr %.3e; best acc1 %.2f)", epoch,
                    result["acc1"], result["acc5"], result["f1"], result["mcc"], result["lr"], run.best["acc1"])
        return EpochEnd(log=result, state={"metrics": result}, metrics=result)

    # the probe's checkpoints hold the heads only ("model"); no FreezeOut, so nothing to sync. The confusion matrix
    # travels in the checkpoint's "best", for the pictures after a resume
    task = Task(step=partial(classify_step, ddp_probe, criterion=nn.CrossEntropyLoss(), device=device),
                before_update=lambda s: apply_lr(optimizer, schedule(s)), train=probe.train,
                no_sync=getattr(ddp_probe, "no_sync", None), evaluate=evaluate, end_epoch=end_epoch,
                best=Best("acc1", {"acc1": -1.0}, lambda m, epoch, progress: {**m, "epoch": epoch}),
                state=lambda run: {"lrs": lrs})
    protocol = "cached features, no augmentation" if args.cache_features else "MAE: fresh RandomResizedCrop + flip"
    run = fit(task, args, info, model=probe.heads, optimizer=optimizer, scaler=scaler, loader=loader, writer=writer,
              steps_per_epoch=steps_per_epoch, images_per_update=eff_batch, amp_dtype=amp_dtype,
              required=("model", "optimizer", "epoch", "best"), hint="a pretrained backbone goes to --finetune",
              record={"lrs": lrs, "effective_batch": eff_batch, "classes": classes, "protocol": protocol,
                      "steps_per_epoch": steps_per_epoch, "world_size": info.world_size},
              script=Path(__file__).name, argv=argv)
    result, best, output_dir = run.metrics, run.best, Path(args.output_dir)
    if info.is_main and "confusion" in best:  # as fine-tuning: the best epoch's per-class table and picture
        from util.vis import save_confusion_png  # lazy: pictures are optional
        write_text(output_dir / "per_class_val.txt", per_class_table(best["confusion"], names) + "\n")
        logger.info("wrote %s", save_confusion_png(output_dir / "confusion_val.png", best["confusion"], names))
    return write_results(output_dir if info.is_main else None,
                         {**result, "best_acc1": best["acc1"], "best_epoch": best.get("epoch"),
                          "best_lr": best.get("lr")})


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_linprobe.py`` and its aliases): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
