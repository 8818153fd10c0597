"""Segmentation and detection pictures: readable size, column labels, a class legend, ground truth beside the
predictions, labels that do not overlap."""
import numpy as np
import pytest
import torch
from PIL import Image

from util.vis import GAP, HEADER, place_labels, save_detection_png, save_segmentation_png, segmentation_palette


def dark_pixels(region: np.ndarray) -> int:
    return int((region.max(axis=-1) < 100).sum())


def test_segmentation_picture_is_readable_labelled_and_has_a_legend(tmp_path):
    h = w = 32  # a demo-size label map: three columns of 32 px were 196 px wide, with nothing to read
    label = torch.zeros(h, w, dtype=torch.long)
    label[:, 16:] = 2
    pred = label.clone()
    pred[:8] = 1
    image = torch.zeros(3, h, w)
    path = save_segmentation_png(tmp_path / "seg.png", [(image, label, pred)], num_classes=4,
                                 class_names=["wall", "sky", "tree", "road"])
    picture = np.asarray(Image.open(path).convert("RGB"))
    tile = 32 * 6  # 32 px enlarged by the whole factor ceil(192 / 32) = 6
    assert picture.shape[1] == 3 * tile + 2 * GAP and picture.shape[0] > HEADER + tile
    for c in range(3):  # a label above each column (text in the header, over that column)
        assert dark_pixels(picture[:HEADER, c * (tile + GAP):c * (tile + GAP) + tile]) > 10
    legend = picture[HEADER + tile:]
    palette = segmentation_palette(4).numpy()
    for k in (0, 1, 2):  # the classes present have their swatch in the legend; class 3 (absent) has none
        assert (np.abs(legend.astype(int) - palette[k]).sum(-1) == 0).sum() >= 50
    assert (np.abs(legend.astype(int) - palette[3]).sum(-1) == 0).sum() == 0
    assert dark_pixels(legend) > 30  # the class names


def test_labels_of_boxes_at_one_place_do_not_overlap():
    rects = place_labels([(10, 20), (10, 20), (12, 22)], [(40, 12)] * 3, width=100, height=100)
    assert rects[0] == (10, 8, 50, 20)  # just above its box
    for i in range(3):
        x0, y0, x1, y1 = rects[i]
        assert 0 <= x0 and x1 <= 100 and 0 <= y0 and y1 <= 100
        for j in range(i):
            q = rects[j]
            assert x1 <= q[0] or q[2] <= x0 or y1 <= q[1] or q[3] <= y0, (rects[i], q)


def test_detection_picture_shows_ground_truth_beside_predictions(tmp_path):
    img = torch.full((3, 64, 80), 0.5)
    box = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    outputs = [{"boxes": torch.cat([box, box + 2]), "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8])}]
    targets = [{"boxes": box, "labels": torch.tensor([1])}]
    path = save_detection_png(tmp_path / "det.png", [img], outputs, ["cat", "dog"], targets=targets)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (HEADER + 64, 2 * 80 + GAP, 3)  # truth | predictions, one header above
    truth, preds = picture[HEADER:, :80], picture[HEADER:, 80 + GAP:]
    green, yellow = np.array([0, 255, 0]), np.array([255, 255, 0])
    assert (truth == green).all(-1).sum() > 50 and (truth == yellow).all(-1).sum() == 0
    assert (preds == yellow).all(-1).sum() > 50 and (preds == green).all(-1).sum() == 0
    assert dark_pixels(picture[:HEADER, :80]) > 10 and dark_pixels(picture[:HEADER, 80 + GAP:]) > 10
