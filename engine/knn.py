"""Weighted k-NN evaluation of frozen features (DINO's protocol) with exact, index-aware distributed extraction.

Derived from DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
github.com/facebookresearch/dino ``eval_knn.py``):

- ``extract_features``: every rank embeds its shard of an ``IndexedDataset`` and the (index, feature, label)
  triples of all ranks are gathered once and written to row ``index``: ordering and padding cannot misalign
  features and labels (ViTFreeze's ``run_knn.py`` lost that alignment and scored chance).
- ``embed``: the same for a plain labelled dataset (builds the sharded loader).
- ``knn_classify``: cosine similarity of L2-normalised features, the k most similar training samples vote
  with weight exp(sim / T) for their class, classes ranked by summed weight; top-1 and top-5 (top-5 over
  min(5, k) classes, as DINO). Several k share one top-k search (the k nearest are a prefix of the kmax nearest).
  Memory is bounded: similarities are computed for ``chunk_size`` test rows at a time, never the full
  test x train matrix, and the bank may be fp16. Under ``torch.distributed`` the chunks are dealt out to the
  ranks and the integer hit counts all-reduced, so every rank gets the single-process numbers.
- Few-shot banks (N labelled samples per class per seeded try) are drawn by ``util.data.subsets.few_shot_indices``.
- ``knn_results`` and ``load_features`` are ``main_knn.py``'s: the scores per k over the whole bank or the few-shot
  banks, and DINO's ``--load_features`` files read back with their shapes checked.

Deviations from DINO (same results up to float summation order): votes are summed with ``scatter_add_`` instead
of a [B * k, C] one-hot product (less memory), and classes with equal scores are ranked by class index (stable
sort) instead of an unspecified order, which makes top-5 with fewer than 5 voting classes deterministic.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torch.utils.data import DataLoader, Dataset

from engine.evaluate import eval_shard
from engine.metrics import mean_and_std
from util.checkpoint import unreadable_reason
from util.data.decode import DeviceInput, collate
from util.data.subsets import IndexedDataset, few_shot_indices
from util.distributed import all_gather_cat, all_reduce_sum, rank_and_world

__all__ = ["FEATURE_FILES", "embed", "extract_features", "knn_classify", "knn_results", "load_features"]

logger = logging.getLogger("vitfreeze")
FEATURE_FILES = ("trainfeat.pth", "trainlabels.pth", "testfeat.pth", "testlabels.pth")  # DINO's names


def embed(backbone: nn.Module, dataset: Dataset, *, device: torch.device, rank: int = 0, world_size: int = 1,
          batch_size: int, num_workers: int = 0, pin_memory: bool = False,
          amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Features [N, D] and labels [N] of every sample of ``dataset`` (items ``(image, label)``), each rank embedding
    an unpadded shard (:func:`extract_features`); k-NN and the linear probe's cached features."""
    shard = eval_shard(IndexedDataset(dataset), rank=rank, world_size=world_size)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=pin_memory and device.type == "cuda", collate_fn=collate)
    # DeviceInput: images arrive normalized on the device whatever --decode made of them (uint8 or float)
    return extract_features(backbone, DeviceInput(loader, device), device, num_samples=len(dataset),
                            amp_dtype=amp_dtype)


