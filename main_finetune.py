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
from pathlib import Path
from typing import Sequence

import models
from engine.finetune import check_args, run
from engine.metrics import mean_and_std
from engine.train import NonFiniteLossError
from util import args as cli_args, preflight
from util.checkpoint import NonFiniteStateError
from util.logging import dumps_json, log_prefix
from util.runtime import run_cli, setup_run
from util.data.transfer import csv_folds
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.outputs import write_text

logger = logging.getLogger("vitfreeze")


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


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_finetune.py`` and its aliases): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
