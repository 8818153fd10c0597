"""Shared fixtures: one intra-op thread, and a small demo dataset for end-to-end runs of the evaluation scripts."""
import pytest
import torch

import main_knn
from util.datasets import DemoDataset


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run several times faster so on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_demo(monkeypatch, one_thread):
    """``--data_set demo`` with 16 images per class (128 per split) at 32 px, so a k-NN or probe run takes seconds."""
    def build(name, root, split, transform):
        assert name == "demo"
        return DemoDataset(per_class=16, size=32, seed=0 if split == "train" else 1, transform=transform)
    monkeypatch.setattr(main_knn, "build_dataset", build)
