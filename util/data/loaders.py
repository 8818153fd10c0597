"""Training loaders whose batches do not depend on how the run is split over processes.

- Order: a ``DistributedSampler`` is used for one process too (world size 1), so there is one code path. Its
  permutation depends only on (seed, epoch); rank r takes positions r, r + W, r + 2W, ... so optimizer step s
  of W processes x batch b sees exactly the samples of step s of 1 process x batch W*b, or of 1 process x
  batch b x ``accum_iter`` W.
- Randomness: every sample carries a key, a hash of (seed, epoch, index) (``sample_key``). ``KeyedSamples``
  seeds the augmentation of a sample (torch, ``random`` and NumPy) with its key and returns the key as a third
  item, from which the MIM step draws the sample's mask (``models.masking.keyed_noise``). A sample's crop, flip,
  RandAugment ops, erased box and mask are therefore the same whatever the number of processes, the batch
  size, the number of workers or a resume: changing NGPUS (with ``--eff_batch_size`` keeping the effective batch) does not change the run beyond float
  rounding. The sampler hands each worker ``(epoch, index)``, so persistent workers (kept across epochs) still
  draw the current epoch's keys. Randomness that is not per sample (drop path, mixup) still comes from the per-rank RNGs
  (``epoch_seed``), reseeded every epoch, so an epoch is reproducible on its own.
"""
from __future__ import annotations

import contextlib
import itertools
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from util.data.decode import DeviceInput, collate

__all__ = ["epoch_seed", "sample_key", "keyed_rng", "KeyedSamples", "ResumableSampler", "build_train_loader",
           "set_loader_epoch"]


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

    The global generators a transform draws from are seeded with the key for the duration of the item and
    restored afterwards, so the caller's RNG streams are untouched: the CPU torch generator (torchvision's
    crops and flips, timm's random erasing), Python's ``random`` (timm's op probabilities and magnitudes) and
    NumPy's legacy global ``RandomState`` (timm's ``RandAugment`` picks its ops with ``np.random.choice``). An
    augmentation is thus a function of the key alone, the same in the main process (``--num_workers 0``) as in
    any worker, and the main process's NumPy stream (timm's ``Mixup``) does not depend on the worker count.
    Cost: about 30 us an item with torch and ``random`` alone (``benchmarks/keyed_samples.py``); NumPy's state
    (a 624-word Mersenne Twister, saved, seeded and restored) adds to it, not re-measured.
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

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, Any, int]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)  # (epoch, index): _EpochSampler
        key = sample_key(self.seed, epoch, index)
        with keyed_rng(key):
            item = self.dataset[index]
        return item[0], item[1], key


@contextlib.contextmanager
def keyed_rng(key: int) -> Iterator[None]:
    """The global generators a transform draws from, seeded with a sample's ``key`` inside the block and restored
    after it: the CPU torch generator, Python's ``random`` and NumPy's legacy global ``RandomState``."""
    # The CPU generator alone (torch.manual_seed also seeds every accelerator: ~90 us an item, this ~1 us).
    generator = torch.default_generator
    torch_state, python_state, numpy_state = generator.get_state(), random.getstate(), np.random.get_state()
    generator.manual_seed(key)
    random.seed(key)
    np.random.seed([key & 0xFFFFFFFF, key >> 32])  # legacy RandomState: 32-bit words
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start its epoch part-way: ``start`` positions of this rank's shard are
    skipped as indices, so the images of the batches already trained on are never loaded or decoded (a resume
    from inside an epoch, ``set_loader_epoch(..., start_batch=k)``). With ``with_epoch`` the indices carry the
    epoch, ``(epoch, index)``, for ``KeyedSamples`` in persistent workers (whose copy of the dataset does not see
    ``set_epoch``)."""

    start: int = 0
    with_epoch: bool = False

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.start, None)
        if not self.with_epoch:
            return indices
        epoch = self.epoch
        return ((epoch, index) for index in indices)

    def __len__(self) -> int:
        return super().__len__() - self.start


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, pin_memory: bool, rank: int,
                       world_size: int, seed: int, keyed: bool = True, device: torch.device | None = None,
                       strict_data: bool = False, collate_fn: Callable | None = None,
                       epoch_indices: bool = False) -> DataLoader | DeviceInput:
    """Shuffled, ``drop_last`` training loader sharded over ``world_size`` ranks, of ``KeyedSamples(dataset)``
    (or of ``dataset`` itself with ``keyed=False``: items without randomness, e.g. cached features, where the
    per-item reseeding would cost more than the item).

    Workers persist across epochs and keep 4 batches each in flight; batches are pinned on CUDA. With ``device``
    the loader is wrapped in ``util.data.decode.DeviceInput``: images arrive on ``device``, normalized (decoded
    there on the ``--decode device`` path, ``strict_data`` deciding what a file only the device finds corrupt
    does). ``collate_fn`` replaces the default collate (detection keeps lists of targets). ``epoch_indices``: the
    sampler hands an unkeyed ``dataset`` ``(epoch, index)`` too, for one that draws its own per-epoch randomness
    (``util.data.ade20k.ADE20KDataset``): persistent workers' copies of it never see ``set_epoch``."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.with_epoch = keyed or epoch_indices
    extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    loader = DataLoader(KeyedSamples(dataset, seed=seed) if keyed else dataset, batch_size=batch_size,
                        sampler=sampler, num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(),
                        drop_last=True, generator=torch.Generator(), collate_fn=collate_fn or collate, **extra)
    return loader if device is None else DeviceInput(loader, device, strict=strict_data)


def set_loader_epoch(loader: DataLoader, *, seed: int, epoch: int, rank: int, start_batch: int = 0) -> None:
    """Shuffle order, sample keys and worker seeds for ``epoch`` (call before iterating); ``start_batch`` > 0
    starts the epoch at that batch (the same batches, crops and masks an unbroken epoch has from there on)."""
    loader.sampler.set_epoch(epoch)
    if start_batch and not isinstance(loader.sampler, ResumableSampler):
        raise ValueError("starting an epoch part-way needs a loader from build_train_loader")
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.start = start_batch * loader.batch_size
    if isinstance(loader.dataset, KeyedSamples):
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(epoch_seed(seed, epoch, rank))
