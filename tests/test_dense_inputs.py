"""Hostile inputs of the dense tasks (COCO layout for main_detect.py, ADE20K layout for main_segment.py): malformed
annotation files are one-line errors naming the file, the image and the annotation when the dataset is built;
degenerate annotations are dropped with a counted warning (detectron2 ``load_coco_json``, mmdet
``CocoDataset._parse_ann_info``); unreadable images are skipped as the classification folders skip them, or stop
with one line under ``strict_data``; pictures too large to decode are refused before decoding."""
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.run
from util.data.ade20k import ADE20KDataset
from util.data.coco import CocoInstances
from util.data.folder import CorruptImageError

SIZE = 32
SQUARE = [4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]  # a 16 x 16 square polygon


def _ann(ann_id, image_id, **over):
    ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [4.0, 4.0, 16.0, 16.0], "area": 256.0,
           "iscrowd": 0, "segmentation": [list(SQUARE)]}
    ann.update(over)
    return ann


def coco_root(root: Path, edit=None, *, split="val", n=3) -> Path:
    """A COCO layout with ``n`` 32 x 32 images per split, one square object each (ids: image i, annotation i)."""
    rng = np.random.default_rng(0)
    for name in ("train", "val"):
        (root / f"{name}2017").mkdir(parents=True, exist_ok=True)
        images = [{"id": i, "file_name": f"{i:03d}.png", "width": SIZE, "height": SIZE} for i in range(1, n + 1)]
        for img in images:
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                root / f"{name}2017" / img["file_name"])
        gt = {"images": images, "annotations": [_ann(i, i) for i in range(1, n + 1)],
              "categories": [{"id": 1, "name": "square"}]}
        if edit is not None and name == split:
            gt = edit(gt, root / f"{name}2017")
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{name}2017.json").write_text(json.dumps(gt))
    return root


def _set_ann(**over):
    def edit(gt, folder):
        gt["annotations"][1].update(over)  # annotation 2 of image 2
        return gt
    return edit


# ---- COCO: malformed annotation files are one line naming file, image and annotation, at build time --------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_a_polygon_coordinate_that_would_take_gigabytes_is_refused_at_build(tmp_path, monkeypatch, value):
    # Rasterizing [1, 1, 1e7, ...] on a 32 x 32 image raises std::bad_alloc under a 1 GB address-space cap (NaN,
    # inf, 1e30 and 1e9 too): the check must come before any decoding. This test never decodes a mask.
    import util.data.coco as coco
    monkeypatch.setattr(coco, "decode_segmentation", lambda *a: pytest.fail("a mask was decoded"))
    root = coco_root(tmp_path, _set_ann(segmentation=[[4.0, 4.0, value, 4.0, 20.0, 20.0]]))
    with pytest.raises(ValueError) as info:
        CocoInstances(root, "val")
    message = str(info.value)
    assert "\n" not in message and "instances_val2017.json" in message
    assert "annotation 2 of image 2 (002.png)" in message


