import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from util.checkpoint import atomic_write, find_latest, load_checkpoint, load_model_state, save_checkpoint


def test_roundtrip_weights_only_and_plain_args(tmp_path):
    model = nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "checkpoint-last.pth", {"model": model.state_dict(), "epoch": 4,
                                                               "args": {"lr": 0.1, "model": "x"}})
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 4 and loaded["args"]["model"] == "x"
    assert torch.equal(loaded["model"]["weight"], model.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temp files left


def test_mae_style_namespace_loads_but_other_objects_do_not(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "mae.pth")
    assert load_checkpoint(tmp_path / "mae.pth")["args"].lr == 1.0

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot load"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_checkpoint(tmp_path / "bad.pth")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint-last.pth", {"epoch": 1})

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    """The one atomic writer behind checkpoints, pictures and safetensors exports."""
    path = tmp_path / "picture.png"
    path.write_bytes(b"old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["picture.png"]
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_find_latest(tmp_path):
    assert find_latest(tmp_path) is None
    for epoch in (3, 19, 7):
        save_checkpoint(tmp_path / f"checkpoint-{epoch}.pth", {"epoch": epoch})
    assert find_latest(tmp_path).name == "checkpoint-19.pth"
    save_checkpoint(tmp_path / "checkpoint-last.pth", {"epoch": 20})
    assert find_latest(tmp_path).name == "checkpoint-last.pth"


def test_mismatch_names_keys_and_shapes():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    state = model.state_dict()
    state["0.weight"] = torch.zeros(5, 3)
    del state["1.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as exc:
        load_model_state(model, state)
    msg = str(exc.value)
    assert "missing keys (1): 1.bias" in msg and "unexpected keys (1): extra" in msg
    assert "shape of 0.weight: checkpoint (5, 3), model (2, 3)" in msg


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    """mkstemp creates 0600 and the rename keeps it: checkpoints and PNGs must get the mode every other file gets."""
    old = os.umask(umask)
    try:
        ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", {"epoch": 1})
        png = atomic_write(tmp_path / "picture.png", lambda tmp: Path(tmp).write_bytes(b"png"))
        (tmp_path / "plain.txt").write_text("x")  # what open() gives, the reference
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    assert ckpt.stat().st_mode & 0o777 == expected and png.stat().st_mode & 0o777 == expected


def test_unreadable_checkpoints_get_one_line_that_names_file_and_fix(tmp_path):
    """Empty (torch: EOFError), text (KeyError/IndexError), Git LFS pointer, truncated zip: one line each."""
    good = save_checkpoint(tmp_path / "good.pth", {"model": {"w": torch.zeros(100)}})
    cases = {"empty.pth": (b"", "empty (0 bytes)"),
             "notes.pth": (b"this is a text file\nnot weights\n", "a text file"),
             "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "git lfs pull"),
             "cut.pth": (good.read_bytes()[:200], "damaged or truncated")}
    for name, (data, what) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as exc:
            load_checkpoint(tmp_path / name)
        message = str(exc.value)
        assert str(tmp_path / name) in message and what in message and "\n" not in message, message
        assert "weights_only` set to `False" not in message


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is a folder: pass a file in it \(e.g. .*checkpoint-last.pth\)"):
        load_checkpoint(tmp_path)
