"""Every run ends with a summary: wall-clock time, headline metrics, where the outputs are."""
import logging
import types

import pytest

import util.runtime as runtime


def test_summary_names_time_best_metrics_and_outputs(tmp_path, caplog, monkeypatch):
    (tmp_path / "log.txt").write_text("{}\n")
    (tmp_path / "checkpoint-best.pth").write_bytes(b"x")
    (tmp_path / ".run.lock").write_text("pid 1")
    monkeypatch.setattr(runtime, "_run_folder", tmp_path)
    clock = iter([100.0, 172.5])
    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(time=lambda: next(clock)))  # this module's clock only
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        runtime.run_cli(lambda: {"acc1": 50.0, "best_acc1": 61.25, "best_epoch": 7, "classes": ["a"]})
    lines = [r.getMessage() for r in caplog.records]
    assert "run finished in 72.5 s (0:01:12); best_acc1 61.25, best_epoch 7" in lines
    assert f"outputs in {tmp_path}: checkpoint-best.pth, log.txt" in lines


def test_no_summary_when_the_run_failed(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(runtime, "_run_folder", tmp_path)

    def failing():
        raise ValueError("bad flag")
    with caplog.at_level(logging.INFO, logger="vitfreeze"), pytest.raises(SystemExit):
        runtime.run_cli(failing)
    assert not any("run finished" in r.getMessage() for r in caplog.records)
