"""Non-finite and absurd values that are not NaN tensors: a blown-up fine-tuning (finite weights near 1e30, NaN
validation loss) stops in one line and never becomes "best"; k-NN labels are class indices; a damaged position
embedding or patch kernel in --finetune is one line naming the key."""
import logging
from pathlib import Path

import pytest
import torch

import main_finetune
import main_knn
import models
from engine.knn import knn_classify
from models.convert import adapt_to_model
from util import runtime
from util.checkpoint import NonFiniteStateError, RunCheckpoints, training_state
from util.runtime import release_output_lock
from conftest import tiny_finetune


@pytest.fixture(autouse=True)
def _release():
    yield
    release_output_lock()


@pytest.fixture(scope="module")
def tiny_folder(make_demo_folder) -> Path:
    return make_demo_folder(4, 2)


def test_a_blown_up_fine_tuning_stops_in_one_line_and_keeps_no_best(tiny_folder, tmp_path, one_thread, caplog):
    out = tmp_path / "out"
    argv = tiny_finetune(tiny_folder, out, "--batch_size", "16", "--print_freq", "100", "--warmup_epochs", "0", "--epochs",
                         "2", "--lr", "1e20")
    with caplog.at_level(logging.ERROR, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
        runtime.run_cli(lambda: main_finetune.main(argv))
    assert exc.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "metrics.loss are NaN or infinite: the run has blown up" in errors[0]
    assert not list(out.glob("checkpoint-*.pth"))


def test_a_nan_validation_metric_is_never_saved_as_best(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpts = RunCheckpoints(tmp_path, epochs=3, save_every=1)
    good = training_state(model, optimizer, scaler, epoch=0, step=1, skipped=0, args={},
                          metrics={"acc1": 50.0, "loss": 1.0}, best={"acc1": 50.0, "epoch": 0})
    ckpts.end_epoch(0, good, log={"epoch": 0}, is_best=True)
    best = (tmp_path / "checkpoint-best.pth").read_bytes()
    bad = {**good, "epoch": 1, "metrics": {"acc1": 60.0, "loss": float("nan")}, "best": {"acc1": 60.0, "epoch": 1}}
    with pytest.raises(NonFiniteStateError, match=r"metrics\.loss are NaN"):
        ckpts.end_epoch(1, bad, log={"epoch": 1}, is_best=True)
    assert (tmp_path / "checkpoint-best.pth").read_bytes() == best


def test_knn_labels_outside_the_classes_are_refused():
    feats = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for bad in (torch.tensor([0, 1, 2, 0, 1, 10**12]), torch.tensor([0, -1, 2, 0, 1, 2])):
        with pytest.raises(ValueError, match="outside the 3 classes"):
            knn_classify(feats, bad, feats, labels, ks=[1], num_classes=3, distributed=False)
    assert knn_classify(feats, labels, feats, labels, ks=[1], num_classes=3, distributed=False)[1][0] == 100.0


@pytest.mark.parametrize("label", [10**12, -1])
def test_load_features_refuses_labels_that_are_not_class_indices(tmp_path, label):
    folder = tmp_path / "feats"
    folder.mkdir()
    labels = torch.tensor([0, 1, 2, label])
    for split in ("train", "test"):
        torch.save(torch.randn(4, 8), folder / f"{split}feat.pth")
        torch.save(labels, folder / f"{split}labels.pth")
    with pytest.raises(ValueError, match=f"labels range from {min(0, label)} to {max(2, label)} over 8 samples"):
        main_knn.load_features(folder, torch.device("cpu"))


@pytest.mark.parametrize("key, value, match", [
    ("pos_embed", torch.zeros(1, 1, 5, 192), r"'pos_embed' has shape \(1, 1, 5, 192\)"),
    ("pos_embed", torch.zeros(1, 1, 192), r"'pos_embed' has shape \(1, 1, 192\)"),
    ("patch_embed.proj.weight", torch.zeros(192, 3, 0, 0), r"'patch_embed.proj.weight' has shape \(192, 3, 0, 0\)"),
])
def test_a_damaged_position_embedding_or_patch_kernel_is_named(key, value, match):
    state = models.create_model("vit_tiny_patch16", img_size=32).state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=match):
        adapt_to_model(state, patch_size=16, grid_size=2)


@pytest.mark.parametrize("flag", ["--lr", "--blr"])
def test_a_learning_rate_that_overflows_float32_is_one_line_in_flag_words(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main_finetune.main(["--data_path", "x", flag, "3e38"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be below 1e+30" in capsys.readouterr().err.strip().splitlines()[-1]
