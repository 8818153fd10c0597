"""End-to-end pretraining on the demo data and on real images, resume, and bad input (tiny models, CPU)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main_pretrain
import models
from util.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
TINY = ["--input_size", "32", "--batch_size", "16", "--num_workers", "0", "--print_freq", "1", "--warmup_epochs", "1",
        "--data_path", "demo", "--blr", "1e-2", "--seed", "0"]


def epochs_logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("model, extra", [("mae_vit_tiny_patch16", ["--norm_pix_loss"]),
                                          ("MIM_vit_tiny_patch16", [])])
def test_demo_pretraining_loss_goes_down(tmp_path, model, extra):
    out = tmp_path / "run"
    # --debug: the 64-image demo subset, 4 updates an epoch (measured: the loss falls to 0.77 (MAE) and 0.28 (LocalMIM)
    # of the first epoch's)
    stats = main_pretrain.main(["--model", model, *TINY, "--epochs", "4", "--debug", "--output_dir", str(out), *extra])
    logged = epochs_logged(out)
    assert [e["epoch"] for e in logged] == [0, 1, 2, 3]
    assert logged[-1]["train_loss"] < 0.9 * logged[0]["train_loss"]
    assert stats["loss"] == pytest.approx(logged[-1]["train_loss"])
    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 3 and isinstance(checkpoint["args"], dict)
    assert (out / "checkpoint-3.pth").is_file() and (out / "args.yaml").is_file()
    record = json.loads((out / "run_info.json").read_text())
    assert record["derived"]["lr"] == pytest.approx(1e-2 * 16 / 256)
    fresh = models.create_model(model, img_size=32)
    fresh.load_state_dict(checkpoint["model"], strict=True)


def test_imagenette_few_images_localmim(tmp_path):
    if not IMAGENETTE.is_dir():
        pytest.skip("shared imagenette data not present")
    root = tmp_path / "data" / "train"
    for class_dir in sorted((IMAGENETTE / "train").iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:3]:
            (root / class_dir.name / image.name).symlink_to(image)
    out = tmp_path / "run"
    main_pretrain.main(["--model", "MIM_vit_tiny_patch16", "--input_size", "64", "--batch_size", "8",
                        "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--data_path",
                        str(tmp_path / "data"), "--output_dir", str(out), "--vis_every", "1"])
    logged = epochs_logged(out)
    assert len(logged) == 1 and torch.isfinite(torch.tensor(logged[0]["train_loss"]))
    # the picture: the 8 sampled images (30 images, every 4th) as rows of 64 px; columns: original, masked input,
    # then HOG target and prediction for each of LocalMIM's 4 scales; 2-px gaps, a 24-px header of labels
    from PIL import Image
    with Image.open(out / "vis-0000.png") as png:
        assert png.size == (10 * (64 + 2) - 2, 24 + 8 * (64 + 2) - 2) and png.mode == "RGB"
        tile = np.asarray(png)[24:24 + 64, :64]  # first image, original: the photo, not a blank tile
    assert tile.std() > 10
    assert load_checkpoint(out / "checkpoint-last.pth")["step"] == 30 // 8


def test_resume_from_other_model_names_differences(tmp_path):
    out = tmp_path / "run"
    main_pretrain.main(["--model", "mae_vit_tiny_patch16", *TINY, "--epochs", "1", "--output_dir", str(out), "--debug"])
    with pytest.raises(ValueError, match=r"does not match the model(.|\n)*(missing|unexpected|shape)"):
        main_pretrain.main(["--model", "MIM_vit_tiny_patch16", *TINY, "--epochs", "2", "--output_dir",
                            str(tmp_path / "b"), "--resume", str(out / "checkpoint-last.pth")])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        main_pretrain.main(["--model", "mae_vit_tiny_patch16", *TINY, "--output_dir", str(tmp_path / "c"),
                            "--resume", str(tmp_path / "nope.pth")])


def test_bad_model_and_data_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # checked before anything starts: one line, exit status 2
        main_pretrain.main(["--model", "mae_vit_bass_patch16", *TINY, "--output_dir", str(tmp_path / "a")])
    assert exc.value.code == 2 and "did you mean mae_vit_base_patch16" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        main_pretrain.main(["--model", "mae_vit_tiny_patch16", *TINY[:-4], "--data_path", str(tmp_path / "no_such_dir"),
                            "--output_dir", str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        main_pretrain.main(["--model", "mae_vit_tiny_patch16", *TINY[:-4], "--data_path", str(tmp_path / "empty"),
                            "--output_dir", str(tmp_path / "c")])
