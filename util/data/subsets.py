"""Views of a dataset: with sample indices, or N labelled samples per class.

- ``IndexedDataset``: returns the sample index as well, which exact (index-aware) k-NN gathering needs
  (DINO's ``ReturnIndexDataset``; ViTFreeze's ``run_knn.py`` lost that alignment).
- ``few_shot_indices`` / ``few_shot_subset``: N labelled samples per class, drawn with a seed (few-shot k-NN
  banks; fine-tuning on few labels, the semi-supervised setting where pretraining pays off most).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IndexedDataset", "LabelledSubset", "few_shot_indices", "few_shot_subset"]


class IndexedDataset(Dataset):
    """Wraps a dataset so each item is (image, label, index); ``classes``/``targets`` pass through."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.dataset, "classes", None)

    @property
    def targets(self) -> list[int] | None:
        return getattr(self.dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img, label = self.dataset[index][:2]
        return img, label, index


class LabelledSubset(Dataset):
    """The items ``indices`` of a labelled dataset; ``classes`` are the parent's, ``targets`` the subset's."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.dataset, "classes", None)

    @property
    def targets(self) -> list[int]:
        return [self.dataset.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def few_shot_indices(labels: Tensor, *, n_per_class: int, n_tries: int, seed: int = 0) -> list[Tensor]:
    """Indices of ``n_tries`` few-shot banks, each with ``n_per_class`` random samples of every class.

    Args:
        labels: [N] class indices of the full training set.
        n_per_class: samples drawn (without replacement) per class.
        n_tries: number of banks; bank t uses a generator seeded with ``seed + t`` (same on every rank).
        seed: base seed.

    Returns:
        ``n_tries`` int64 tensors of indices into ``labels`` (sorted), each of length n_per_class x classes.

    Raises:
        ValueError: a class has fewer than ``n_per_class`` samples.
    """
    labels = labels.cpu().long()
    classes = labels.unique()
    per_class = [(labels == c).nonzero().flatten() for c in classes]
    short = {int(c): len(idx) for c, idx in zip(classes, per_class) if len(idx) < n_per_class}
    if short:
        raise ValueError(f"{len(short)} class(es) have fewer than the {n_per_class} training samples per class asked "
                         f"for (class: samples {dict(list(short.items())[:8])})")
    banks = []
    for t in range(n_tries):
        gen = torch.Generator().manual_seed(seed + t)
        picks = [idx[torch.randperm(len(idx), generator=gen)[:n_per_class]] for idx in per_class]
        banks.append(torch.cat(picks).sort().values)
    return banks


def few_shot_subset(dataset: Dataset, *, n_per_class: int, seed: int) -> LabelledSubset:
    """``n_per_class`` items of every class of ``dataset`` (which has ``targets``), the same for the same seed.

    Raises:
        ValueError: the dataset has no ``targets``, or a class has fewer than ``n_per_class`` items.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no 'targets': cannot draw samples per class")
    (indices,) = few_shot_indices(torch.as_tensor(targets), n_per_class=n_per_class, n_tries=1, seed=seed)
    return LabelledSubset(dataset, indices.tolist())
