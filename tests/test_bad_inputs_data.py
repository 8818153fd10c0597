"""Bad data that used to pass silently: 16-bit PNGs saturated to white, mask ratios that leave no visible or no
masked patch."""
import numpy as np
import pytest
from PIL import Image

import main_pretrain
from models.masking import check_mask_ratio
from util.data.folder import load_rgb


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")  # really a 16-bit file
    rgb = np.asarray(load_rgb(str(tmp_path / "ramp16.png")))
    assert rgb.shape == (4, 256, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    expected = np.round(ramp / 257.0)  # 65535 -> 255
    assert np.abs(rgb[..., 0] - expected).max() == 0
    assert abs(rgb.mean() - 127.5) < 0.6  # PIL's own convert gives about 254


@pytest.mark.parametrize("ratio,needle", [(0.999, "no visible patch"), (1e-17, "no masked patch")])
def test_degenerate_mask_ratio_is_refused_with_the_numbers(ratio, needle):
    with pytest.raises(ValueError, match=needle) as info:
        check_mask_ratio(ratio, 16, img_size=64, patch_size=16)
    assert "--input_size 64" in str(info.value) and "of 16 patches" in str(info.value)
    assert check_mask_ratio(0.75, 16, img_size=64, patch_size=16) == 4  # MAE's int(L * (1 - r))


def test_pretraining_refuses_a_ratio_that_masks_everything(tmp_path):
    args = ["--config", "configs/pretrain/demo.yaml", "--mask_ratio", "0.999", "--input_size", "64",
            "--epochs", "1", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="no visible patch"):
        main_pretrain.main(args)
    assert not list((tmp_path / "out").glob("checkpoint-*.pth"))


@pytest.mark.parametrize("workers", [2])  # the loader-worker path (the main-process one is the same catch)
def test_strict_data_on_a_corrupt_image_is_one_line_naming_the_file(tmp_path, workers):
    import os
    import subprocess
    import sys
    from pathlib import Path

    for cls in "ab":
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / "train" / cls / f"{i}.jpg")
    bad = tmp_path / "train" / "a" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "main_pretrain.py"), "--config", "configs/pretrain/demo.yaml",
                          "--data_path", str(tmp_path), "--strict_data", "--epochs", "1", "--batch_size", "4",
                          "--num_workers", str(workers), "--vis_every", "0", "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = res.stdout + res.stderr
    assert res.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "--strict_data" in errors[0], errors
