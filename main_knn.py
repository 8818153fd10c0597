"""Weighted k-NN evaluation of a frozen backbone (DINO's protocol, SPEC 7) on the features of a labelled dataset.

Flags follow DINO's ``eval_knn.py`` (``--nb_knn``, ``--temperature``, ``--pretrained_weights``,
``--batch_size_per_gpu``, ``--dump_features`` = ``--save_features``, ``--load_features``) and MAE's data flags.
Example: ``python main_knn.py --model vit_tiny_patch16 --finetune output/demo/checkpoint-last.pth --data_set demo
--input_size 64``. Also hosts the backbone / dataset helpers that ``main_linprobe.py`` imports.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import models
from engine.evaluate import eval_shard
from engine.knn import extract_features, knn_classify
from models.convert import backbone_state
from util import args as cli
from util.checkpoint import load_checkpoint, load_pretrained
from util.data.subsets import few_shot_indices, IndexedDataset
from util.distributed import DistInfo
from util.logging import MetricWriter
from util.metrics import mean_and_std
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record
from util.data.transfer import build_splits
from util.data.transforms import eval_transform
from util.launch import add_launch_args, parse_or_dispatch

logger = logging.getLogger("vitfreeze")
FEATURE_FILES = ("trainfeat.pth", "trainlabels.pth", "testfeat.pth", "testlabels.pth")  # DINO's names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze weighted k-NN evaluation", allow_abbrev=False)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="vit_base_patch16")
    cli.add_backbone_args(parser, weights_aliases=("--pretrained_weights",))
    cli.add_labelled_data_args(parser)
    cli.add_knn_args(parser)
    cli.add_extraction_args(parser)
    cli.add_dist_args(parser)
    cli.add_eval_output_args(parser)
    add_launch_args(parser)
    return parser


def build_backbone(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The frozen feature extractor [B, 3, H, W] -> [B, D] (timm ViT, no head), weights from ``--finetune``."""
    backbone = models.create_model(args.model, num_classes=0, img_size=args.input_size,
                                   global_pool="avg" if args.global_pool else "token")
    if args.finetune:
        state, source = backbone_state(load_checkpoint(args.finetune), backbone, source=args.checkpoint_source)
        # global pooling uses a fresh fc_norm (identity affine) unless the checkpoint has one (SPEC 5.2, 6)
        load_pretrained(backbone, state, expected_missing=("fc_norm.*",) if args.global_pool else (),
                        source=f"{args.finetune} ({source})")
    else:
        logger.warning("no --finetune checkpoint: the backbone is randomly initialised (a baseline)")
    return backbone.requires_grad_(False).eval().to(device)


def labelled_splits(args: argparse.Namespace, train_transform: Callable,
                    eval_transform: Callable) -> tuple[Dataset, Dataset, int]:
    """``train`` and ``val`` of ``--data_set`` and the number of classes, checked against each other and against
    ``--nb_classes`` (``util.data.transfer.build_splits``, as fine-tuning does)."""
    train_set, eval_sets, names = build_splits(args.data_set, args.data_path, train_transform=train_transform,
                                               eval_transform=eval_transform, nb_classes=args.nb_classes,
                                               test_split=False)
    return train_set, eval_sets["val"], len(names)


def embed(backbone: nn.Module, dataset: Dataset, args: argparse.Namespace, info: DistInfo) -> tuple[torch.Tensor, ...]:
    """Features [N, D] and labels [N] of every sample, each rank embedding an unpadded shard."""
    shard = eval_shard(IndexedDataset(dataset), rank=info.rank, world_size=info.world_size)
    loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and info.device.type == "cuda")
    return extract_features(backbone, loader, info.device, num_samples=len(dataset),
                            amp_dtype=resolve_amp(args.amp, info.device))


def knn_results(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                args: argparse.Namespace, classes: int) -> dict[str, float]:
    """Top-1/top-5 per k over the whole bank, or mean and std over ``--n_tries`` few-shot banks."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    train = train.half() if args.fp16_bank else train
    banks = [None] if not args.n_per_class else few_shot_indices(train_labels, n_per_class=args.n_per_class,
                                                                   n_tries=args.n_tries, seed=args.seed)
    runs = []
    for bank in banks:
        feats, labels = (train, train_labels) if bank is None else (train[bank.to(train.device)], train_labels[bank])
        ks = [k for k in args.nb_knn if k <= len(labels)]
        if len(ks) < len(args.nb_knn):
            logger.warning("skipping k > %d (the bank size): %s", len(labels), sorted(set(args.nb_knn) - set(ks)))
        runs.append(knn_classify(feats, labels, test, test_labels, ks=ks, temperature=args.temperature,
                                 num_classes=classes, chunk_size=args.knn_chunk_size))
    flat = [{f"knn{k}_{name}": run[k][i] for k in run for i, name in enumerate(("top1", "top5"))} for run in runs]
    return mean_and_std(flat) if args.n_per_class else flat[0]  # tries: mean and population std, as folds


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """k-NN evaluation as ``argv`` says; returns ``{'knn<k>_top1': %, 'knn<k>_top5': %, ...}``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_knn",
                                     models=[m for m in models.list_models() if m.startswith("vit_")])
    if result is not None:
        return result
    info = setup_run(args)
    seed_everything(args.seed)
    if info.is_main:
        write_run_record(args.output_dir, vars(args), {"world_size": info.world_size}, argv)
    if args.load_features:
        train, train_labels, test, test_labels = (torch.load(Path(args.load_features) / name, map_location=info.device,
                                                             weights_only=True) for name in FEATURE_FILES)
        classes = args.nb_classes or int(max(train_labels.max(), test_labels.max())) + 1
        logger.info("loaded features from %s: train %s, test %s", args.load_features, tuple(train.shape),
                    tuple(test.shape))
    else:
        backbone = build_backbone(args, info.device)
        train_set, test_set, classes = labelled_splits(args, eval_transform(args.input_size),
                                                       eval_transform(args.input_size))
        (train, train_labels), (test, test_labels) = (embed(backbone, d, args, info) for d in (train_set, test_set))
        if args.save_features and info.is_main:
            Path(args.save_features).mkdir(parents=True, exist_ok=True)
            for name, tensor in zip(FEATURE_FILES, (train, train_labels, test, test_labels)):
                torch.save(tensor.cpu(), Path(args.save_features) / name)
            logger.info("saved features to %s", args.save_features)
    results = knn_results(train, train_labels, test, test_labels, args, classes)
    pool = "mean patch token + fc_norm" if args.global_pool else "cls token after norm"
    for key, value in results.items():
        logger.info("%s: %.2f", key, value)
    if info.is_main:
        record = {**results, "feature": pool, "temperature": args.temperature, "n_per_class": args.n_per_class,
                  "n_tries": args.n_tries, "num_train": len(train_labels), "num_test": len(test_labels)}
        (Path(args.output_dir) / "knn_results.json").write_text(json.dumps(record, indent=2) + "\n")
        writer = MetricWriter(args.output_dir, args.log_dir)  # --log_dir: the results as TensorBoard scalars
        writer.log({f"knn/{k}": v for k, v in results.items()}, 0)
        writer.log_epoch(record)
        writer.close()
    return results


if __name__ == "__main__":
    run_cli(main)
