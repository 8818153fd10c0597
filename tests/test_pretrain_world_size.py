"""A pretraining run does not depend on how its effective batch is split: 2 gloo processes x batch b, 1 process
x batch 2b and 1 process x batch b x --accum_iter 2 follow the same loss curve and end at the same weights (the
order comes from one shared permutation, each sample's crop, flip and mask from its own key, util/data/loaders.py).
With --eff_batch_size the recipe keeps its effective batch on any number of processes (accum_iter derived)."""
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_pretrain
from util.checkpoint import load_checkpoint
from spawn_ranks import main_of, spawn

# demo --debug: 64 images; effective batch 16 -> 4 optimizer steps per epoch, 8 in all, every one logged
BASE = ["--model", "MIM_vit_tiny_patch16", "--input_size", "32", "--num_workers", "0", "--epochs", "2",
        "--warmup_epochs", "1", "--data_path", "demo", "--debug", "--blr", "1e-2", "--seed", "5", "--print_freq", "1"]


def run(out: Path, *extra: str, processes: int = 1) -> tuple[list[float], dict]:
    """Per-step logged loss (TensorBoard ``train/loss``) and the final weights of one run."""
    argv = [*BASE, *extra, "--output_dir", str(out)]
    if processes == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            main_pretrain.main(argv)
        finally:
            torch.set_num_threads(threads)
    else:
        spawn(main_of("main_pretrain", argv), world=processes)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in curve] == list(range(1, 9))
    return [value for _, value in curve], load_checkpoint(out / "checkpoint-last.pth")["model"]


@pytest.fixture(scope="module")
def one_process_2b(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ws") / "1x16", "--batch_size", "16")


def assert_same_run(a: tuple[list[float], dict], b: tuple[list[float], dict]) -> None:
    (curve_a, weights_a), (curve_b, weights_b) = a, b
    assert curve_a == pytest.approx(curve_b, rel=1e-5, abs=1e-6)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:  # float rounding only: the summation order of the gradients differs
        a, b = weights_a[key], weights_b[key]
        if key.endswith("attn.qkv.bias"):
            # The key bias gets an exactly zero gradient (softmax ignores a shift shared by all keys); AdamW
            # turns the rounding noise left in it into steps of up to lr (6.25e-4 here), with a sign that
            # depends on the summation order. The attention output does not depend on it.
            dim = a.numel() // 3
            assert (a[dim:2 * dim] - b[dim:2 * dim]).abs().max() < 8 * 6.25e-4
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name, extra, processes", [
    ("2x8", ["--batch_size", "8"], 2),
    ("1x8x2", ["--batch_size", "8", "--accum_iter", "2"], 1),
    ("2x4_eff16", ["--batch_size", "4", "--eff_batch_size", "16"], 2),  # accum_iter 2 derived
])
def test_same_loss_curve_and_weights_however_the_batch_is_split(one_process_2b, tmp_path, name, extra, processes):
    assert_same_run(run(tmp_path / name, *extra, processes=processes), one_process_2b)


def test_the_comparison_can_fail(one_process_2b, tmp_path):
    """Another seed (other order, crops and masks) gives another curve: the tolerance above is not vacuous."""
    curve, _ = run(tmp_path / "seed6", "--batch_size", "16", "--seed", "6")
    assert curve != pytest.approx(one_process_2b[0], rel=1e-5, abs=1e-6)


def test_sample_keys_make_masks_and_crops_independent_of_the_batch(tmp_path):
    """The same sample gets the same crop and mask in a batch of 16 and in a batch of 4 (and in 4 workers)."""
    from util.data.folder import build_pretrain_dataset
    from models.masking import keyed_noise
    from util.data.loaders import KeyedSamples, build_train_loader, set_loader_epoch
    from util.data.transforms import pretrain_transform

    dataset = build_pretrain_dataset("demo", pretrain_transform(32), debug=True, demo_size=32)

    def items(batch_size: int, workers: int, epoch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        loader = build_train_loader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=False, rank=0,
                                    world_size=1, seed=0)
        set_loader_epoch(loader, seed=0, epoch=epoch, rank=0)
        out = {}
        for imgs, _, keys in loader:
            for img, key, noise in zip(imgs, keys, keyed_noise(keys, 4)):
                out[int(key)] = (img, noise)
        return out

    big, small = items(16, 0, epoch=0), items(4, 2, epoch=0)
    assert len(big) == len(small) == 64 and big.keys() == small.keys()
    for key in big:
        assert torch.equal(big[key][0], small[key][0]) and torch.equal(big[key][1], small[key][1])
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    items(16, 0, epoch=0)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    keyed = KeyedSamples(dataset, seed=0)
    first = keyed[3]
    assert torch.equal(keyed[3][0], first[0]) and keyed[3][2] == first[2]
    keyed.set_epoch(1)  # a new epoch re-draws every sample's augmentation (and key, hence mask)
    assert not torch.equal(keyed[3][0], first[0]) and keyed[3][2] != first[2]


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory) -> Path:
    """64 demo images as JPEG files, 8 classes of 8 (all kept by --debug), 40x40 so the crops are resized."""
    from util.data.demo import DemoDataset
    root = tmp_path_factory.mktemp("jpegs")
    for i, (img, label) in enumerate(DemoDataset(per_class=8, size=40, seed=1)):
        path = root / f"class{label}" / f"{i:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        img.save(path, quality=90)
    return root


def test_device_decode_run_is_the_same_on_1_and_2_processes(jpeg_tree, tmp_path):
    """--decode device (batches decoded, cropped and normalized by the model's device, here the CPU): the crop,
    flip and mask of each sample come from its key, so 2 processes x 8 follow 1 process x 16."""
    extra = ["--decode", "device", "--data_path", str(jpeg_tree)]
    one = run(tmp_path / "1x16", *extra, "--batch_size", "16")
    assert_same_run(run(tmp_path / "2x8", *extra, "--batch_size", "8", processes=2), one)
