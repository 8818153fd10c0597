"""util/runtime.py's run-folder protection: one live run per --output_dir (flock, released when the owner dies), no
silent fresh start over another run's checkpoints (--overwrite), one-line errors for an unusable folder."""
import fcntl
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_pretrain
from util import runtime
from util.checkpoint import load_checkpoint, save_checkpoint
from util.runtime import LOCK_NAME, lock_output_dir, refuse_fresh_over_checkpoints, release_output_lock
from conftest import tiny_pretrain

ROOT = Path(__file__).resolve().parent.parent
TINY = tiny_pretrain("--print_freq", "100", "--warmup_epochs", "0", "--seed", "0")


@pytest.fixture(autouse=True)
def _release():
    yield
    release_output_lock()


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process (another run) that locks ``folder`` and sleeps until killed."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from util.runtime import lock_output_dir; "
            "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder), str(ROOT)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_run_is_refused_naming_the_first_and_a_dead_owner_blocks_nothing(tmp_path):
    folder = tmp_path / "run"
    child = hold_lock(folder)
    try:
        assert f"pid {child.pid} on host {platform.node()}" in (folder / LOCK_NAME).read_text()
        with pytest.raises(ValueError) as exc:
            lock_output_dir(folder)
        message = str(exc.value)
        assert f"pid {child.pid} on host {platform.node()}" in message and str(folder) in message
        assert "another --output_dir" in message and "\n" not in message
        # the whole entry script stops there, before it writes anything into the folder
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {child.pid}"):
            main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(folder)])
        assert sorted(p.name for p in folder.iterdir()) == before == [LOCK_NAME]
    finally:
        child.kill()  # kill -9: no clean-up code runs, the kernel drops the flock
        child.wait()
    lock_output_dir(folder)
    assert f"pid {os.getpid()} " in (folder / LOCK_NAME).read_text()


def test_one_process_relocks_its_own_folder_and_moves_its_lock(tmp_path):
    """In-process runs (tests, notebooks) run one after another: the same folder again is fine, and locking a new
    folder lets the previous one go."""
    lock_output_dir(tmp_path / "a")
    lock_output_dir(tmp_path / "a")
    lock_output_dir(tmp_path / "b")
    assert not locked_elsewhere(tmp_path / "a") and locked_elsewhere(tmp_path / "b")
    release_output_lock()
    assert not locked_elsewhere(tmp_path / "b")


def locked_elsewhere(folder: Path) -> bool:
    """Whether a flock on folder's lock file is held (another open file description conflicts, in any process)."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_process_started_by_the_owner_may_use_its_folder(tmp_path):
    """A test or notebook that ran in a folder in-process and then starts a run there as a child process (the
    child's run cannot overlap its own, it waits for it) is not refused; anyone else still is (first test)."""
    folder = tmp_path / "run"
    lock_output_dir(folder)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from util.runtime import lock_output_dir; "
            "lock_output_dir(sys.argv[1]); print('ok')")
    child = subprocess.run([sys.executable, "-c", code, str(folder), str(ROOT)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-2000:]
    assert locked_elsewhere(folder) and f"pid {os.getpid()} " in (folder / LOCK_NAME).read_text()


def test_fresh_run_into_a_finished_folder_needs_auto_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(out)])
    finished = (out / "checkpoint-last.pth").read_bytes()
    log = (out / "log.txt").read_text()
    with pytest.raises(ValueError) as exc:
        main_pretrain.main([*TINY, "--epochs", "2", "--output_dir", str(out)])
    message = str(exc.value)
    assert "checkpoint-0.pth" in message and "checkpoint-last.pth" in message
    assert all(flag in message for flag in ("--auto_resume", "--resume", "--overwrite"))
    assert (out / "checkpoint-last.pth").read_bytes() == finished and (out / "log.txt").read_text() == log
    main_pretrain.main([*TINY, "--epochs", "2", "--output_dir", str(out), "--auto_resume"])  # continues: epoch 1
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 1
    main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(out), "--overwrite"])  # starts again
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 0


def test_fold_folders_count_and_resume_or_overwrite_pass(tmp_path):
    save_checkpoint(tmp_path / "fold_2" / "checkpoint-last.pth", {"epoch": 0})
    with pytest.raises(ValueError, match=r"fold_2/checkpoint-last.pth"):
        refuse_fresh_over_checkpoints(tmp_path, fresh=True, overwrite=False)
    refuse_fresh_over_checkpoints(tmp_path, fresh=False, overwrite=False)
    refuse_fresh_over_checkpoints(tmp_path, fresh=True, overwrite=True)
    refuse_fresh_over_checkpoints(tmp_path / "empty", fresh=True, overwrite=False)


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--output_dir .*file is a file, not a folder: choose another"):
        lock_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match=r"run cannot be created: .*file is a file, not a folder"):
        lock_output_dir(tmp_path / "file" / "run")
    assert str(exc_info_of(lambda: lock_output_dir(tmp_path / "file" / "run"))).split("created: ")[1].startswith(
        f"{tmp_path / 'file'} is a file")
    with pytest.raises(ValueError, match="is a file, not a folder"):  # the entry script: a ValueError, one line
        main_pretrain.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path / "file")])


def exc_info_of(call) -> BaseException:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the test looks at it
        return err
    raise AssertionError("no error")


def test_read_only_output_dir(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: simulate what the kernel says to everyone else
        folder.chmod(0o555)
    else:
        real_open = os.open

        def refuse(path, flags, *args):
            if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)
        monkeypatch.setattr(runtime.os, "open", refuse)
    try:
        with pytest.raises(ValueError, match=r"--output_dir .*ro is not writable \(Permission denied\); choose a "
                                             "writable folder"):
            lock_output_dir(folder)
    finally:
        folder.chmod(0o755)


def test_lock_file_is_rewritten_by_each_owner(tmp_path):
    (tmp_path / LOCK_NAME).write_text("pid 1 on host old, since 2000-01-01 00:00:00 and a long stale tail\n")
    lock_output_dir(tmp_path)
    text = (tmp_path / LOCK_NAME).read_text()
    assert text.startswith(f"pid {os.getpid()} on host {platform.node()}, since ") and "stale" not in text
    assert abs(time.mktime(time.strptime(text.split("since ")[1].strip(), "%Y-%m-%d %H:%M:%S")) - time.time()) < 60


@pytest.mark.parametrize("script", ["main_pretrain", "main_finetune", "main_linprobe", "main_knn"])
def test_every_entry_script_has_overwrite_and_refuses_a_fresh_start_over_checkpoints(script, tmp_path):
    module = __import__(script)
    options = {opt for action in module.build_parser()._actions for opt in action.option_strings}
    assert "--overwrite" in options
    save_checkpoint(tmp_path / "checkpoint-last.pth", {"epoch": 0})
    argv = {"main_pretrain": TINY, "main_finetune": ["--data_set", "demo", "--model", "vit_tiny_patch16"],
            "main_linprobe": ["--data_set", "demo", "--model", "vit_tiny_patch16"],
            "main_knn": ["--data_set", "demo", "--model", "vit_tiny_patch16"]}[script]
    with pytest.raises(ValueError, match="already holds checkpoints \\(checkpoint-last.pth\\)"):
        module.main([*argv, "--output_dir", str(tmp_path)])
    assert load_checkpoint(tmp_path / "checkpoint-last.pth") == {"epoch": 0}
