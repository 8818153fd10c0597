"""Masked-image-modeling pretraining of Vision Transformers: MAE (pixel targets) and LocalMIM (multi-scale).

Flags follow the official MAE ``main_pretrain.py`` and LocalMIM ``run_pretrain.py``; ``--config`` reads a YAML
recipe from ``configs/pretrain/``. Example: ``python main_pretrain.py --config configs/pretrain/demo.yaml``.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

import models
from engine.pretrain import build_data, build_model, mim_step, partial_describe, save_reconstruction
from engine.run import EpochEnd, fit, metric_writer, Outcome, Task
from engine.train import NonFiniteLossError
from models.masking import check_mask_ratio
from util import args as cli_args, preflight
from util.checkpoint import NonFiniteStateError
from engine.freezeout import Freezer, FreezeOutSchedule
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.lr_sched import training_budget
from util.compute import adamw_kwargs, compile_model
from util.param_groups import param_groups
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze pretraining (MAE / LocalMIM)", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli_args.add_config_args(parser)
    cli_args.add_model_args(parser, default_model="mae_vit_base_patch16")
    cli_args.add_mim_args(parser)
    cli_args.add_data_args(parser)
    cli_args.add_decode_args(parser, what="pretraining crops")
    cli_args.add_compute_args(parser)
    cli_args.add_optim_args(parser, blr=1.5e-4, weight_decay=0.05, epochs=400, warmup_epochs=40, batch_size=64)
    cli_args.add_freezeout_args(parser)
    cli_args.add_dist_args(parser)
    cli_args.add_output_args(parser, save_every=20)
    add_launch_args(parser)
    return parser


@preflight.entry_point
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Pretrain as ``argv`` says; returns the last epoch's training statistics."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_pretrain",
                                     models=[m for m in models.list_models() if not m.startswith("vit_")])
    if result is not None:
        return result
    info = setup_run(args)
    seed_everything(args.seed + info.rank)

    dataset, loader = build_data(args, info)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(dataset), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)

    model = build_model(args).to(info.device)
    check_mask_ratio(args.mask_ratio, model.patch_embed.num_patches, img_size=args.input_size,
                     patch_size=model.patch_size)
    if args.compile:
        compile_model(model, num_units=model.num_units, backend=args.compile_backend)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=args.weight_decay, unit_of=model.unit_of),
                                  lr=lr, betas=(0.9, 0.95), **adamw_kwargs(info.device))
    amp_dtype = resolve_amp(args.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)

    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    # Without --freezeout the schedule has t_0 = 1: every unit follows MAE's cosine and nothing freezes early.
    schedule = FreezeOutSchedule(num_units=model.num_units, total_steps=total_steps, base_lr=lr,
                                 warmup_steps=warmup_steps, t_0=args.t_0 if args.freezeout else 1.0,
                                 how_scale=args.how_scale, scale_lr=not args.not_scale_lr,
                                 layerwise_lr=not args.non_layerwise_lr, min_lr=args.min_lr,
                                 warmup_jump=args.vitfreeze_compat)
    freezer = Freezer(model, optimizer, schedule, unit_of=model.unit_of, dist=info,
                      describe_unit=partial_describe(model))
    writer = metric_writer(args, info)
    logger.info("model %s: %.2fM parameters; %d images, %d steps/epoch, %d epochs", args.model,
                sum(p.numel() for p in model.parameters()) / 1e6, len(dataset), steps_per_epoch, args.epochs)
    if info.is_main and args.freezeout and not preflight.active(args):
        for line in schedule.describe(steps_per_epoch):
            logger.info("FreezeOut schedule: %s", line)
        from util.vis import save_schedule_png  # lazy: pictures are optional
        logger.info("wrote %s", save_schedule_png(Path(args.output_dir) / "freezeout_schedule.png", schedule,
                                                  steps_per_epoch=steps_per_epoch))

    stage_names = [f"x{scale:g}" for scale in getattr(model, "scales", ())]
    loss_terms: list[str] = []  # the LocalMIM terms train_loss holds now; FreezeOut drops a stage with its block

    def before_update(step: int) -> None:
        freezer.before_update(step)
        if len(stage_names) > 1:
            now = [stage_names[k] for k in model.active_stages(freezer.num_frozen)]
            if now != loss_terms:
                logger.info("train_loss %s the LocalMIM terms %s (loss_%s: per scale, comparable across the run)",
                            "now sums" if loss_terms else "sums", " + ".join(now), "/loss_".join(stage_names))
                loss_terms[:] = now
        if step % args.print_freq == 0:  # with or without FreezeOut: one schedule object gives every unit's lr
            writer.log({**{f"lr/unit_{u:02d}": schedule.lr(u, step) for u in range(schedule.num_units)},
                        "train/num_frozen": freezer.num_frozen}, step)

    def step_fn(batch, step: int) -> dict:
        return mim_step(freezer.module, batch, step, mask_ratio=args.mask_ratio, device=info.device,
                        num_frozen=freezer.num_frozen)
    vis_imgs = loader.prepare([dataset[i][0] for i in range(0, len(dataset), -(-len(dataset) // 8))]) \
        if args.vis_every and info.is_main and not preflight.active(args) else None

    def end_epoch(epoch: int, stats: dict, metrics: None, run: Outcome) -> EpochEnd:
        vis_due = args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs)
        return EpochEnd(log={"epoch": epoch, "num_frozen": freezer.num_frozen,
                             **({"loss_terms": list(loss_terms)} if loss_terms else {})},
                        state={"train_stats": stats}, pictures=partial(
                            save_reconstruction, model, vis_imgs, args, Path(args.output_dir) / f"vis-{epoch:04d}.png")
                        if vis_due else None)

    task = Task(step=step_fn, before_update=before_update, train=freezer.train, no_sync=freezer.no_sync,
                end_epoch=end_epoch)
    return fit(task, args, info, model=model, optimizer=optimizer, scaler=scaler, loader=loader, writer=writer,
               steps_per_epoch=steps_per_epoch, images_per_update=eff_batch, amp_dtype=amp_dtype, sync=freezer.sync,
               record={"lr": lr, "effective_batch": eff_batch, "steps_per_epoch": steps_per_epoch,
                       "world_size": info.world_size}, script=Path(__file__).name, argv=argv).stats


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_pretrain.py`` and its aliases): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
