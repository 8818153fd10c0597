"""Masked-image-modeling pretraining of Vision Transformers: MAE (pixel targets) and LocalMIM (multi-scale).

Flags follow the official MAE ``main_pretrain.py`` and LocalMIM ``run_pretrain.py``; ``--config`` reads a YAML
recipe from ``configs/pretrain/``. Example: ``python main_pretrain.py --config configs/pretrain/demo.yaml``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

import models
from engine.pretrain import mim_step, reconstruct
from engine.train import NonFiniteLossError, train_one_epoch
from util import args as cli
from util.checkpoint import find_latest, load_checkpoint, load_model_state, save_checkpoint
from util.datasets import build_pretrain_dataset
from util.distributed import cleanup, init_distributed, unwrap, wrap_ddp
from util.loaders import build_train_loader, epoch_seed, set_loader_epoch
from util.logging import MetricWriter, setup_logging
from util.lr_sched import apply_lr, cosine_lr
from util.param_groups import param_groups
from util.runtime import seed_everything, set_backend_flags, write_run_record
from util.transforms import pretrain_transform

logger = logging.getLogger("vitfreeze")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze pretraining (MAE / LocalMIM)", allow_abbrev=False)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="mae_vit_base_patch16")
    cli.add_mim_args(parser)
    cli.add_data_args(parser)
    cli.add_optim_args(parser, blr=1.5e-4, weight_decay=0.05, epochs=400, warmup_epochs=40, batch_size=64)
    cli.add_dist_args(parser)
    cli.add_output_args(parser, save_every=20)
    return parser


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AMP_DTYPES[name]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Pretrain as ``argv`` says; returns the last epoch's training statistics."""
    args = cli.parse_args(build_parser(), argv)
    if args.dry_run:
        print(cli.dump_args(args), end="")
        return {}
    info = init_distributed(dist_url=args.dist_url, local_rank=args.local_rank, device=args.device)
    setup_logging(args.output_dir if info.is_main else None, info.rank)
    seed_everything(args.seed + info.rank)
    set_backend_flags()

    dataset = build_pretrain_dataset(args.data_path, pretrain_transform(args.input_size),
                                     strict_data=args.strict_data, debug=args.debug, demo_size=args.input_size,
                                     seed=args.seed)
    loader = build_train_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed)
    steps_per_epoch = len(loader) // args.accum_iter
    eff_batch = args.batch_size * args.accum_iter * info.world_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images in {args.data_path} are fewer than one optimizer step needs "
                         f"({eff_batch} = batch_size x accum_iter x world_size)")
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    logger.info("base lr: %.3e  effective batch: %d  actual lr: %.3e%s", args.blr, eff_batch, lr,
                "  (--lr given)" if args.lr is not None else "")

    model = models.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                hog_nbins=args.hog_nbins, target=args.target).to(info.device)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=args.weight_decay, unit_of=model.unit_of),
                                  lr=lr, betas=(0.9, 0.95))
    amp_dtype = resolve_amp(args.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)

    start_epoch, skipped = args.start_epoch, 0
    resume = args.resume or (find_latest(args.output_dir) if args.auto_resume else None)
    if resume:
        checkpoint = load_checkpoint(resume)
        load_model_state(model, checkpoint["model"], source=f"checkpoint {resume}")
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"optimizer state in {resume} does not match this run: {err}") from err
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, skipped = checkpoint["epoch"] + 1, checkpoint.get("skipped_steps", 0)
        logger.info("resumed from %s (epoch %d done)", resume, checkpoint["epoch"])

    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    if info.is_main:
        write_run_record(args.output_dir, vars(args), {"lr": lr, "effective_batch": eff_batch,
                         "steps_per_epoch": steps_per_epoch, "world_size": info.world_size}, argv)
    logger.info("model %s: %.2fM parameters; %d images, %d steps/epoch, %d epochs from %d", args.model,
                sum(p.numel() for p in model.parameters()) / 1e6, len(dataset), steps_per_epoch, args.epochs,
                start_epoch)
    writer = MetricWriter(args.output_dir, args.log_dir or Path(args.output_dir) / "tensorboard",
                          enabled=info.is_main)
    ddp_model = wrap_ddp(model, info)
    schedule = partial(cosine_lr, base_lr=lr, min_lr=args.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    step_fn = partial(mim_step, ddp_model, mask_ratio=args.mask_ratio, device=info.device)
    vis_imgs = torch.stack([dataset[i][0] for i in range(0, len(dataset), -(-len(dataset) // 8))]).to(info.device) \
        if args.vis_every and info.is_main else None

    stats: dict[str, float] = {}
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, epoch, info.rank))
        set_loader_epoch(loader, seed=args.seed, epoch=epoch, rank=info.rank)
        model.train()
        stats = train_one_epoch(step_fn, loader, optimizer, scaler, before_update=lambda s: apply_lr(optimizer,
                                schedule(s)), start_step=epoch * steps_per_epoch, num_steps=steps_per_epoch,
                                accum_steps=args.accum_iter, clip_grad=args.clip_grad, amp_dtype=amp_dtype,
                                device=info.device, model=ddp_model, max_skipped_steps=args.max_skipped_steps,
                                skipped_before=skipped, print_freq=args.print_freq, log_fn=writer.log,
                                header=f"Epoch: [{epoch}]")
        skipped = int(stats["skipped_steps"])
        if info.is_main:
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": int(stats["step"]),
                     "skipped_steps": skipped, "args": vars(args), "rng": {"torch": torch.get_rng_state()}}
            save_checkpoint(Path(args.output_dir) / "checkpoint-last.pth", state)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                save_checkpoint(Path(args.output_dir) / f"checkpoint-{epoch}.pth", state)
            writer.log_epoch({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
            if args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
                save_reconstruction(model, vis_imgs, args, Path(args.output_dir) / f"vis-{epoch:04d}.png")
    writer.close()
    return stats


def save_reconstruction(model: torch.nn.Module, imgs: torch.Tensor, args: argparse.Namespace, path: Path) -> None:
    from util.vis import save_reconstruction_png  # lazy: pictures are optional
    out = reconstruct(model, imgs, mask_ratio=args.mask_ratio)
    save_reconstruction_png(path, imgs, out, model.patch_size, norm_pix_loss=args.norm_pix_loss,
                            target=model.target_kind)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, NonFiniteLossError) as error:
        logging.getLogger("vitfreeze").error("%s: %s", type(error).__name__, error)
        sys.exit(1)
    finally:
        cleanup()
