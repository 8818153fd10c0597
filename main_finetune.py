"""End-to-end fine-tuning of a pretrained ViT for classification: MAE's recipe (``main_finetune.py``) and the transfer recipes (MoCo v3, dBOT, the medical sets).

Flags follow MAE's ``main_finetune.py`` (He et al., CVPR 2022; github.com/facebookresearch/mae) so the published MAE / LocalMIM / ViTFreeze commands
paste unchanged; recipes are in ``configs/finetune/``. Checkpoints of this project, MAE, LocalMIM/ViTFreeze, MoCo v3,
DINOv2 and timm/DeiT load through ``models/convert.py``. ``--split_file`` runs the folds of a CSV (HyperKvasir,
GastroVision) and reports mean and std; ``--freezeout`` freezes leading blocks on pretraining's FreezeOut schedule.
Example: ``python main_finetune.py --config configs/finetune/demo.yaml --finetune output/demo/checkpoint-last.pth``.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import models
from engine.evaluate import eval_shard, evaluate, evaluate_and_report
from engine.finetune import build_criterion, classify_step
from engine.run import Best, EpochEnd, fit, metric_writer, Outcome, Task
from engine.train import NonFiniteLossError
from models.backbone import freeze_unit, load_finetune_weights
from models.registry import checkpoint_vs_model
from util import args as cli_args, preflight
from util.checkpoint import NonFiniteStateError, find_latest, load_checkpoint, load_model_state
from util.distributed import DistInfo, barrier
from engine.freezeout import Freezer, FreezeOutSchedule
from util.data.loaders import build_train_loader
from util.logging import dumps_json, log_prefix, write_results
from util.lr_sched import training_budget
from engine.metrics import mean_and_std
from util.param_groups import param_groups
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run
from util.data.transfer import build_splits, csv_folds
from util.data.transforms import eval_transform, finetune_transform
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.outputs import write_text

logger = logging.getLogger("vitfreeze")
PRETRAIN_ONLY = ("all_stages", "dont_freeze_pe", "vitfreeze_compat")  # FreezeOut flags of the MIM models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze fine-tuning", allow_abbrev=False, formatter_class=DefaultsHelpFormatter)
    cli_args.add_config_args(parser)
    cli_args.add_model_args(parser, default_model="vit_base_patch16")
    cli_args.add_backbone_args(parser)
    cli_args.add_finetune_args(parser)
    cli_args.add_labelled_data_args(parser)
    cli_args.add_transfer_data_args(parser)
    cli_args.add_optim_args(parser, blr=1e-3, weight_decay=0.05, epochs=50, warmup_epochs=5, batch_size=64, min_lr=1e-6)
    cli_args.add_freezeout_args(parser)
    cli_args.add_dist_args(parser)
    cli_args.add_output_args(parser, save_every=20)
    parser.set_defaults(global_pool=True)  # MAE fine-tunes on the mean patch token; --cls_token: token 0
    add_launch_args(parser)
    return parser


@preflight.entry_point
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fine-tune (``--eval``: evaluate) as ``argv`` says.

    Returns:
        The last epoch's validation metrics (``acc1``, ``acc5``, ``loss``, ``precision``, ``recall``, ``f1``,
        ``mcc``, ...) with ``best_acc1`` / ``best_epoch`` and ``test_*`` (best model on ``test/``, when present);
        over several folds the mean of every value plus ``<key>_std`` (population std, as MAE reports seeds).
    """
    args, result = parse_or_dispatch(build_parser(), argv, "main_finetune",
                                     models=[m for m in models.list_models() if m.startswith("vit_")])
    if result is not None:
        return result
    check_args(args)
    info = setup_run(args)
    folds = args.fold or (csv_folds(args.data_path, args.split_file) if args.split_file else [None])
    if len(folds) == 1:
        return run(args, info, argv, fold=folds[0], output_dir=Path(args.output_dir), log_dir=args.log_dir)
    results = []
    for k in folds:
        with log_prefix(f"[fold {k}] "):
            results.append(run(args, info, argv, fold=k, output_dir=Path(args.output_dir) / f"fold_{k}",
                               log_dir=args.log_dir and str(Path(args.log_dir) / f"fold_{k}")))
    summary = mean_and_std(results)
    logger.info("folds %s: %s", folds, "  ".join(f"{k} {summary[k]:.2f} ± {summary[k + '_std']:.2f}" for k in
                                                    ("acc1", "precision", "recall", "f1", "mcc") if k in summary))
    if info.is_main:
        write_text(Path(args.output_dir) / "folds.json", dumps_json({"folds": folds, "per_fold": results,
                                                                       "summary": summary}, indent=2) + "\n")
    return summary


