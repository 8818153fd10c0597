"""What pretraining writes to TensorBoard: per-unit lr and the frozen-unit count with or without FreezeOut, and the
per-scale LocalMIM losses."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_pretrain
from conftest import tiny_pretrain

ARGS = tiny_pretrain("--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-2", "--print_freq", "1", "--vis_every", "0",
                     model="MIM_vit_tiny_patch16")


def scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.usefixtures("one_thread")
def test_unit_lrs_and_frozen_count_are_logged_without_freezeout(tmp_path):
    main_pretrain.main([*ARGS, "--output_dir", str(tmp_path / "run")])
    tags = scalars(tmp_path / "run")
    units = sorted(t for t in tags if t.startswith("lr/unit_"))
    assert len(units) == 13  # patch embedding + 12 blocks of ViT-Ti
    assert all(value == 0 for _, value in tags["train/num_frozen"])
    # without FreezeOut every unit follows the one cosine: all curves equal, and equal the loop's train/lr
    for tag in units:
        assert tags[tag] == tags["lr/unit_00"]
    lr_at = dict(tags["lr/unit_00"])
    for step, value in tags["train/lr"]:  # the loop logs after the update, the hook before it: step - 1
        assert value == pytest.approx(lr_at[step - 1], rel=1e-6)
    assert {"train/loss_x4", "train/loss_x2", "train/loss_x1", "train/loss_x0.5"} <= set(tags)
    # per epoch, against the epoch: what log.txt holds (epoch time, images/s, mean loss)
    import json
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    for key in ("train_epoch_time_s", "train_images_per_s", "train_loss"):
        assert tags[f"epoch/{key}"] == [(e["epoch"], pytest.approx(e[key], rel=1e-6)) for e in logged]


@pytest.mark.usefixtures("one_thread")
def test_frozen_count_rises_with_freezeout_and_the_log_says_which_terms_the_loss_holds(tmp_path):
    import json

    import models
    main_pretrain.main([*ARGS, "--epochs", "3", "--t_0", "0.3", "--how_scale", "linear",
                        "--output_dir", str(tmp_path / "run")])
    frozen = [value for _, value in scalars(tmp_path / "run")["train/num_frozen"]]
    assert frozen == sorted(frozen) and frozen[-1] > 0
    model = models.create_model("MIM_vit_tiny_patch16", img_size=32)
    names = [f"x{s:g}" for s in model.scales]
    epochs = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    for entry in epochs:  # the terms logged are the stages whose feeding block still trains at the epoch's end
        assert entry["loss_terms"] == [names[k] for k in model.active_stages(entry["num_frozen"])]
    assert len(epochs[-1]["loss_terms"]) < len(names)  # a stage was dropped, and the log says so
    log = (tmp_path / "run" / "cli_logs.txt").read_text()
    assert f"train_loss sums the LocalMIM terms {' + '.join(names)}" in log
    assert f"train_loss now sums the LocalMIM terms {' + '.join(epochs[-1]['loss_terms'])}" in log
