"""Training loaders whose batches do not depend on how the run is split over processes.

- Order: a ``DistributedSampler`` is used for one process too (world size 1), so there is one code path. Its
  permutation depends only on (seed, epoch); rank r takes positions r, r + W, r + 2W, ... so optimizer step s
  of W processes x batch b sees exactly the samples of step s of 1 process x batch W*b, or of 1 process x
  batch b x ``accum_iter`` W.
- Randomness: every sample carries a key, a hash of (seed, epoch, index) (``sample_key``). ``KeyedSamples``
  seeds the augmentation of a sample with its key and returns the key as a third item, from which the MIM
  step draws the sample's mask (``models.masking.keyed_noise``). A sample's crop, flip and mask are therefore
  the same whatever the number of processes, the batch size, the number of workers or a resume: changing
  NGPUS (with ``--eff_batch_size`` keeping the effective batch) does not change the run beyond float
  rounding. Randomness that is not per sample (drop path, mixup) still comes from the per-rank RNGs
  (``epoch_seed``), reseeded every epoch, so an epoch is reproducible on its own.
"""
from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["epoch_seed", "sample_key", "KeyedSamples", "build_train_loader", "set_loader_epoch"]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed for each (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63 - 1)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """A 63-bit key for the randomness of sample ``index`` in ``epoch``: numpy's ``SeedSequence`` hash, so keys
    of neighbouring (seed, epoch, index) are unrelated and can seed independent generators."""
    low, high = np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(2, np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)



class KeyedSamples(Dataset):
    """``dataset[i]`` augmented under the seed ``sample_key(seed, epoch, i)``; items are ``(image, label, key)``.

    The global CPU torch generator and Python's ``random`` (torchvision and timm transforms draw from them) are
    seeded with the key for the duration of the item and restored afterwards, so the caller's RNG streams are
    untouched. Cost: about 30 us an item (``benchmarks/keyed_samples.py``).
    ``classes``/``targets`` pass through; call ``set_epoch`` before each epoch (``set_loader_epoch`` does).
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getattr__(self, name: str) -> Any:  # classes, targets, samples, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        key = sample_key(self.seed, self.epoch, index)
        # The CPU generator alone (torch.manual_seed also seeds every accelerator: ~90 us an item, this ~1 us).
        generator = torch.default_generator
        torch_state, python_state = generator.get_state(), random.getstate()
        generator.manual_seed(key)
        random.seed(key)
        try:
            item = self.dataset[index]
        finally:
            generator.set_state(torch_state)
            random.setstate(python_state)
        return item[0], item[1], key


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, pin_memory: bool, rank: int,
                       world_size: int, seed: int, keyed: bool = True, collate_fn: Callable | None = None) -> DataLoader:
    """Shuffled, ``drop_last`` training loader sharded over ``world_size`` ranks, of ``KeyedSamples(dataset)``
    (or of ``dataset`` itself with ``keyed=False``: items without randomness, e.g. cached features, where the
    per-item reseeding would cost more than the item); ``collate_fn`` as DataLoader's (detection keeps lists)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(KeyedSamples(dataset, seed=seed) if keyed else dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(), drop_last=True,
                      generator=torch.Generator(), persistent_workers=False, collate_fn=collate_fn)


def set_loader_epoch(loader: DataLoader, *, seed: int, epoch: int, rank: int) -> None:
    """Shuffle order, sample keys and worker seeds for ``epoch`` (call before iterating)."""
    loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, KeyedSamples):
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(epoch_seed(seed, epoch, rank))