@torch.inference_mode()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device, *, num_samples: int | None = None,
                     amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Embed a dataset sharded over ranks; every rank gets all features in dataset order.

    Args:
        model: maps images [B, 3, H, W] to features [B, D]; put in eval mode here.
        loader: this rank's shard of an ``IndexedDataset``: yields ``(images, labels, indices)``. Shards may be
            uneven or padded with repeats (a repeated index writes an identical row).
        device: where the model runs; the results live there too.
        num_samples: N, the size of the whole dataset (default: largest gathered index + 1).
        amp_dtype: autocast dtype for the forward (None: full precision); features are returned in fp32.

    Returns:
        ``(features [N, D] float32, labels [N] int64)``, row i = sample i, identical on every rank.

    Raises:
        ValueError: some sample index in [0, N) was not embedded by any rank.
    """
    model.eval()
    feats, labels, indices = [], [], []
    for images, targets, index in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images.to(device, non_blocking=True))
        feats.append(out.float())
        labels.append(targets.to(device))
        indices.append(index.to(device))
    dim = _feature_dim(model, feats)
    local = (torch.cat(feats) if feats else torch.zeros(0, dim, device=device),
             torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.int64, device=device),
             torch.cat(indices).long() if indices else torch.zeros(0, dtype=torch.int64, device=device))
    all_feats, all_labels, all_indices = (all_gather_cat(t) for t in local)
    n = num_samples if num_samples is not None else int(all_indices.max()) + 1 if all_indices.numel() else 0
    seen = torch.zeros(n, dtype=torch.bool, device=device)
    seen[all_indices] = True
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:8].tolist()
        raise ValueError(f"{int((~seen).sum())} of {n} samples were not embedded by any rank, e.g. {missing}")
    features = torch.zeros(n, all_feats.shape[1], device=device).index_copy_(0, all_indices, all_feats)
    out_labels = torch.zeros(n, dtype=torch.int64, device=device).index_copy_(0, all_indices, all_labels)
    return features, out_labels


def _feature_dim(model: nn.Module, feats: list[Tensor]) -> int:
    if feats:
        return feats[0].shape[1]
    return int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))


def _check_normalised(feats: Tensor, name: str) -> None:
    norms = feats[:1024].float().norm(dim=1)
    if norms.numel() and not bool(((norms - 1).abs() < 1e-2).all()):
        raise ValueError(f"{name} must be L2-normalised along dim 1 (row norms {norms.min():.3f}..{norms.max():.3f})")


@torch.no_grad()
def knn_classify(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, num_classes: int,
                 chunk_size: int = 256, distributed: bool = True) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1 / top-5 accuracy (percent) for several k in one pass over the test set.

    Args:
        train_feats: bank [N, D], rows L2-normalised; fp32 or fp16 (similarities are accumulated by the matmul
            in the bank's dtype, votes in fp32).
        train_labels: [N] class indices.
        test_feats: [M, D], rows L2-normalised.
        test_labels: [M] class indices.
        ks: neighbour counts, each <= N.
        temperature: T of the vote weight exp(sim / T).
        num_classes: C.
        chunk_size: test rows per similarity block ([chunk_size, N] floats in memory at a time).
        distributed: deal the chunks out to the ranks of the process group and all-reduce the hit counts
            (a collective: call on every rank with the same arguments). False computes everything locally.

    Returns:
        ``{k: (top1, top5)}`` in percent of M.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > train_feats.shape[0]:
        raise ValueError(f"every k must be in [1, {train_feats.shape[0]}] (the bank size), got {ks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name} labels range from {int(labels.min())} to {int(labels.max())}, outside the "
                             f"{num_classes} classes 0..{num_classes - 1} (--nb_classes)")
    _check_normalised(train_feats, "train_feats")
    _check_normalised(test_feats, "test_feats")
    rank, world = rank_and_world() if distributed else (0, 1)
    bank_t = train_feats.t()  # [D, N] view, no copy
    train_labels = train_labels.to(train_feats.device).long()
    hits = torch.zeros(len(ks), 2, dtype=torch.int64, device=train_feats.device)
    for chunk, start in enumerate(range(0, test_feats.shape[0], chunk_size)):
        if chunk % world != rank:
            continue
        feats = test_feats[start:start + chunk_size].to(train_feats.device, train_feats.dtype)
        targets = test_labels[start:start + chunk_size].to(train_feats.device).long()
        sim, nearest = (feats @ bank_t).float().topk(ks[-1], dim=1)  # [b, kmax], most similar first
        votes, weights = train_labels[nearest], (sim / temperature).exp()
        for i, k in enumerate(ks):
            scores = torch.zeros(feats.shape[0], num_classes, device=feats.device)
            scores.scatter_add_(1, votes[:, :k], weights[:, :k])
            ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :min(5, k, num_classes)]
            correct = ranked.eq(targets[:, None])
            hits[i, 0] += correct[:, 0].sum()
            hits[i, 1] += correct.any(dim=1).sum()
    if distributed:
        hits = all_reduce_sum(hits)
    total = max(test_feats.shape[0], 1)
    return {k: (100.0 * int(hits[i, 0]) / total, 100.0 * int(hits[i, 1]) / total) for i, k in enumerate(ks)}


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


def load_features(folder: str | Path, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``--load_features``: train features [N, D], labels [N], test features [M, D], labels [M] (DINO's files).

    Raises:
        FileNotFoundError: the folder or one of its four files is missing.
        ValueError: a file is not a tensor saved by torch.save, or the shapes / label types do not fit together.
    """
    folder, hint = Path(folder), f"pass the folder that --save_features wrote ({', '.join(FEATURE_FILES)})"
    if not folder.is_dir():
        raise FileNotFoundError(f"--load_features {folder} is not a folder; {hint}")
    tensors = []
    for name in FEATURE_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"--load_features {folder} has no {name}; {hint}")
        try:
            tensor = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # torch raises EOFError, KeyError, RuntimeError... for a bad file
            raise ValueError(f"--load_features: {unreadable_reason(path, err, 'feature file')}") from None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"--load_features: {path} holds a {type(tensor).__name__}, not a tensor; {hint}")
        tensors.append(tensor)
    train, train_labels, test, test_labels = tensors
    for feats, labels, split in ((train, train_labels, "train"), (test, test_labels, "test")):
        if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels) or not len(labels):
            raise ValueError(f"--load_features {folder}: {split} features {tuple(feats.shape)} and labels "
                             f"{tuple(labels.shape)} do not fit ([N, D] and [N], N > 0); {hint}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"--load_features {folder}: {split} labels are {labels.dtype}, not class indices")
    samples = len(train_labels) + len(test_labels)
    low, high = int(min(train_labels.min(), test_labels.min())), int(max(train_labels.max(), test_labels.max()))
    if low < 0 or high >= samples:  # more classes than samples: not class indices (10**12 would allocate TBs)
        raise ValueError(f"--load_features {folder}: labels range from {low} to {high} over {samples} samples; they "
                         f"must be class indices 0..C-1 (C at most the number of samples)")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"--load_features {folder}: train features have {train.shape[1]} dims, test {test.shape[1]}"
                         " (files of two different backbones?)")
    return train, train_labels, test, test_labels
