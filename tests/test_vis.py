"""Tests for util/vis.py: reconstruction PNGs read back with PIL and compared tile by tile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from util.vis import (GAP, HEADER, confusion_layout, epoch_ticks, save_confusion_png, save_reconstruction_png,
                      save_schedule_png)

IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
B, H, P = 3, 32, 8
L = (H // P) ** 2


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized images [B, 3, H, H] whose pixels are exact multiples of 1/255, and a mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (B, 3, H, H), generator=g).float() / 255
    mask = (torch.rand(B, L, generator=g) < 0.75).float()
    return (pixels - IMAGENET_MEAN) / IMAGENET_STD, mask


def _patchify_loop(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE patch order written as explicit loops: (row-in-patch, col-in-patch, channel), channel fastest."""
    b, c, h, w = imgs.shape
    out = torch.empty(b, (h // p) * (w // p), p * p * c)
    for i in range(h // p):
        for j in range(w // p):
            patch = imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [B, C, p, p]
            out[:, i * (w // p) + j] = patch.permute(0, 2, 3, 1).reshape(b, -1)
    return out


def _tile(png: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = HEADER + row * (H + GAP), col * (H + GAP)  # column labels above the tiles
    return png[y:y + H, x:x + H].astype(int)


def _pixel_out(pred: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> dict:
    return {"mask": mask, "preds": [pred], "targets": [target], "masks": [mask], "scales": [1.0]}


def test_exact_prediction_reconstructs_original(tmp_path: Path) -> None:
    imgs, mask = _batch()
    target = _patchify_loop(imgs, P)
    path = save_reconstruction_png(tmp_path / "sub" / "rec.png", imgs, _pixel_out(target.clone(), mask, target), P,
                                   norm_pix_loss=False)
    assert path == tmp_path / "sub" / "rec.png" and not list(path.parent.glob("*.tmp"))
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape == (HEADER + B * H + (B - 1) * GAP, 4 * H + 3 * GAP, 3)
    for b in range(B):
        original = _tile(png, b, 0)
        expected = (imgs[b:b + 1] * IMAGENET_STD + IMAGENET_MEAN)[0].permute(1, 2, 0).numpy() * 255
        np.testing.assert_allclose(original, expected, atol=0.51)  # denormalized by hand
        np.testing.assert_array_equal(_tile(png, b, 2), original)  # pasted reconstruction
        np.testing.assert_array_equal(_tile(png, b, 3), original)  # reconstruction alone
        removed = mask[b].reshape(H // P, H // P).repeat_interleave(P, 0).repeat_interleave(P, 1).bool().numpy()
        masked = _tile(png, b, 1)
        np.testing.assert_array_equal(masked[~removed], original[~removed])
        assert np.all(np.abs(masked[removed] - 127.5) <= 0.5)  # grey
    assert png[HEADER + H:HEADER + H + GAP].min() == 255  # white gap between rows


def test_wrong_prediction_shows_only_where_masked(tmp_path: Path) -> None:
    imgs, mask = _batch(1)
    target = _patchify_loop(imgs, P)
    pred = torch.full_like(target, 10.0)  # saturates to white after de-normalization
    png = np.asarray(Image.open(save_reconstruction_png(tmp_path / "r.png", imgs, _pixel_out(pred, mask, target), P,
                                                        norm_pix_loss=False)))
    for b in range(B):
        removed = mask[b].reshape(H // P, H // P).repeat_interleave(P, 0).repeat_interleave(P, 1).bool().numpy()
        pasted, original = _tile(png, b, 2), _tile(png, b, 0)
        assert (pasted[removed] == 255).all()
        np.testing.assert_array_equal(pasted[~removed], original[~removed])
        assert (_tile(png, b, 3) == 255).all()


def test_norm_pix_prediction_is_denormalized_per_patch(tmp_path: Path) -> None:
    imgs, mask = _batch(2)
    target = _patchify_loop(imgs, P)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # unbiased, as MAE's loss
    pred = (target - mean) / (var + 1e-6).sqrt()
    png = np.asarray(Image.open(save_reconstruction_png(tmp_path / "n.png", imgs, _pixel_out(pred, mask, pred), P,
                                                        norm_pix_loss=True)))
    for b in range(B):
        assert np.abs(_tile(png, b, 3) - _tile(png, b, 0)).max() <= 1  # float round-off may flip one level
    # and without the de-normalization the picture would be clearly different
    raw = np.asarray(Image.open(save_reconstruction_png(tmp_path / "m.png", imgs, _pixel_out(pred, mask, pred), P,
                                                        norm_pix_loss=False)))
    assert np.abs(_tile(raw, 0, 3) - _tile(raw, 0, 0)).mean() > 10


def test_max_images_limits_rows(tmp_path: Path) -> None:
    imgs, mask = _batch()
    target = _patchify_loop(imgs, P)
    png = Image.open(save_reconstruction_png(tmp_path / "r.png", imgs, _pixel_out(target, mask, target), P,
                                             norm_pix_loss=False, max_images=2))
    assert png.size == (4 * H + 3 * GAP, HEADER + 2 * H + GAP)


@pytest.mark.parametrize("same", [True, False])
def test_hog_stages(tmp_path: Path, same: bool) -> None:
    imgs, mask = _batch(3)
    g = torch.Generator().manual_seed(0)
    scales = [4.0, 2.0, 1.0, 0.5]
    grids = [int(H // P * s) for s in scales]  # 16, 8, 4, 2 cells per side
    targets = [torch.nn.functional.normalize(torch.rand(B, n * n, 3, 9, generator=g), dim=-1).reshape(B, n * n, 27)
               for n in grids]
    preds = [t.clone() if same else torch.zeros_like(t) for t in targets]
    out = {"mask": mask, "preds": preds, "targets": targets, "masks": [torch.ones(B, n * n) for n in grids],
           "scales": scales}
    png = np.asarray(Image.open(save_reconstruction_png(tmp_path / "hog.png", imgs, out, P, norm_pix_loss=True)))
    assert png.shape == (HEADER + B * H + (B - 1) * GAP, 10 * H + 9 * GAP, 3)
    for b in range(B):
        for k, n in enumerate(grids):
            t_tile, p_tile = _tile(png, b, 2 + 2 * k), _tile(png, b, 3 + 2 * k)
            assert t_tile.max() == 255  # scaled by the target's maximum
            cell = H // n  # nearest upscaling: constant within a cell
            assert (t_tile[::cell, ::cell].repeat(cell, 0).repeat(cell, 1) == t_tile).all()
            if same:
                np.testing.assert_array_equal(p_tile, t_tile)
            else:
                assert (p_tile == 0).all()


def test_multiscale_pixel_stages_reconstruct_original(tmp_path: Path) -> None:
    """LocalMIM's pixel variant: a stage at scale s predicts regions of p / s pixels."""
    imgs, mask = _batch(4)
    scales = [4.0, 2.0, 1.0, 0.5]
    targets = [_patchify_loop(imgs, int(P / s)) for s in scales]  # regions 2, 4, 8, 16 px
    out = {"mask": mask, "preds": [t.clone() for t in targets], "targets": targets, "masks": [], "scales": scales}
    png = np.asarray(Image.open(save_reconstruction_png(tmp_path / "p.png", imgs, out, P, norm_pix_loss=False)))
    assert png.shape[1] == 10 * H + 9 * GAP
    for b in range(B):
        for col in range(2, 10):
            np.testing.assert_array_equal(_tile(png, b, col), _tile(png, b, 0))


def test_target_kind_overrides_shape_detection(tmp_path: Path) -> None:
    imgs, mask = _batch(5)
    target = _patchify_loop(imgs, P)
    out = _pixel_out(target, mask, target)
    pix = np.asarray(Image.open(save_reconstruction_png(tmp_path / "a.png", imgs, out, P, norm_pix_loss=False)))
    hog = np.asarray(Image.open(save_reconstruction_png(tmp_path / "b.png", imgs, out, P, norm_pix_loss=False,
                                                        target="hog")))
    np.testing.assert_array_equal(_tile(pix, 0, 3), _tile(pix, 0, 0))
    t_tile = _tile(hog, 0, 2)
    assert (t_tile[..., 0] == t_tile[..., 1]).all() and (t_tile[..., 1] == t_tile[..., 2]).all()  # grey map
    bad = {"mask": mask, "preds": [torch.zeros(B, 4, 27)], "targets": [torch.zeros(B, 4, 27)], "scales": [0.5]}
    with pytest.raises(ValueError, match="not a pixel target"):
        save_reconstruction_png(tmp_path / "c.png", imgs, bad, P, norm_pix_loss=False, target="pixel")


def test_columns_are_labelled(tmp_path: Path) -> None:
    imgs, mask = _batch()
    target = _patchify_loop(imgs, P)
    png = np.asarray(Image.open(save_reconstruction_png(tmp_path / "l.png", imgs, _pixel_out(target, mask, target), P,
                                                        norm_pix_loss=False)))
    header = png[:HEADER].astype(int)
    for col in range(4):  # every column has dark label pixels above it, none spill into the gaps
        assert (header[:, col * (H + GAP):col * (H + GAP) + H] < 100).any(), col
    assert (header[:, H:H + GAP] == 255).all()


def test_hog_prediction_is_stretched_over_its_own_range(tmp_path: Path) -> None:
    """A prediction 100x smaller than its target (early training) draws as the target does, not as a black tile."""
    imgs, mask = _batch(6)
    g = torch.Generator().manual_seed(1)
    target = torch.nn.functional.normalize(torch.rand(B, 16, 3, 9, generator=g), dim=-1).reshape(B, 16, 27)
    out = {"mask": mask, "preds": [target / 100], "targets": [target], "scales": [1.0]}
    png = np.asarray(Image.open(save_reconstruction_png(tmp_path / "h.png", imgs, out, P, norm_pix_loss=False,
                                                        target="hog")))
    for b in range(B):
        t_tile, p_tile = _tile(png, b, 2), _tile(png, b, 3)
        assert p_tile.max() == 255 and p_tile.min() == 0
        np.testing.assert_allclose(p_tile, t_tile, atol=1)


@pytest.mark.parametrize("epochs, expected", [(3, [0, 1, 2, 3]), (1, [0, 1]), (10, list(range(11))),
                                              (11, [0, 2, 4, 6, 8, 10]), (100, list(range(0, 101, 10))),
                                              (1600, list(range(0, 1601, 200))), (2.5, [0, 1, 2])])
def test_schedule_epoch_ticks_are_whole_and_distinct(epochs, expected):
    assert epoch_ticks(epochs) == expected  # the bug: "0 1 2 2 3" for a 3-epoch run


def test_schedule_png_of_a_short_run(tmp_path: Path) -> None:
    from engine.freezeout import FreezeOutSchedule

    schedule = FreezeOutSchedule(num_units=4, total_steps=12, base_lr=1e-3, warmup_steps=4, t_0=0.8)
    image = Image.open(save_schedule_png(tmp_path / "s.png", schedule, steps_per_epoch=4))
    assert image.size == (960, 540)


def test_confusion_png_keeps_whole_class_names_and_labels_columns(tmp_path: Path) -> None:
    from PIL import ImageDraw

    names = ["ulcerative-colitis-grade-2-3-long-name", "b", "c"]  # 38 characters: was cut at 24
    image = np.asarray(Image.open(save_confusion_png(tmp_path / "c.png", torch.eye(3, dtype=torch.long) * 5,
                                                     names)).convert("L")).astype(int)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    whole, cut = int(measure(names[0])) + 8, int(measure(names[0][:24]))  # label band; where the old cut ended
    assert confusion_layout(names) == (48, whole, 24 + whole)
    rows_area = image[24 + whole:, :whole]  # row names, left of the grid
    assert (rows_area[:, cut + 8:] < 128).any()  # text beyond the old 24-character cut
    columns_area = image[24:24 + whole, whole:whole + 3 * 48]  # column names, above the grid, read bottom-up
    assert (columns_area < 128).sum() > 100
    assert (columns_area[:whole - cut - 8, :48] < 128).any()  # the long column name reaches high up, whole
