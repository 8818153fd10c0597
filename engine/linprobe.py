"""Linear probing of a frozen backbone (MAE's ``main_linprobe.py`` protocol): the flag check, the data and the
loaders of ``main_linprobe.py``.

The data are MAE's (fresh TF-style RandomResizedCrop + flip for training, resize + center crop for evaluation), or,
with ``--cache_features``, the backbone's features of the un-augmented images embedded once (``engine.knn.embed``),
on which ``--lr_grid`` trains one head per lr in the same pass (DINOv2's linear evaluation).
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from engine.evaluate import eval_shard
from engine.knn import embed
from util import preflight
from util.data.decode import DeviceInput, collate, use_eval_decode
from util.data.loaders import build_train_loader
from util.data.transfer import class_names, labelled_splits
from util.data.transforms import eval_transform, linprobe_transform
from util.distributed import DistInfo


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, before anything is built (ValueError)."""
    if args.lr_grid and not args.cache_features:
        raise ValueError("--lr_grid trains its heads on cached features: add --cache_features")


def build_data(args: argparse.Namespace, backbone: nn.Module, info: DistInfo,
               amp_dtype: torch.dtype | None) -> tuple[Dataset, Dataset, int, list[str]]:
    """Training and validation sets (images, or with ``--cache_features`` the ``backbone``'s features of them),
    the number of classes and the class names. A dry run stops before any image is embedded."""
    device = info.device
    splits = partial(labelled_splits, args.data_set, args.data_path, nb_classes=args.nb_classes)
    if args.cache_features:  # no augmentation: embed once, then epochs over tensors (MAE's probe uses fresh crops)
        train_set, val_set, classes = splits(train_transform=eval_transform(args.input_size),
                                             eval_transform=eval_transform(args.input_size))
        names = class_names(val_set)
        use_eval_decode(args.decode, args.input_size, train_set, val_set)
        if not preflight.active(args):  # a dry run stops before any image is embedded
            train_set, val_set = (TensorDataset(*(t.cpu() for t in embed(
                backbone, d, device=device, rank=info.rank, world_size=info.world_size, batch_size=args.batch_size,
                num_workers=args.num_workers, pin_memory=args.pin_mem, amp_dtype=amp_dtype))) for d in (train_set,
                                                                                                  val_set))
    else:  # MAE's linear-probe augmentation: its TF-style RandomResizedCrop + flip; eval: resize + center crop
        train_set, val_set, classes = splits(train_transform=linprobe_transform(args.input_size),
                                             eval_transform=eval_transform(args.input_size))
        names = class_names(val_set)
        use_eval_decode(args.decode, args.input_size, val_set)
    return train_set, val_set, classes, names


def build_loaders(args: argparse.Namespace, train_set: Dataset, val_set: Dataset,
                  info: DistInfo) -> tuple[DataLoader | DeviceInput, DeviceInput]:
    """The training loader (keyed crops; over cached features no workers) and this rank's shard of the validation
    set, both yielding batches on the device."""
    workers = 0 if args.cache_features else args.num_workers
    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=workers, pin_memory=args.pin_mem,
                                rank=info.rank, world_size=info.world_size, seed=args.seed,
                                keyed=not args.cache_features, device=info.device)
    val_loader = DeviceInput(DataLoader(eval_shard(val_set, rank=info.rank, world_size=info.world_size),
                                        batch_size=args.batch_size, num_workers=workers, shuffle=False,
                                        collate_fn=collate), info.device)
    return loader, val_loader
