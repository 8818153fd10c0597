"""Preemption and mid-epoch resume of the dense scripts: main_segment.py and main_detect.py stop on
SIGTERM after the current update, save the position inside the epoch, and --auto_resume continues at the next
batch, ending where an unbroken run ends (same step, same lr, same weights). The pattern of test_resilience.py: the
step function sends the signal to its own process in the middle of an update. Tiny ViT, few images, one thread."""
import json
import os
import signal

import pytest
import torch

import main_detect
import main_segment
from util.checkpoint import LAST_NAME, load_checkpoint
from util.data.ade20k import ADE20KDataset, SegTrainTransform
from util.data.loaders import build_train_loader, set_loader_epoch
from util.data.scenes import write_ade20k


@pytest.fixture(scope="module")
def seg_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_scenes")
    write_ade20k(root, 16, 2, 64, seed=0, class_colours=True)
    return root


def logged(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def without_times(lines):
    return [{k: v for k, v in line.items() if k not in ("train_epoch_time_s", "train_images_per_s")} for line in lines]


def assert_same_run(full, cut):
    """Same weights, optimizer state (moments, step counts, lr of every group) and step: bit for bit."""
    a, b = load_checkpoint(full / LAST_NAME), load_checkpoint(cut / LAST_NAME)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] and "position" not in b
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)


def signal_at(monkeypatch, module, name, at_step, signum=signal.SIGTERM):
    """``module.name`` (the step function the script calls) sends ``signum`` to this process at ``at_step``."""
    real = getattr(module, name)

    def step_fn(model, batch, step, **kwargs):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return real(model, batch, step, **kwargs)

    monkeypatch.setattr(module, name, step_fn)


# --------------------------------------------------------------------------------------------------- segmentation
def seg_argv(root, out, *extra):
    # 16 images / batch 4 = 4 steps an epoch; --max_iters 10: epochs of 4, 4 and 2 steps (the last one cut short)
    return ["--config", "configs/segment/demo.yaml", "--data_path", str(root), "--output_dir", str(out),
            "--batch_size", "4", "--max_iters", "10", "--warmup_iters", "3", "--eval_interval", "100",
            "--vis_images", "0", "--print_freq", "1", "--drop_path", "0.1", "--seed", "3", *extra]


@pytest.mark.parametrize("at_step, where", [(5, "at step 6 (update 2 of 4 in epoch 1)"),
                                            (8, "at step 9 (update 1 of 2 in epoch 2)")])
def test_segmentation_sigterm_then_auto_resume_ends_bit_identical(seg_scenes, tmp_path, monkeypatch, caplog,
                                                                  one_thread, at_step, where):
    monkeypatch.chdir(main_segment.Path(main_segment.__file__).parent)
    full = main_segment.main(seg_argv(seg_scenes, tmp_path / "full"))
    signal_at(monkeypatch, main_segment, "segment_step", at_step)
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as exc:
        main_segment.main(seg_argv(seg_scenes, out))
    monkeypatch.undo()
    assert exc.value.code == 143 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert f"stopped by SIGTERM {where}" in caplog.text
    assert "Resume with: python main_segment.py" in caplog.text and "--auto_resume" in caplog.text
    saved = load_checkpoint(out / LAST_NAME)
    assert saved["step"] == at_step + 1 and saved["position"]["epoch"] == at_step // 4
    assert saved["epoch"] == at_step // 4 - 1  # the last finished epoch
    resumed = main_segment.main(seg_argv(seg_scenes, out, "--auto_resume"))
    assert resumed["step"] == full["step"] == 10
    assert resumed == full  # mIoU, mAcc, aAcc of the final evaluation too
    assert_same_run(tmp_path / "full", out)
    assert without_times(logged(out)) == without_times(logged(tmp_path / "full"))  # each epoch once, same averages
    assert [line["step"] for line in logged(out)] == [4, 8, 10]