def run(args: argparse.Namespace, info: DistInfo, argv: Sequence[str] | None, *, fold: int | None,
        output_dir: Path, log_dir: str | None) -> dict[str, float]:
    """One fine-tuning (or evaluation) run on one fold; see :func:`main` for the returned keys."""
    seed_everything(args.seed + info.rank)
    device, amp_dtype = info.device, resolve_amp(args.amp, info.device)
    train_set, eval_sets, names = build_data(args, fold)
    resume = args.resume or (find_latest(output_dir) if args.auto_resume else None)
    if args.eval and not resume:
        raise ValueError("--eval evaluates a fine-tuned checkpoint: pass --resume CKPT (or --auto_resume with a "
                         f"checkpoint in {output_dir}); --finetune loads a backbone under a fresh head")
    model = build_model(args, len(names), finetune=None if resume else args.finetune).to(device)
    eval_loaders = {split: DataLoader(eval_shard(ds, rank=info.rank, world_size=info.world_size), shuffle=False,
                                      batch_size=args.batch_size, num_workers=args.num_workers) for split, ds in
                    eval_sets.items()}
    report = partial(evaluate_and_report, model, eval_loaders, names=names, device=device, amp_dtype=amp_dtype,
                     output_dir=output_dir if info.is_main else None)
    if args.eval:
        load_model_state(model, load_checkpoint(resume)["model"], source=f"checkpoint {resume}",
                         describe=checkpoint_vs_model)
        if preflight.active(args):
            preflight.passed(args, model, evaluate=f"{resume} on {', '.join(eval_sets)}")
        return write_results(output_dir if info.is_main else None, report())

    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(train_set), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)
    depth = len(model.blocks)
    unit_of = partial(freeze_unit, depth=depth)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=args.weight_decay, unit_of=unit_of,
                                               no_weight_decay=model.no_weight_decay(), layer_decay=args.layer_decay,
                                               num_layers=depth + 1), lr=lr)  # betas (0.9, 0.999) as MAE's
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # without --freezeout t_0 = 1: each group follows cosine_lr x lr_scale and nothing freezes (one code path)
    schedule = FreezeOutSchedule(num_units=depth + 1, total_steps=args.epochs * steps_per_epoch, base_lr=lr,
                                 warmup_steps=args.warmup_epochs * steps_per_epoch, min_lr=args.min_lr,
                                 t_0=args.t_0 if args.freezeout else 1.0, how_scale=args.how_scale,
                                 scale_lr=not args.not_scale_lr, layerwise_lr=not args.non_layerwise_lr)
    freezer = Freezer(model, optimizer, schedule, unit_of=unit_of, dist=info,
                      describe_unit=lambda u: f"blocks.{u - 1} (unit {u})" if u else "patch embedding + tokens")
    if info.is_main and args.freezeout and not preflight.active(args):
        from util.vis import save_schedule_png  # lazy: pictures are optional
        logger.info("wrote %s", save_schedule_png(output_dir / "freezeout_schedule.png", schedule,
                                                  steps_per_epoch=steps_per_epoch))
    mixup_fn, criterion = build_criterion(num_classes=len(names), smoothing=args.smoothing, mixup=args.mixup,
                                          cutmix=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                                          mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob,
                                          mixup_mode=args.mixup_mode)
    writer = metric_writer(args, info, output_dir, log_dir)

    def step_fn(batch, step: int) -> dict:
        return classify_step(freezer.module, batch, step, criterion=criterion, device=device, mixup_fn=mixup_fn)

    def end_epoch(epoch: int, stats: dict, metrics: dict, run: Outcome) -> EpochEnd:
        result = {k: v for k, v in metrics.items() if k != "confusion"}  # the matrix stays with the best record
        writer.log_validation(result, epoch)
        logger.info("epoch %d: val acc1 %.2f  acc5 %.2f  f1 %.2f  mcc %.2f  loss %.4f  (best acc1 %.2f, epoch %d)",
                    epoch, result["acc1"], result["acc5"], result["f1"], result["mcc"], result["loss"],
                    run.best["acc1"], run.best["epoch"])
        return EpochEnd(log={**{f"val_{k}": v for k, v in result.items()}, "epoch": epoch,
                             "num_frozen": freezer.num_frozen}, state={"metrics": result}, metrics=result)

    task = Task(step=step_fn, before_update=freezer.before_update, train=freezer.train, no_sync=freezer.no_sync,
                evaluate=lambda epoch, progress: evaluate(model, eval_loaders["val"], device=device,
                                                          num_classes=len(names), amp_dtype=amp_dtype),
                best=Best("acc1", {"acc1": -1.0, "epoch": -1}, lambda m, epoch, progress: {
                    "acc1": m["acc1"], "epoch": epoch, "confusion": m["confusion"]}),
                end_epoch=end_epoch, state=lambda run: {"classes": names})
    run = fit(task, args, info, model=model, optimizer=optimizer, scaler=scaler, loader=loader, writer=writer,
              steps_per_epoch=steps_per_epoch, images_per_update=eff_batch, amp_dtype=amp_dtype, output_dir=output_dir,
              sync=freezer.sync, required=("model", "optimizer", "epoch", "best"),
              hint="a pretrained or foreign checkpoint goes to --finetune; --eval evaluates one",
              record={"lr": lr, "effective_batch": eff_batch, "classes": len(names), "fold": fold,
                      "steps_per_epoch": steps_per_epoch, "world_size": info.world_size},
              script=Path(__file__).name, argv=argv)
    result, best = run.metrics, run.best
    if "test" in eval_loaders and best["epoch"] != args.epochs - 1:  # test the model selected on val
        barrier()  # rank 0 has written checkpoint-best.pth
        load_model_state(model, load_checkpoint(output_dir / "checkpoint-best.pth")["model"], source="best checkpoint",
                         describe=checkpoint_vs_model)
    tested = {k: v for k, v in report(best=best).items() if k.startswith("test_")}
    return write_results(output_dir if info.is_main else None,
                         {**result, "best_acc1": best["acc1"], "best_epoch": best["epoch"], **tested})


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, before anything is built (ValueError)."""
    bad = [f"--{name}" for name in PRETRAIN_ONLY if getattr(args, name)]
    if bad:
        raise ValueError(f"{', '.join(bad)} applies to pretraining (MIM models) only, not to fine-tuning")
    if mixup_active(args) and args.batch_size % 2:
        raise ValueError(f"mixup/cutmix pairs the images of a batch: --batch_size must be even, got {args.batch_size}")
    if args.split_file and args.data_set != "folder":
        raise ValueError(f"--split_file needs --data_set folder, got --data_set {args.data_set}")
    if args.fold and not args.split_file:
        raise ValueError("--fold selects a fold of --split_file (CSV with columns file,label,fold); none given")


def build_data(args: argparse.Namespace, fold: int | None) -> tuple[Dataset, dict[str, Dataset], list[str]]:
    """Training set (fine-tuning augmentation), evaluation sets and class names (``build_splits``)."""
    train_tf = finetune_transform(args.input_size, auto_augment=args.aa, color_jitter=args.color_jitter,
                                  re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    return build_splits(args.data_set, args.data_path, train_transform=train_tf,
                        eval_transform=eval_transform(args.input_size), download=args.download,
                        split_file=args.split_file, fold=fold, train_per_class=args.train_per_class, seed=args.seed,
                        nb_classes=args.nb_classes)


def build_model(args: argparse.Namespace, classes: int, *, finetune: str | None) -> nn.Module:
    """timm ViT with a ``classes``-way head and the backbone of ``finetune`` (None: random, or resumed later)."""
    if not args.model.startswith("vit_"):
        raise ValueError(f"--model {args.model} is not a classification backbone; choose one of "
                         f"{[m for m in models.list_models() if m.startswith('vit_')]}")
    model = models.create_model(args.model, img_size=args.input_size, num_classes=classes,
                                global_pool="avg" if args.global_pool else "token", drop_path_rate=args.drop_path)
    if finetune:
        load_finetune_weights(model, load_checkpoint(finetune), source=args.checkpoint_source, name=finetune,
                              global_pool=args.global_pool, head_init_std=args.head_init_std,
                              what=f"--model {args.model}")
    elif not (args.resume or args.auto_resume):
        logger.warning("no --finetune checkpoint: training from random initialisation (a baseline)")
    return model


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_finetune.py`` and its aliases): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
