"""A run folder's edges: files of ours that are symbolic links are replaced, never written through; temp files of a
killed writer are removed at start (folders of that name left alone); a run killed before its first checkpoint does
not log its epochs twice; a full disk is one line naming the folder."""
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import main_pretrain
from util import checkpoint as ckpt_module
from util import runtime
from util.checkpoint import LAST_NAME, RunCheckpoints
from util.logging import write_results
from util.outputs import disk_full_message, write_text
from util.runtime import LOCK_NAME, release_output_lock
from conftest import tiny_pretrain

TINY = tiny_pretrain("--print_freq", "100", "--warmup_epochs", "0", "--seed", "0", "--vis_every", "0")


@pytest.fixture(autouse=True)
def _release():
    yield
    release_output_lock()


def epochs_in_log(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "log.txt").read_text().splitlines()]


def test_links_in_the_run_folder_are_replaced_and_their_targets_left_alone(tmp_path, one_thread):
    outside, run = tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    run.mkdir()
    names = (LOCK_NAME, "args.yaml", "run_info.json", "log.txt", "cli_logs.txt", "results.json")
    for name in names:
        (outside / name).write_text(f"precious {name}\n")
        (run / name).symlink_to(outside / name)
    main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(run)])
    write_results(run, {"acc1": 1.0})
    for name in names:
        assert (outside / name).read_text() == f"precious {name}\n", name
        assert not (run / name).is_symlink() and (run / name).is_file(), name
    assert epochs_in_log(run) == [0]
    assert json.loads((run / "results.json").read_text()) == {"acc1": 1.0}


def test_write_text_replaces_a_link_atomically(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep")
    (tmp_path / "out.json").symlink_to(target)
    write_text(tmp_path / "out.json", "new")
    assert target.read_text() == "keep" and (tmp_path / "out.json").read_text() == "new"
    assert not (tmp_path / "out.json").is_symlink()


def test_every_temp_file_of_ours_is_removed_at_start_and_a_folder_of_that_name_is_left(tmp_path):
    run = tmp_path / "run"
    (run / "vis").mkdir(parents=True)
    stale = [run / ".vis-0003.png.k2j3h4.tmp", run / "vis" / ".seg_val_0.png.x8y7.tmp", run / ".log.txt.ab12.tmp",
             run / ".checkpoint-last.pth.zz9.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (run / ".checkpoint-x.tmp").mkdir()  # not ours: a folder
    keep = run / "notes.tmp"  # not a hidden temp file of atomic_write
    keep.write_text("mine")
    RunCheckpoints(run, epochs=1, save_every=1)
    assert not any(p.exists() for p in stale)
    assert (run / ".checkpoint-x.tmp").is_dir() and keep.read_text() == "mine"


def test_killed_before_the_first_checkpoint_then_auto_resume_logs_each_epoch_once(tmp_path, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    # what a run killed inside epoch 1, before checkpoint-last.pth of epoch 0 was renamed into place, leaves
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 1.0}) + "\n")
    main_pretrain.main([*TINY, "--epochs", "2", "--output_dir", str(run), "--auto_resume"])
    assert epochs_in_log(run) == [0, 1]


def test_a_full_disk_while_saving_is_one_line_naming_the_folder_and_the_last_checkpoint_stays(
        tmp_path, one_thread, monkeypatch, caplog):
    run = tmp_path / "run"
    main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(run)])
    release_output_lock()
    before = (run / LAST_NAME).read_bytes()
    real_save = torch.save

    def save_to_full_disk(obj, path, *args, **kwargs):  # what torch.save does on a full disk (/dev/full: ENOSPC)
        with open("/dev/full", "wb") as handle:
            real_save(obj, handle, *args, **kwargs)
    monkeypatch.setattr(ckpt_module.torch, "save", save_to_full_disk)
    with caplog.at_level(logging.ERROR, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
        runtime.run_cli(lambda: main_pretrain.main([*TINY, "--epochs", "2", "--output_dir", str(run),
                                                    "--auto_resume"]))
    assert exc.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"cannot write into {run}: no space left" in errors[0]
    assert (run / LAST_NAME).read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_a_full_disk_at_start_is_one_line(tmp_path, one_thread, monkeypatch, caplog):
    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(runtime, "write_text", full)
    run = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
        runtime.run_cli(lambda: main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(run)]))
    assert exc.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"cannot write into {run}: no space left" in errors[0]


def test_other_errors_are_not_called_a_full_disk():
    assert disk_full_message(RuntimeError("CUDA out of memory"), "x") is None
    assert disk_full_message(OSError(errno.EACCES, "Permission denied"), "x") is None
    assert "no space left" in disk_full_message(OSError(errno.ENOSPC, "No space left on device"), "x")


def test_segmentation_results_json_that_is_a_link_is_replaced(tmp_path):
    from engine.segment import report_segmentation
    target = tmp_path / "precious.json"
    target.write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").symlink_to(target)
    metrics = {"mIoU": 50.0, "mAcc": 60.0, "aAcc": 70.0, "IoU": [50.0], "Acc": [60.0], "num_images": 1, "samples": []}
    report_segmentation(metrics, out, True, step=1)
    assert target.read_text() == "keep" and not (out / "results.json").is_symlink()
    assert json.loads((out / "results.json").read_text())["mIoU"] == 50.0
