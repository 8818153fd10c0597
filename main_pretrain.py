"""Masked-image-modeling pretraining of Vision Transformers: MAE (pixel targets) and LocalMIM (multi-scale).

Flags follow the official MAE ``main_pretrain.py`` and LocalMIM ``run_pretrain.py``; ``--config`` reads a YAML
recipe from ``configs/pretrain/``. Example: ``python main_pretrain.py --config configs/pretrain/demo.yaml``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import torch

import models
from engine.pretrain import mim_step, reconstruct
from engine.train import begin_epoch, EpochProgress, LoopConfig, NonFiniteLossError, train_one_epoch
from models.masking import check_mask_ratio
from util import args as cli
from util.checkpoint import NonFiniteStateError, RunCheckpoints, training_state
from util.data.decode import build_fast_input, use_fast_input
from util.distributed import barrier
from util.data.folder import build_pretrain_dataset
from util.freezeout import Freezer, FreezeOutSchedule
from util.cli_help import DefaultsHelpFormatter
from util.launch import Preemption, add_launch_args, parse_or_dispatch
from util.data.loaders import build_train_loader
from util.logging import MetricWriter
from util.lr_sched import training_budget
from util.compute import adamw_kwargs, compile_model
from util.param_groups import param_groups
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record
from util.data.transforms import pretrain_transform

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze pretraining (MAE / LocalMIM)", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="mae_vit_base_patch16")
    cli.add_mim_args(parser)
    cli.add_data_args(parser)
    cli.add_decode_args(parser, what="pretraining crops")
    cli.add_compute_args(parser)
    cli.add_optim_args(parser, blr=1.5e-4, weight_decay=0.05, epochs=400, warmup_epochs=40, batch_size=64)
    cli.add_freezeout_args(parser)
    cli.add_dist_args(parser)
    cli.add_output_args(parser, save_every=20)
    add_launch_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Pretrain as ``argv`` says; returns the last epoch's training statistics."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_pretrain",
                                     models=[m for m in models.list_models() if not m.startswith("vit_")])
    if result is not None:
        return result
    info = setup_run(args)
    seed_everything(args.seed + info.rank)

    dataset = use_fast_input(build_pretrain_dataset(args.data_path, pretrain_transform(args.input_size),
                                                    strict_data=args.strict_data, debug=args.debug,
                                                    demo_size=args.input_size),
                             build_fast_input(args.decode, args.input_size))
    loader = build_train_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed,
                                device=info.device, strict_data=args.strict_data)
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
    writer = MetricWriter(args.output_dir, args.log_dir or Path(args.output_dir) / "tensorboard",
                          enabled=info.is_main)
    ckpts = RunCheckpoints(args.output_dir, epochs=args.epochs, save_every=args.save_every, enabled=info.is_main,
                           log_epoch=writer.log_epoch)
    checkpoint = ckpts.resume(args.resume, auto=args.auto_resume, model=model, optimizer=optimizer, scaler=scaler,
                              sync=freezer.sync, steps_per_epoch=steps_per_epoch)
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else args.start_epoch
    if info.is_main:
        write_run_record(args.output_dir, vars(args), {"lr": lr, "effective_batch": eff_batch,
                         "steps_per_epoch": steps_per_epoch, "world_size": info.world_size}, argv)
    logger.info("model %s: %.2fM parameters; %d images, %d steps/epoch, %d epochs from %d", args.model,
                sum(p.numel() for p in model.parameters()) / 1e6, len(dataset), steps_per_epoch, args.epochs,
                start_epoch)
    if info.is_main and args.freezeout:
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
        if args.vis_every and info.is_main else None

    loop = LoopConfig(steps_per_epoch=steps_per_epoch, accum_steps=args.accum_iter, clip_grad=args.clip_grad,
                      amp_dtype=amp_dtype, device=info.device, max_skipped_steps=args.max_skipped_steps,
                      print_freq=args.print_freq, images_per_update=eff_batch, save_every_steps=args.save_every_steps,
                      total_steps=args.epochs * steps_per_epoch)

    def state(epoch: int, progress: EpochProgress, **extra) -> dict:
        return training_state(model, optimizer, scaler, epoch=epoch, step=progress.step, skipped=progress.skipped,
                              args=vars(args), **extra)

    stats: dict = checkpoint.get("train_stats", {}) if checkpoint else {}
    skipped = checkpoint.get("skipped_steps", 0) if checkpoint else 0
    with Preemption(Path(__file__).name, argv) as preemption, ckpts:
        for epoch in range(start_epoch, args.epochs):
            progress = begin_epoch(loader, checkpoint, epoch, info, seed=args.seed, steps_per_epoch=steps_per_epoch,
                                   accum_steps=args.accum_iter, skipped=skipped)
            freezer.train()
            stats = train_one_epoch(step_fn, loader, optimizer, scaler, loop, progress, before_update=before_update,
                                    no_sync=freezer.no_sync, log_fn=writer.log, should_stop=preemption.requested,
                                    checkpoint_fn=lambda p: ckpts.save_position(state(p.epoch - 1, p), p.state_dict()))
            preemption.exit_if_stopped(progress, steps_per_epoch=steps_per_epoch,
                                       saved=ckpts.output_dir / "checkpoint-last.pth")
            skipped = progress.skipped
            vis_due = args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs)
            ckpts.end_epoch(epoch, state(epoch, progress, train_stats=stats), log={
                **{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "num_frozen": freezer.num_frozen,
                **({"loss_terms": list(loss_terms)} if loss_terms else {})},
                extra_outputs=(lambda: save_reconstruction(model, vis_imgs, args, Path(args.output_dir) /
                                                           f"vis-{epoch:04d}.png")) if vis_due else None)
            if epoch + 1 < args.epochs and preemption.requested_anywhere(info.device):
                barrier()
                preemption.exit(f"at the end of epoch {epoch}; saved {ckpts.output_dir / 'checkpoint-last.pth'}")
    writer.close()
    return stats


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = {}
    if args.all_stages:  # ViTFreeze's 12 decoders, one after every block of a depth-12 model (SPEC 3.9)
        if not args.model.startswith("MIM_"):
            raise ValueError(f"--all_stages needs a LocalMIM model (MIM_*), got {args.model}")
        kwargs = {"stage_blocks": list(range(12)), "scales": [8, 4, 4, 2, 2, 2, 2, 2, 2, 1, 1, 0.5]}
    return models.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                               hog_nbins=args.hog_nbins, hog_compat=args.hog_compat, target=args.target,
                               freeze_patch_embed=not args.dont_freeze_pe, freeze_cls_token=not args.vitfreeze_compat,
                               **kwargs)


def partial_describe(model: torch.nn.Module):
    """Names a unit for the freeze log line."""
    first_block = int(model.freeze_patch_embed)
    return lambda unit: (f"blocks.{unit - first_block} (unit {unit})" if unit >= first_block
                         else "patch embedding + cls token (unit 0)")


def save_reconstruction(model: torch.nn.Module, imgs: torch.Tensor, args: argparse.Namespace, path: Path) -> None:
    from util.vis import save_reconstruction_png  # lazy: pictures are optional
    out = reconstruct(model, imgs, mask_ratio=args.mask_ratio)
    save_reconstruction_png(path, imgs, out, model.patch_size, norm_pix_loss=args.norm_pix_loss,
                            target=model.target_kind)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    run_cli(main, NonFiniteLossError, NonFiniteStateError)
