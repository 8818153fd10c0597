"""Weighted k-NN evaluation of a frozen backbone (DINO's protocol, ``eval_knn.py``) on the features of a labelled dataset.

Flags follow DINO's ``eval_knn.py`` (``--nb_knn``, ``--temperature``, ``--pretrained_weights``,
``--batch_size_per_gpu``, ``--dump_features`` = ``--save_features``, ``--load_features``) and MAE's data flags.
Example: ``python main_knn.py --model vit_tiny_patch16 --finetune output/demo/checkpoint-last.pth --data_set demo
--input_size 64``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

import models
from engine.knn import embed, FEATURE_FILES, knn_results, load_features
from models.backbone import build_backbone
from util import args as cli_args, preflight
from util.checkpoint import load_checkpoint
from util.logging import MetricWriter
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record
from util.data.decode import use_eval_decode
from util.data.transfer import labelled_splits
from util.data.transforms import eval_transform
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.outputs import write_text

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze weighted k-NN evaluation", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli_args.add_config_args(parser)
    cli_args.add_model_args(parser, default_model="vit_base_patch16")
    cli_args.add_backbone_args(parser, weights_aliases=("--pretrained_weights",))
    cli_args.add_labelled_data_args(parser)
    cli_args.add_decode_args(parser, what="evaluation crops (resize + center crop)")
    cli_args.add_knn_args(parser)
    cli_args.add_extraction_args(parser)
    cli_args.add_dist_args(parser)
    cli_args.add_eval_output_args(parser)
    add_launch_args(parser)
    return parser


@preflight.entry_point
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """k-NN evaluation as ``argv`` says; returns ``{'knn<k>_top1': %, 'knn<k>_top5': %, ...}``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_knn",
                                     models=[m for m in models.list_models() if m.startswith("vit_")])
    if result is not None:
        return result
    info = setup_run(args)
    seed_everything(args.seed)
    dry_run = preflight.active(args)
    if info.is_main and not dry_run:
        write_run_record(args.output_dir, vars(args), {"world_size": info.world_size}, argv)
    if args.load_features:  # a dry run checks them on the CPU: the labels give the class count
        train, train_labels, test, test_labels = load_features(args.load_features, torch.device("cpu") if dry_run
                                                               else info.device)
        classes = args.nb_classes or int(max(train_labels.max(), test_labels.max())) + 1
        logger.info("loaded features from %s: train %s, test %s", args.load_features, tuple(train.shape),
                    tuple(test.shape))
    else:
        backbone = build_backbone(args.model, img_size=args.input_size, global_pool=args.global_pool,
                                  checkpoint=load_checkpoint(args.finetune) if args.finetune else None,
                                  checkpoint_source=args.checkpoint_source, name=args.finetune).to(info.device)
        train_set, test_set, classes = labelled_splits(args.data_set, args.data_path, nb_classes=args.nb_classes,
                                                       train_transform=eval_transform(args.input_size),
                                                       eval_transform=eval_transform(args.input_size))
        use_eval_decode(args.decode, args.input_size, train_set, test_set)
        if dry_run:  # where the images would be embedded
            preflight.passed(args, backbone, classes=classes, k=", ".join(map(str, args.nb_knn)))
        (train, train_labels), (test, test_labels) = (
            embed(backbone, d, device=info.device, rank=info.rank, world_size=info.world_size,
                  batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=args.pin_mem,
                  amp_dtype=resolve_amp(args.amp, info.device)) for d in (train_set, test_set))
        if args.save_features and info.is_main:
            Path(args.save_features).mkdir(parents=True, exist_ok=True)
            for name, tensor in zip(FEATURE_FILES, (train, train_labels, test, test_labels)):
                torch.save(tensor.cpu(), Path(args.save_features) / name)
            logger.info("saved features to %s", args.save_features)
    if dry_run:
        preflight.passed(args, classes=classes, features=f"train {tuple(train.shape)}, test {tuple(test.shape)}")
    results = knn_results(train, train_labels, test, test_labels, args, classes)
    pool = "mean patch token + fc_norm" if args.global_pool else "cls token after norm"
    for key, value in results.items():
        logger.info("%s: %.2f", key, value)
    if info.is_main:
        record = {**results, "feature": pool, "temperature": args.temperature, "n_per_class": args.n_per_class,
                  "n_tries": args.n_tries, "num_train": len(train_labels), "num_test": len(test_labels)}
        write_text(Path(args.output_dir) / "knn_results.json", json.dumps(record, indent=2) + "\n")
        writer = MetricWriter(args.output_dir, args.log_dir)  # --log_dir: the results as TensorBoard scalars
        writer.log({f"knn/{k}": v for k, v in results.items()}, 0)
        writer.log_epoch(record)
        writer.close()
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_knn.py`` and ``run_knn.py``): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv))


if __name__ == "__main__":
    cli()
