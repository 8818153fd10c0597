"""Non-finite training never overwrites a good checkpoint, in every training script (they share one run driver,
engine/run.py ``fit``): a NaN loss from epoch 1 on stops the run once more updates were skipped than
--max_skipped_steps allows, and NaN weights (the loss still finite) stop it at the epoch end, before anything of that
epoch is written. Either way the command line says it in one line with exit status 1, naming checkpoint-last.pth
of epoch 0, which stays as that epoch wrote it. Tiny models, CPU, one thread (tests/script_runs.py).

The loop itself (skips, clipping, the fp16 loss scaler, ranks skipping together) is tests/test_train_loop.py; the
checkpoint rules (optimizer state, NaN metrics never best) tests/test_resilience.py, tests/test_run_driver.py and
tests/test_absurd_values.py."""
import logging
import re
from pathlib import Path

import pytest
import torch

import util.checkpoint
from script_runs import SCRIPTS, after_step
from util.checkpoint import LAST_NAME, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")


def nan_loss(model, output) -> None:
    output["loss"] = output["loss"] * float("nan")


def nan_weights(model, output) -> None:
    with torch.no_grad():  # after the forward: this step's loss is finite, the weights are not
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


KINDS = {  # what goes wrong from epoch 1 on, --max_skipped_steps, the error (its type and where it stopped)
    "loss": (nan_loss, "1", r"NonFiniteLossError: .*at step {second}"),
    "weights": (nan_weights, "100", r"NonFiniteStateError: epoch 1: \d+ tensor\(s\) of the weights .* are NaN"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SCRIPTS)
def test_non_finite_training_stops_in_one_line_and_keeps_the_good_checkpoint(name, kind, script_data, tmp_path,
                                                                             monkeypatch, caplog):
    script = SCRIPTS[name]
    data = script_data(script)
    change, max_skipped, error = KINDS[kind]
    spe = script.steps_per_epoch
    out = tmp_path / "run"
    real_save, writes = util.checkpoint.save_checkpoint, []

    def save(path, state):
        writes.append((Path(path).name, state["epoch"]))
        return real_save(path, state)

    monkeypatch.setattr(util.checkpoint, "save_checkpoint", save)
    after_step(monkeypatch, script, spe, change)
    with caplog.at_level(logging.ERROR, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
        script.module.cli(script.argv(data, out, "--max_skipped_steps", max_skipped))  # the command line
    assert exc.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert re.search(error.format(second=spe + 1), errors[0]), errors[0]
    assert f"The last good checkpoint, {out / LAST_NAME}, is left as it was" in errors[0]
    assert (LAST_NAME, 0) in writes and {epoch for _, epoch in writes} == {0}  # nothing of epoch 1 was written
    checkpoint = load_checkpoint(out / LAST_NAME)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] == spe and "position" not in checkpoint
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1 and '"epoch": 0' in lines[0]  # epoch 1 is not logged
    assert not list(out.glob(".*.tmp"))
