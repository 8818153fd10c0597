"""Semantic segmentation with UperNet on a pretrained ViT (ADE20K layout): BEiT's / MAE's / dBOT's ``ade20k_seg``.

Model: ``models/pyramid.py`` (our ViT + simple feature pyramid, BEiT-style taps of blocks 3, 5, 7, 11) under
``models/seg_heads.py`` (UperNet + auxiliary FCN, loss weight 0.4). Data: ``util/data/ade20k.py`` (mmseg's
ADE20K pipelines); ``--data_path demo`` writes synthetic scenes (``util/data/scenes.py``) into
``<output_dir>/demo_scenes`` first. Schedule: mmseg's poly lr with linear warmup, by iteration; ``--max_iters``
(the seeds' 160k) is run as epochs of ``len(loader) // accum_iter`` steps, the last one cut short.
Example: ``python main_segment.py --config configs/segment/demo.yaml [--finetune output/demo/checkpoint-last.pth]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import models
from engine.evaluate import eval_shard
from engine.segment import evaluate_segmentation, poly_lr, segment_step
from engine.train import begin_epoch, EpochProgress, LoopConfig, NonFiniteLossError, train_one_epoch
from models.adapter import create_adapter
from models.convert import to_timm_vit
from models.pyramid import ViTFeaturePyramid
from models.seg_heads import UperNetSegmentor
from util import args as cli
from util.checkpoint import (find_latest, LAST_NAME, load_checkpoint, load_model_state, NonFiniteStateError,
                             RunCheckpoints, training_state)
from util.data.ade20k import ADE20KDataset, SegEvalTransform, SegTrainTransform, collate_eval
from util.data.loaders import build_train_loader
from util.data.scenes import write_ade20k
from util.distributed import barrier, broadcast_buffers, wrap_ddp
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch, Preemption
from util.logging import MetricWriter
from util.metrics import segmentation_table
from util.param_groups import param_groups
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record

logger = logging.getLogger("vitfreeze")
TAPS = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}  # BEiT's / MAE's out_indices for ViT-B and ViT-L
ARCH = {"tiny": "vit_tiny_patch16", "small": "vit_small_patch16", "base": "vit_base_patch16",
        "large": "vit_large_patch16", "huge": "vit_huge_patch14"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze semantic segmentation (UperNet)", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="vit_base_patch16")
    cli.add_backbone_args(parser)
    cli.add_optim_args(parser, blr=1.6e-3, weight_decay=0.05, epochs=1, warmup_epochs=0, batch_size=2)
    cli.add_segmentation_args(parser)
    cli.add_dist_args(parser)
    cli.add_output_args(parser, save_every=1000)
    add_launch_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (or ``--eval``) as ``argv`` says. Returns the last evaluation's ``mIoU``, ``mAcc``, ``aAcc``
    (percent), ``best_mIoU`` / ``best_step`` and the final ``step``; with ``--eval`` the metrics, per-class ``IoU`` /
    ``Acc`` lists and ``num_images``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_segment", models=[  # the seeds' short forms too
        *[m for m in models.list_models() if m.startswith(("vit_", "adapter_"))], *ARCH, *(f"vit_{a}" for a in ARCH)])
    if result is not None:
        return result
    info = setup_run(args)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(args.seed + info.rank)
    device, amp_dtype, output_dir = info.device, resolve_amp(args.amp, info.device), Path(args.output_dir)
    data_path = demo_data(output_dir, args.input_size, info) if args.data_path == "demo" else args.data_path
    crop, stride = args.input_size, args.slide_stride or max(1, (2 * args.input_size) // 3)
    val_set = ADE20KDataset(data_path, "val", SegEvalTransform(crop), num_classes=args.nb_classes,
                            reduce_zero_label=args.reduce_zero_label, strict_data=args.strict_data)
    val_loader = DataLoader(eval_shard(val_set, rank=info.rank, world_size=info.world_size), batch_size=1,
                            collate_fn=collate_eval, num_workers=min(args.num_workers, 2))
    resume = args.resume or (find_latest(output_dir) if args.auto_resume else None)
    model = build_model(args, finetune=None if resume else args.finetune).to(device)
    evaluate = partial(evaluate_segmentation, model, val_loader, device=device, num_classes=args.nb_classes,
                       crop=crop, stride=stride, amp_dtype=amp_dtype, keep=args.vis_images if info.is_main else 0)
    if args.eval:
        if not resume:
            raise ValueError("--eval needs --resume CKPT (or --auto_resume with a checkpoint in --output_dir)")
        load_model_state(model, load_checkpoint(resume)["model"], source=f"checkpoint {resume}")
        return report(evaluate(), output_dir, info.is_main, step=-1)

    train_set = ADE20KDataset(data_path, "train", SegTrainTransform(crop, tuple(args.ratio_range), args.cat_max_ratio),
                              num_classes=args.nb_classes, reduce_zero_label=args.reduce_zero_label, seed=args.seed,
                              strict_data=args.strict_data)
    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed,
                                keyed=False, epoch_indices=True)  # the dataset's own keys, (seed, epoch, index)
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one optimizer step needs")
    total = args.max_iters or args.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    warmup = args.warmup_iters if args.warmup_iters is not None else args.warmup_epochs * steps_per_epoch
    eff_batch = args.batch_size * args.accum_iter * info.world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    depth = model.depth
    unit_of = lambda name: (lambda i: None if i > depth else i)(model.layer_id(name))  # noqa: E731
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=args.weight_decay, unit_of=unit_of,
                                               no_weight_decay=model.no_weight_decay(), layer_decay=args.layer_decay,
                                               num_layers=depth + 1), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    writer = MetricWriter(output_dir, args.log_dir or output_dir / "tensorboard", enabled=info.is_main)
    # the epoch-end writes of the classification scripts: no non-finite state saved, checkpoint-last.pth last
    ckpts = RunCheckpoints(output_dir, epochs=epochs, save_every=args.save_every, enabled=info.is_main,
                           log_epoch=writer.log_epoch)
    checkpoint = ckpts.resume(args.resume, auto=args.auto_resume, model=model, optimizer=optimizer, scaler=scaler,
                              sync=lambda step: None, steps_per_epoch=steps_per_epoch,
                              required=("model", "optimizer", "epoch"), hint="a pretrained backbone goes to --finetune")
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else args.start_epoch
    best = checkpoint.get("best", {"mIoU": -1.0, "step": -1}) if checkpoint else {"mIoU": -1.0, "step": -1}
    skipped, step = (checkpoint.get("skipped_steps", 0), checkpoint.get("step", 0)) if checkpoint else (0, 0)
    if info.distributed and device.type == "cuda":  # mmseg's SyncBN; torch's SyncBatchNorm has no CPU kernel
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = wrap_ddp(model, info)
    if info.is_main:
        write_run_record(output_dir, vars(args), {"lr": lr, "effective_batch": eff_batch, "total_steps": total,
                         "epochs": epochs, "steps_per_epoch": steps_per_epoch, "world_size": info.world_size}, argv)

    def before_update(step: int) -> None:
        value = poly_lr(step, base_lr=lr, total_steps=total, warmup_steps=warmup, power=args.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = value * group["lr_scale"]

    step_fn = partial(segment_step, ddp, device=device, aux_weight=args.aux_weight)
    result: dict = {}

    def state(epoch: int, progress: EpochProgress) -> dict:
        return training_state(model, optimizer, scaler, epoch=epoch, step=progress.step, skipped=progress.skipped,
                              args=vars(args), best=best)

    with Preemption(Path(__file__).name, argv) as preemption, ckpts:
        for epoch in range(start_epoch, epochs):
            progress = begin_epoch(loader, checkpoint, epoch, info, seed=args.seed, steps_per_epoch=steps_per_epoch,
                                   accum_steps=args.accum_iter, skipped=skipped)
            model.train()
            first = epoch * steps_per_epoch
            loop = LoopConfig(steps_per_epoch=min(steps_per_epoch, total - first), accum_steps=args.accum_iter,
                              clip_grad=args.clip_grad, amp_dtype=amp_dtype, device=device,
                              max_skipped_steps=args.max_skipped_steps, print_freq=args.print_freq,
                              images_per_update=eff_batch, save_every_steps=args.save_every_steps, total_steps=total)
            stats = train_one_epoch(step_fn, loader, optimizer, scaler, loop, progress, before_update=before_update,
                                    no_sync=getattr(ddp, "no_sync", None), log_fn=writer.log,
                                    should_stop=preemption.requested,
                                    checkpoint_fn=lambda p: ckpts.save_position(state(p.epoch - 1, p), p.state_dict()))
            preemption.exit_if_stopped(progress, steps_per_epoch=loop.steps_per_epoch, saved=output_dir / LAST_NAME)
            step, last, skipped = progress.step, epoch == epochs - 1, progress.skipped
            evaluate_now = last or not args.eval_interval or step // args.eval_interval > first // args.eval_interval
            if evaluate_now:
                broadcast_buffers(model)  # BN statistics of rank 0 everywhere (per-rank BN without SyncBN on CPU)
                result = report(evaluate(), output_dir, info.is_main, step=step, vis=True)
                if result["mIoU"] > best["mIoU"]:
                    best = {"mIoU": result["mIoU"], "step": step}
            ckpts.end_epoch(epoch, state(epoch, progress), is_best=evaluate_now and best["step"] == step, log={
                **{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "step": step,
                **({f"val_{k}": result[k] for k in ("mIoU", "mAcc", "aAcc")} if evaluate_now else {})})
            if not last and preemption.requested_anywhere(device):
                barrier()
                preemption.exit(f"at the end of epoch {epoch}; saved {output_dir / LAST_NAME}")
    writer.close()
    barrier()
    return {**{k: result[k] for k in ("mIoU", "mAcc", "aAcc") if k in result}, "best_mIoU": best["mIoU"],
            "best_step": best["step"], "step": step}


def model_name(name: str) -> str:
    """The seeds' model forms: ``base`` / ``vit_base`` -> ``vit_base_patch16`` (a registered name is kept)."""
    short = name[4:] if name.startswith("vit_") and name[4:] in ARCH else name
    return ARCH.get(short, name)