def test_segmentation_save_every_steps_then_a_hard_kill_resumes_from_the_last_save(seg_scenes, tmp_path,
                                                                                  monkeypatch, one_thread):
    monkeypatch.chdir(main_segment.Path(main_segment.__file__).parent)
    main_segment.main(seg_argv(seg_scenes, tmp_path / "full", "--save_every_steps", "3"))
    real = main_segment.segment_step

    def killed_at_step_7(model, batch, step, **kwargs):
        if step == 7:  # epoch 1, update 3: the last save was after update 2 (step 6; every 3 updates of an epoch)
            raise KeyboardInterrupt("kill -9")
        return real(model, batch, step, **kwargs)

    monkeypatch.setattr(main_segment, "segment_step", killed_at_step_7)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        main_segment.main(seg_argv(seg_scenes, out, "--save_every_steps", "2"))
    monkeypatch.undo()
    saved = load_checkpoint(out / LAST_NAME)
    assert saved["position"]["epoch"] == 1 and saved["position"]["update"] == 2 and saved["step"] == 6
    main_segment.main(seg_argv(seg_scenes, out, "--save_every_steps", "2", "--auto_resume"))
    assert_same_run(tmp_path / "full", out)


def test_segmentation_augmentation_follows_the_epoch_in_persistent_workers(tmp_path, one_thread):
    """A worker process keeps its copy of the dataset across epochs: the epoch travels with the index, so epoch 1
    draws epoch 1's crops (as ``dataset.set_epoch(1); dataset[i]`` in this process), not epoch 0's again."""
    write_ade20k(tmp_path, 4, 1, 32, seed=0)
    ds = ADE20KDataset(tmp_path, "train", SegTrainTransform(32, (0.5, 2.0), 0.75), num_classes=5, seed=0)
    loader = build_train_loader(ds, batch_size=4, num_workers=1, pin_memory=False, rank=0, world_size=1, seed=0,
                                keyed=False, epoch_indices=True)
    for epoch in (0, 1, 2):
        set_loader_epoch(loader, seed=0, epoch=epoch, rank=0)
        images, _, indices = next(iter(loader))
        ds.set_epoch(epoch)
        expected = torch.stack([ds[int(i)][0] for i in indices])
        assert torch.equal(images, expected), epoch
    ds.set_epoch(0)
    assert not torch.equal(ds[0][0], ds[(1, 0)][0])  # the epochs do differ


# ------------------------------------------------------------------------------------------------------ detection
def det_argv(out, *extra):
    # 8 scenes / batch 2 = 4 steps an epoch; evaluation only after the last epoch
    return ["--config", "configs/detect/demo.yaml", "--output_dir", str(out), "--input_size", "64",
            "--scene_images", "8", "2", "--epochs", "2", "--batch_size", "2", "--rois_per_image", "32",
            "--proposals_per_image", "100", "--anchor_sizes", "4", "8", "16", "32", "64", "--eval_every", "2",
            "--vis_every", "0", "--print_freq", "1", "--lr_steps", "1", "--warmup_iters", "2", *extra]


def test_detection_sigusr2_then_auto_resume_continues_at_the_saved_step(tmp_path, monkeypatch, caplog, one_thread):
    monkeypatch.chdir(main_detect.Path(main_detect.__file__).parent)
    full = main_detect.main(det_argv(tmp_path / "full"))
    signal_at(monkeypatch, main_detect, "detect_step", 5, signal.SIGUSR2)  # epoch 1, update 1
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as exc:
        main_detect.main(det_argv(out))
    monkeypatch.undo()
    assert exc.value.code == 140 and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    assert "stopped by SIGUSR2 at step 6 (update 2 of 4 in epoch 1)" in caplog.text
    saved = load_checkpoint(out / LAST_NAME)
    assert saved["step"] == 6 and saved["epoch"] == 0 and saved["position"]["update"] == 2
    caplog.clear()
    resumed = main_detect.main(det_argv(out, "--auto_resume"))
    assert "2 updates into epoch 1" in caplog.text
    assert "Epoch: [1] [3/4]" in caplog.text and "Epoch: [1] [1/4]" not in caplog.text  # went on from update 2
    lines = logged(out)
    assert [line["epoch"] for line in lines] == [0, 1] and lines[-1]["train_step"] == 8
    assert_same_run(tmp_path / "full", out)  # torchvision's proposal / RoI sampling draws restored too
    assert resumed == full
    assert without_times(lines) == without_times(logged(tmp_path / "full"))
