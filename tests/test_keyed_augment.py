"""A sample's augmentation follows from its key alone: torch, Python's ``random`` and NumPy (timm's RandAugment picks
its ops with ``np.random.choice``), so fine-tuning ends bit-identical with 0, 1 or 2 loader workers."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.finetune
import main_finetune
from util.checkpoint import load_checkpoint
from util.data.demo import DemoDataset
from util.data.loaders import KeyedSamples, build_train_loader, set_loader_epoch
from util.data.transforms import finetune_transform
from conftest import tiny_finetune

LAST_NAME = "checkpoint-last.pth"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def augmented(workers: int, *, numpy_seed: int) -> dict[int, torch.Tensor]:
    """Every sample of one epoch, by key: 16 demo images through MAE's fine-tuning augmentation (RandAugment
    rand-m9-mstd0.5-inc1, random erasing with probability 1 so that every image draws a box)."""
    data = DemoDataset(per_class=2, size=32, seed=0, transform=finetune_transform(32, re_prob=1.0))
    loader = build_train_loader(data, batch_size=4, num_workers=workers, pin_memory=False, rank=0, world_size=1,
                                seed=0)
    set_loader_epoch(loader, seed=0, epoch=0, rank=0)
    np.random.seed(numpy_seed)  # the main process's NumPy stream (mixup draws from it) must not matter
    return {int(key): img for imgs, _, keys in loader for img, key in zip(imgs, keys)}


def test_the_augmentation_of_a_sample_depends_only_on_its_key_at_0_1_and_2_workers():
    runs = {(workers, seed): augmented(workers, numpy_seed=seed) for workers, seed in ((0, 0), (0, 1), (1, 0), (2, 3))}
    reference = runs[(0, 0)]
    assert len(reference) == 16
    for name, run in runs.items():
        assert run.keys() == reference.keys(), name
        for key in reference:
            assert torch.equal(run[key], reference[key]), (name, key)


def test_keyed_items_leave_the_callers_numpy_stream_untouched_and_draw_numpy_from_the_key():
    class Draws:
        """A 'transform' that draws from all three global generators."""
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return (np.random.rand(2), random.random(), torch.rand(1).item()), 0

    keyed = KeyedSamples(Draws(), seed=0)
    np.random.seed(5)
    expected = np.random.rand(3)
    np.random.seed(5)
    first = keyed[1][0]
    assert np.array_equal(np.random.rand(3), expected)  # the caller's stream did not move
    np.random.seed(6)  # another caller state: the same item
    again = keyed[1][0]
    assert np.array_equal(first[0], again[0]) and first[1:] == again[1:]
    other = keyed[2][0]
    assert not np.array_equal(first[0], other[0])  # another key, another NumPy draw


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    differing = [key for key in first if not torch.equal(first[key], second[key])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """16 demo images (8 classes x 2) as PNG files, 32 px."""
    root = tmp_path_factory.mktemp("keyed_folder")
    data = DemoDataset(per_class=2, size=32, seed=0)
    for i in range(len(data)):
        img, label = data[i]
        path = root / "train" / data.classes[label] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        if i % 2 == 0:
            path = root / "val" / data.classes[label] / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
    return root


def ft_argv(folder: Path, out: Path, workers: str, *extra: str) -> list[str]:
    """16 images, batch 8: 2 steps an epoch, 2 epochs; RandAugment, mixup/cutmix and random erasing on."""
    return tiny_finetune(folder, out, "--batch_size", "8", "--num_workers", workers, "--print_freq", "100",
                         "--warmup_epochs", "1", "--epochs", "2", "--blr", "5e-3", "--seed", "1", "--aa",
                         "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", *extra)


@pytest.fixture(scope="module")
def unbroken(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w0")
    main_finetune.main(ft_argv(folder, out, "0"))
    return out / LAST_NAME


@pytest.mark.parametrize("workers", [pytest.param("1", marks=pytest.mark.slow), "2"])  # 0 vs 2: ~5 s
def test_finetuning_with_randaugment_mixup_and_erasing_ends_bit_identical_at_any_worker_count(folder, unbroken,
                                                                                             tmp_path, workers):
    main_finetune.main(ft_argv(folder, tmp_path, workers))
    assert_same_weights(unbroken, tmp_path / LAST_NAME)


@pytest.mark.slow
def test_finetuning_killed_mid_epoch_and_resumed_with_one_worker_ends_bit_identical(folder, unbroken, tmp_path,
                                                                                   monkeypatch):
    """A kill after step 2 (epoch 1, update 0; the last save was after step 1), then --auto_resume: the resumed
    worker starts fresh, yet each sample's RandAugment ops come from its key."""
    real = engine.finetune.classify_step

    def killed_at_step_2(model, batch, step, **kwargs):
        if step == 2:
            raise KeyboardInterrupt("kill -9")
        return real(model, batch, step, **kwargs)

    monkeypatch.setattr(engine.finetune, "classify_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        main_finetune.main(ft_argv(folder, tmp_path, "1", "--save_every_steps", "1"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 2
    main_finetune.main(ft_argv(folder, tmp_path, "1", "--save_every_steps", "1", "--auto_resume"))
    assert_same_weights(unbroken, tmp_path / LAST_NAME)