def build_model(args: argparse.Namespace, *, finetune: str | None) -> UperNetSegmentor:
    """Pyramid + UperNet; the backbone from ``finetune`` (any supported checkpoint) or random."""
    if args.model.startswith("adapter_"):  # ViT-Adapter's four levels (its paper's ADE20K setting)
        if args.use_rel_pos or args.rel_pos_bias or args.layer_scale_init_value is not None:
            raise ValueError(f"--use_rel_pos / --rel_pos_bias / --layer_scale_init_value are options of the plain-ViT "
                             f"pyramid, not of the ViT-Adapter --model {args.model}; drop them")
        adapter = create_adapter(args.model, drop_path_rate=args.drop_path, window_size=args.window_size,
                                 global_blocks=tuple(args.global_blocks), grad_checkpointing=args.grad_checkpointing,
                                 vit_feature_per_interaction=True)  # the reference's segmentation backbone
        if finetune:  # as loaded: LayerScale stays a parameter, registers / SwiGLU map (models/adapter.py)
            adapter.load_backbone(load_checkpoint(finetune), source=args.checkpoint_source, what=finetune)
        return UperNetSegmentor(adapter, args.nb_classes, channels=args.channels or adapter.embed_dim,
                                aux_channels=args.aux_channels)
    name = model_name(args.model)
    width, depth = _arch(name)
    taps = args.tap_blocks
    if taps is None:
        taps = TAPS.get(depth, [depth * k // 4 - 1 for k in (1, 2, 3, 4)])
    backbone = ViTFeaturePyramid(name, img_size=args.input_size, out_channels=args.out_channels,
                                 drop_path_rate=args.drop_path, window_size=args.window_size,
                                 global_blocks=tuple(args.global_blocks), grad_checkpointing=args.grad_checkpointing,
                                 tap_blocks=tuple(taps) or None, neck=args.neck, use_rel_pos=args.use_rel_pos,
                                 rel_pos_bias=args.rel_pos_bias, layer_scale_init_value=args.layer_scale_init_value)
    if finetune:
        state, source = to_timm_vit(load_checkpoint(finetune), source=args.checkpoint_source)
        missing, unexpected = backbone.load_backbone({k: v for k, v in state.items() if not k.startswith("head.")})
        harmless = {"norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "cls_token"}
        if missing or set(unexpected) - harmless:
            raise ValueError(f"{finetune} ({source}) does not fit the backbone: missing {missing[:8]}, unexpected "
                             f"{sorted(set(unexpected) - harmless)[:8]}")
        logger.info("loaded backbone from %s (%s checkpoint); ignored: %s", finetune, source, unexpected or "none")
    elif not (args.resume or args.auto_resume):
        logger.warning("no --finetune checkpoint: the backbone starts from random initialisation (a baseline)")
    return UperNetSegmentor(backbone, args.nb_classes, channels=args.channels or width,
                            aux_channels=args.aux_channels)


def _arch(name: str) -> tuple[int, int]:
    """(embed_dim, depth) of a registered ViT, read from a meta-device instance (no memory, no init cost)."""
    with torch.device("meta"):
        vit = models.create_model(name, num_classes=0)
    return vit.embed_dim, len(vit.blocks)


def demo_data(output_dir: Path, size: int, info) -> str:
    """Synthetic scenes in the ADE20K layout under ``<output_dir>/demo_scenes`` (written once, by rank 0): 320
    training and 64 validation scenes of 5 classes, colour-coded (``class_colours``) so that a CPU demo learns."""
    root = output_dir / "demo_scenes"
    if info.is_main and not (root / "annotations" / "validation").is_dir():
        write_ade20k(root, n_train=320, n_val=64, size=size, seed=0, class_colours=True)
    barrier()
    return str(root)


def report(metrics: dict, output_dir: Path, is_main: bool, *, step: int, vis: bool = False) -> dict:
    """Log the metrics and the per-class table; rank 0 writes ``results.json`` and the pictures."""
    logger.info("step %d: mIoU %.2f  mAcc %.2f  aAcc %.2f  (%d images)", step, metrics["mIoU"], metrics["mAcc"],
                metrics["aAcc"], metrics["num_images"])
    logger.info("per-class results:\n%s", segmentation_table(metrics))
    out = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "num_images")}
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(out, indent=2) + "\n")
        if metrics["samples"]:
            from util.vis import save_segmentation_png  # lazy: pictures are optional
            save_segmentation_png(output_dir / (f"val_step{step}.png" if vis else "val_eval.png"), metrics["samples"],
                                  num_classes=len(metrics["IoU"]))
    return out


if __name__ == "__main__":
    run_cli(main, NonFiniteLossError, NonFiniteStateError)
