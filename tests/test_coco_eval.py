"""engine/coco_eval.py: box and mask AP of hand-made predictions against pycocotools' own numbers, the maxDets case
where pycocotools is wrong, zero detections, and exactness of the gathered 2-process evaluation."""
import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

from engine.coco_eval import METRICS, coco_metrics, to_coco_results

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as pmask  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H = W = 120


def _rect_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _gt() -> dict:
    """Three images, two categories (ids 3 and 7, not contiguous), objects of every COCO area range."""
    rects = [(1, 3, (10, 10, 20, 20)), (1, 7, (30, 40, 90, 100)), (2, 3, (0, 0, 115, 115)),
             (2, 3, (100, 100, 118, 118)), (3, 7, (5, 5, 45, 30)), (3, 7, (60, 60, 70, 75))]
    anns = []
    for k, (img, cat, (x0, y0, x1, y1)) in enumerate(rects):
        # an L-shaped mask inside the box, so that mask AP and box AP differ
        m = _rect_mask(x0, y0, x1, y1)
        m[y0:(y0 + y1) // 2, (x0 + x1) // 2:x1] = 0
        rle = pmask.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": k + 1, "image_id": img, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": float(m.sum()), "iscrowd": 0, "segmentation": rle})
    return {"images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
            "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}], "annotations": anns}


def _predictions():
    """Per image: boxes xyxy, scores, labels (1 -> category 3, 2 -> category 7), masks [N, 1, H, W]."""
    preds = {1: [((11, 10, 21, 21), .9, 1), ((30, 45, 85, 100), .8, 2), ((50, 50, 60, 60), .6, 2)],
             2: [((5, 0, 110, 100), .95, 1), ((95, 95, 118, 118), .4, 1), ((0, 0, 50, 50), .5, 2)],
             3: [((5, 5, 40, 30), .7, 2), ((58, 58, 72, 77), .85, 2), ((60, 60, 70, 75), .3, 1)]}
    out = {}
    for img, dets in preds.items():
        boxes = torch.tensor([d[0] for d in dets], dtype=torch.float32)
        masks = torch.stack([torch.from_numpy(_rect_mask(*map(int, d[0]))).float() * 0.9 for d in dets])[:, None]
        out[img] = (boxes, torch.tensor([d[1] for d in dets]), torch.tensor([d[2] for d in dets]), masks)
    return out


def _results(with_masks=True):
    res = []
    for img, (boxes, scores, labels, masks) in _predictions().items():
        res += to_coco_results(img, boxes, scores, labels, [3, 7], masks if with_masks else None)
    return res


def _pycocotools(gt, results, iou_type, max_dets=(1, 10, 100)):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [100 * s if s >= 0 else -1.0 for s in ev.stats[:6]]


def test_result_dicts_by_hand():
    (det,) = to_coco_results(5, torch.tensor([[10., 20., 40., 30.]]), torch.tensor([.5]), torch.tensor([2]), [3, 7],
                             torch.zeros(1, 1, 50, 60).index_fill_(2, torch.arange(20, 30), 1.0))
    assert det["image_id"] == 5 and det["category_id"] == 7 and det["bbox"] == [10, 20, 30, 10]
    assert det["segmentation"]["size"] == [50, 60] and pmask.area(det["segmentation"]) == 10 * 60
    json.dumps(det)  # plain data


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_box_and_mask_ap_match_pycocotools(iou_type):
    gt, results = _gt(), _results()
    ours = coco_metrics(gt, results, iou_types=[iou_type])
    reference = _pycocotools(gt, results, iou_type)
    assert [ours[f"{iou_type}_{m}"] for m in METRICS] == pytest.approx(reference, abs=1e-6)
    assert 0 < ours[f"{iou_type}_AP"] < 100 and ours[f"{iou_type}_APs"] >= 0 and ours[f"{iou_type}_APl"] >= 0


def test_masks_and_boxes_give_different_numbers():
    both = coco_metrics(_gt(), _results())
    assert both["bbox_AP"] != both["segm_AP"]  # the L-shaped ground-truth masks are not their boxes


def test_other_max_dets_where_pycocotools_is_wrong():
    """With 3 detections per image, maxDets (1, 2, 3) must give the AP of (1, 10, 100); pycocotools' summary
    hard-codes 100 for its first line and reports -1 instead."""
    gt, results = _gt(), _results()
    ours = coco_metrics(gt, results, iou_types=["bbox"], max_dets=(1, 2, 3))
    assert _pycocotools(gt, results, "bbox", (1, 2, 3))[0] == -1.0  # the known pycocotools bug
    assert ours["bbox_AP"] == pytest.approx(_pycocotools(gt, results, "bbox")[0], abs=1e-6)
    # maxDets counts per image and category: 1 is a real cut; pycocotools on the top-1 detections is the reference
    pairs = {(r["image_id"], r["category_id"]) for r in results}
    top1 = [max((r for r in results if (r["image_id"], r["category_id"]) == p), key=lambda r: r["score"])
            for p in pairs]
    assert len(top1) < len(results)
    cut = coco_metrics(gt, results, iou_types=["bbox"], max_dets=(1, 1, 1))
    assert cut["bbox_AP"] == pytest.approx(_pycocotools(gt, top1, "bbox")[0], abs=1e-6)


def test_zero_detections_is_ap_zero_not_a_crash():
    out = coco_metrics(_gt(), [])
    assert out["bbox_AP"] == 0.0 and out["segm_AP50"] == 0.0 and out["bbox_APs"] == 0.0
    no_large = coco_metrics({**_gt(), "annotations": _gt()["annotations"][:1]}, [], iou_types=["bbox"])
    assert no_large["bbox_APl"] == -1.0  # COCO's "no ground truth in this range"
    # boxes only: mask AP of box-only results is AP 0 too
    assert coco_metrics(_gt(), _results(with_masks=False))["segm_AP"] == 0.0


def test_an_image_without_detections_counts_its_objects_as_missed():
    gt, results = _gt(), [r for r in _results() if r["image_id"] != 2]
    assert coco_metrics(gt, results, iou_types=["bbox"])["bbox_AP"] == pytest.approx(
        _pycocotools(gt, results, "bbox")[0], abs=1e-6)


def _worker(rank, out_path):
    from engine.coco_eval import distributed_coco_metrics
    from util.distributed import init_distributed
    init_distributed(device="cpu")
    mine = [r for r in _results() if (r["image_id"] % 2) == rank]  # uneven shards: images {2} and {1, 3}
    metrics = distributed_coco_metrics(_gt(), mine)
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(metrics, handle)


def test_two_processes_give_the_single_process_numbers(tmp_path):
    from spawn_ranks import spawn
    spawn(_worker, str(tmp_path / "out"))
    single = coco_metrics(_gt(), _results())
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == pytest.approx(single)
