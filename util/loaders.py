"""Data loaders whose order and augmentation depend only on (seed, epoch, rank).

A ``DistributedSampler`` is used for one process too (world size 1), so there is one code path; the loader's
generator (which seeds the workers) is re-seeded at every epoch, which makes an epoch reproducible on its own:
a run resumed after epoch k sees exactly the batches an unbroken run sees.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed for each (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63 - 1)


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, pin_memory: bool, rank: int,
                       world_size: int, seed: int) -> DataLoader:
    """Shuffled, ``drop_last`` training loader sharded over ``world_size`` ranks."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(), drop_last=True,
                      generator=torch.Generator(), persistent_workers=False)


def set_loader_epoch(loader: DataLoader, *, seed: int, epoch: int, rank: int) -> None:
    """Shuffle order and worker seeds for ``epoch`` (call before iterating)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(epoch_seed(seed, epoch, rank))