@pytest.mark.parametrize("edit, needle", [
    (lambda gt, f: [gt], "a JSON object with 'images'"),
    (lambda gt, f: {**gt, "images": {str(i["id"]): i for i in gt["images"]}}, "'images' must be a list of objects"),
    (lambda gt, f: {**gt, "annotations": [1, 2]}, "'annotations' must be a list of objects"),
    (_set_ann(bbox=[4.0, 4.0, 16.0]), "annotation 2 of image 2 (002.png): 'bbox' must be [x, y, width, height]"),
    (_set_ann(bbox="4 4 16 16"), "annotation 2 of image 2 (002.png): 'bbox' must be"),
    (_set_ann(bbox=[4.0, float("nan"), 16.0, 16.0]), "annotation 2 of image 2 (002.png): 'bbox' must be"),
    (_set_ann(area=None), "annotation 2 of image 2 (002.png): 'area' must be a finite number"),
    (_set_ann(segmentation=[["4", 4, 20, 4, 20, 20]]), "annotation 2 of image 2 (002.png): a polygon must be"),
    (_set_ann(segmentation=7), "annotation 2 of image 2 (002.png): 'segmentation' must be"),
    (_set_ann(iscrowd=1, segmentation={"size": [SIZE, SIZE], "counts": "!!!"}),
     "annotation 2 of image 2 (002.png): RLE counts cover -1 pixels"),
    (_set_ann(iscrowd=1, segmentation={"size": [SIZE, SIZE], "counts": 5}), "RLE counts must be a list"),
    (_set_ann(iscrowd=1, segmentation={"size": [16, 16], "counts": [256]}),
     "annotation 2 of image 2 (002.png): RLE size [16, 16] is not the image's [height, width] = [32, 32]"),
    (_set_ann(iscrowd=1, segmentation={"size": [SIZE, SIZE], "counts": [10, 5]}),
     "annotation 2 of image 2 (002.png): RLE counts cover 15 pixels, not the 32x32 = 1024"),
    (_set_ann(id=1), "annotation ids are not unique"),
    (_set_ann(image_id=[2]), "annotation 2 needs integer 'id', 'image_id' and 'category_id', got 2, [2], 1"),
    (lambda gt, f: {**gt, "images": gt["images"] + gt["images"][:1]}, "image 1 is listed twice"),
    (lambda gt, f: {**gt, "images": [{**gt["images"][0], "width": 0}] + gt["images"][1:]},
     "image 1 (001.png): width and height must be positive integers, got 0 x 32"),
    (lambda gt, f: {**gt, "images": [{**gt["images"][0], "width": 20000, "height": 20000}]},
     "20000x20000 = 400000000 pixels, more than"),
])
def test_a_malformed_annotation_file_is_one_line_at_build(tmp_path, edit, needle):
    root = coco_root(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        CocoInstances(root, "val")
    message = str(info.value)
    assert "\n" not in message and str(root / "annotations" / "instances_val2017.json") in message
    assert needle in message


def test_an_annotation_file_that_is_not_json_names_the_file(tmp_path):
    root = coco_root(tmp_path)
    (root / "annotations" / "instances_train2017.json").write_text("{'images': ")
    with pytest.raises(ValueError, match=r"instances_train2017.json is not a JSON file"):
        CocoInstances(root, "train", train=True)


def test_a_compressed_rle_is_checked_like_pycocotools_decodes_it(tmp_path):
    from faster_coco_eval.core import mask as mask_util

    from util.data.coco import check_annotation
    image = {"id": 2, "file_name": "002.png", "width": SIZE, "height": SIZE}
    rng = np.random.default_rng(1)
    for _ in range(5):  # strings written by the library itself: accepted, whatever the mask
        mask = np.asfortranarray((rng.random((SIZE, SIZE, 1)) < rng.random()).astype(np.uint8))
        rle = mask_util.encode(mask)[0]
        rle["counts"] = rle["counts"].decode("ascii")
        assert check_annotation(_ann(2, 2, iscrowd=1, segmentation=rle), image, "x")[1] == "crowd"
    small = mask_util.encode(np.asfortranarray(np.ones((16, 16, 1), np.uint8)))[0]  # 256 pixels, not 1024
    with pytest.raises(ValueError, match="RLE counts cover 256 pixels"):
        check_annotation(_ann(2, 2, iscrowd=1, segmentation={"size": [SIZE, SIZE], "counts": small["counts"]}),
                         image, "x")


# ---- COCO: degenerate annotations are dropped with a counted warning ------------------------------------------------

def _degenerate(gt, folder):
    anns = gt["annotations"]
    anns[0]["segmentation"] = [[5.0, 5.0], list(SQUARE)]  # a 1-point part beside a good one: the part goes
    anns += [
        _ann(10, 1, segmentation=[[5.0, 5.0]]),  # 1 point
        _ann(11, 1, segmentation=[[]]),  # an empty polygon
        _ann(12, 1, segmentation=[[4.0, 4.0, 20.0, 4.0, 20.0]]),  # odd number of coordinates
        _ann(13, 2, bbox=[4.0, 4.0, 0.0, 16.0]),  # zero width
        _ann(14, 2, bbox=[40.0, 40.0, 5.0, 5.0]),  # outside the 32 x 32 image
        _ann(15, 2, area=0),  # zero area
        _ann(16, 3, iscrowd=1, segmentation={"size": [SIZE, SIZE], "counts": [100, 50, SIZE * SIZE - 150]}),
        _ann(17, 3, segmentation=[]),  # no segmentation: box only, kept for box evaluation
    ]
    return gt


@pytest.mark.parametrize("train", [False, True])
def test_degenerate_annotations_are_dropped_with_a_counted_warning(tmp_path, caplog, train):
    root = coco_root(tmp_path, _degenerate, split="train" if train else "val")
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        ds = CocoInstances(root, "train" if train else "val", train=train)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "8 of 11 annotations are not training targets" in warnings[0]
    for part in ("3 without a polygon of 3 or more points", "1 box under 1 pixel", "1 box outside the image",
                 "1 zero area", "1 crowd", "1 without segmentation"):
        assert part in warnings[0]
    assert len(ds) == 3
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[4:20, 4:20] = 1  # the square polygon's pixels (pixel centres inside, COCO's rasterization)
    for index in range(3):
        image, target = ds[index]
        assert image.shape == (3, SIZE, SIZE)
        assert target["boxes"].tolist() == [[4.0, 4.0, 20.0, 20.0]]  # only the good square of each image
        assert target["masks"].shape == (1, SIZE, SIZE)
        assert (target["masks"][0].numpy() == square).all()
    # evaluation's ground truth: the 3 instances without a polygon are gone, the rest stays (crowd = ignore)
    ids = sorted(a["id"] for a in ds.gt["annotations"])
    assert ids == [1, 2, 3, 13, 14, 15, 16, 17]
    assert next(a for a in ds.gt["annotations"] if a["id"] == 1)["segmentation"] == [SQUARE]
    if not train:
        from engine.coco_eval import coco_metrics
        dets = [{"image_id": i, "category_id": 1, "bbox": [4.0, 4.0, 16.0, 16.0], "score": 1.0} for i in (1, 2, 3)]
        metrics = coco_metrics(ds.gt, dets, iou_types=("bbox",))
        assert metrics["bbox_AP50"] < 100  # the zero-area, outside and box-only instances are unmatched truth


# ---- COCO: unreadable images -----------------------------------------------------------------------------------------

def _break(kind):
    def edit(gt, folder):
        path = folder / "002.png"
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("not an image")
        else:  # truncated: the header reads, the pixels do not
            path.write_bytes(path.read_bytes()[:120])
        return gt
    return edit


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_training_skips_an_unreadable_image_with_a_warning(tmp_path, caplog, kind):
    root = coco_root(tmp_path, _break(kind), split="train")
    ds = CocoInstances(root, "train", train=True)
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        image, target = ds[1]
    assert target["image_id"] == 3 and image.shape == (3, SIZE, SIZE)  # the next image, as the folders do
    assert any("002.png" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert ds[1][1]["image_id"] == 3  # known bad: not read again
    strict = CocoInstances(root, "train", train=True, strict_data=True)
    with pytest.raises(CorruptImageError) as info:
        strict[1]
    assert "\n" not in str(info.value) and "002.png" in str(info.value) and "--strict_data" in str(info.value)


@pytest.mark.parametrize("kind", ["empty", "text"])
def test_evaluation_leaves_out_an_image_whose_header_cannot_be_read(tmp_path, caplog, kind):
    root = coco_root(tmp_path, _break(kind))
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        ds = CocoInstances(root, "val")
    assert ds.image_ids == [1, 3]
    assert any("1 of 3 images cannot be read" in r.getMessage() for r in caplog.records)
    with pytest.raises(CorruptImageError, match=r"002.png.*--strict_data"):
        CocoInstances(root, "val", strict_data=True)


def test_evaluation_stops_on_an_image_that_cannot_be_decoded(tmp_path):
    ds = CocoInstances(coco_root(tmp_path, _break("truncated")), "val")
    assert ds.image_ids == [1, 2, 3]  # the header is fine
    with pytest.raises(CorruptImageError, match=r"cannot read image .*002.png \(image 2\)"):
        ds[1]


# ---- main_detect: both files are checked before the model is built and before any training -----------------------

@pytest.mark.parametrize("edit, error, needle", [
    (_set_ann(bbox=[4.0, 4.0, 16.0]), ValueError, "instances_val2017.json: annotation 2 of image 2"),
    (_break("empty"), CorruptImageError, "002.png"),
])
def test_main_detect_checks_the_val_file_before_training(tmp_path, monkeypatch, edit, error, needle):
    import main_detect
    monkeypatch.setattr(main_detect, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setattr(engine.run, "train_one_epoch", lambda *a, **k: pytest.fail("training started"))
    root = coco_root(tmp_path / "coco", edit)
    with pytest.raises(error, match=needle):
        main_detect.main(["--config", "configs/detect/demo.yaml", "--data_path", str(root), "--strict_data",
                          "--input_size", "32", "--output_dir", str(tmp_path / "out")])


# ---- ADE20K ---------------------------------------------------------------------------------------------------------

def ade_root(root: Path, n=3, split="training", label_values=(1, 2)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            root / "images" / split / f"{i}.jpg", quality=95)
        label = np.full((SIZE, SIZE), label_values[0], np.uint8)
        label[:, SIZE // 2:] = label_values[1]
        Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{i}.png")
    return root


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (8-bit grey) and whose data are cut short: opening it reads only
    the header, so the test never holds the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, from 1x its limit
@pytest.mark.parametrize("which", ["images", "annotations"])
def test_a_20000_pixel_square_png_is_refused_before_decoding(tmp_path, which):
    root = ade_root(tmp_path)
    name = "1.jpg" if which == "images" else "1.png"
    _png_header(root / which / "training" / name, 20000, 20000)
    with pytest.raises(ValueError) as info:
        ADE20KDataset(root, "train", None, num_classes=4)
    assert "\n" not in str(info.value) and name in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)
    _png_header(root / which / "training" / name, 9000, 9999)  # 89991000 > PIL's 89478485, where PIL only warns
    with pytest.raises(ValueError, match="refused before decoding"):
        ADE20KDataset(root, "train", None, num_classes=4)


@pytest.mark.parametrize("which, content", [("images", b""), ("images", b"GIF is a lie, just text"),
                                            ("annotations", b"")])
def test_an_unreadable_file_leaves_its_pair_out_at_build(tmp_path, caplog, which, content):
    root = ade_root(tmp_path)
    bad = root / which / "training" / ("1.jpg" if which == "images" else "1.png")
    bad.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        ds = ADE20KDataset(root, "train", None, num_classes=4)
    assert [Path(p).stem for p, _ in ds.samples] == ["0", "2"]
    assert any("1 of 3 image / label pairs cannot be read" in r.getMessage() and str(bad) in r.getMessage()
               for r in caplog.records)
    assert ds[1][1].shape == (SIZE, SIZE)
    with pytest.raises(CorruptImageError) as info:
        ADE20KDataset(root, "train", None, num_classes=4, strict_data=True)
    assert "\n" not in str(info.value) and str(bad) in str(info.value) and "--strict_data" in str(info.value)


def test_a_truncated_image_is_skipped_in_training_and_stops_evaluation(tmp_path, caplog):
    root = ade_root(tmp_path)
    bad = root / "images" / "training" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    ds = ADE20KDataset(root, "train", None, num_classes=4)
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        _, label, index = ds[1]
    assert index == 2 and label.shape == (SIZE, SIZE)
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    with pytest.raises(CorruptImageError, match=r"1.jpg.*--strict_data"):
        ADE20KDataset(root, "train", None, num_classes=4, strict_data=True)[1]
    (root / "images" / "training").rename(root / "images" / "validation")
    (root / "annotations" / "training").rename(root / "annotations" / "validation")
    with pytest.raises(CorruptImageError, match=r"1.jpg.*evaluation reads every pair"):
        ADE20KDataset(root, "val", None, num_classes=4)[1]


def test_a_label_map_of_another_size_than_its_image_is_refused_at_build(tmp_path):
    root = ade_root(tmp_path)
    Image.fromarray(np.ones((SIZE, SIZE + 1), np.uint8), mode="L").save(root / "annotations" / "training" / "2.png")
    with pytest.raises(ValueError, match=r"2.jpg is 32x32 but its label map .*2.png is 33x32"):
        ADE20KDataset(root, "train", None, num_classes=4)


def test_a_16_bit_label_beyond_255_is_refused_not_ignored(tmp_path):
    root = ade_root(tmp_path)
    path = root / "annotations" / "training" / "1.png"
    wide = np.full((SIZE, SIZE), 2, np.uint16)
    wide[0, :4] = 256  # would be 255 (ignore) after reduce_zero_label
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    ds = ADE20KDataset(root, "train", None, num_classes=4)
    with pytest.raises(ValueError) as info:
        ds[1]
    assert str(info.value).startswith(f"{path}: class ids [256] are outside [0, 4)")
    wide[0, :4] = 3  # a 16-bit map of valid ids reads as the 8-bit one would
    Image.fromarray(wide).save(path)
    expected = torch.from_numpy(wide.astype(np.int64) - 1)  # reduce_zero_label
    assert torch.equal(ds[1][1], expected)


@pytest.mark.parametrize("split", ["training", "validation"])
def test_main_segment_stops_on_an_unreadable_label_map_before_training_with_strict_data(tmp_path, monkeypatch,
                                                                                         split):
    import main_segment
    monkeypatch.setattr(engine.run, "train_one_epoch", lambda *a, **k: pytest.fail("training started"))
    root = ade_root(tmp_path / "ade")
    ade_root(tmp_path / "ade", split="validation")
    bad = root / "annotations" / split / "1.png"
    bad.write_bytes(b"")
    with pytest.raises(CorruptImageError) as info:
        main_segment.main(["--config", "configs/segment/demo.yaml", "--data_path", str(root), "--strict_data",
                           "--nb_classes", "4", "--batch_size", "2", "--output_dir", str(tmp_path / "out")])
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
