"""Each detection recipe (configs/detect/*.yaml) against the values of the reference config it follows, read from
that config; the source (repository + path) is named beside each row, so that a drift from it is caught. A value
where a recipe deliberately differs is listed in ``DELIBERATE`` with the flag that gives the reference's value
(and README.md's detection section says why)."""
from pathlib import Path

import pytest

import main_detect
from util.args import parse_args

ROOT = Path(__file__).resolve().parent.parent
DETECT = ROOT / "configs" / "detect"

# sources
VA = "czczup/ViT-Adapter detection/configs/mask_rcnn/"
VA_DINO = VA + "dinov2/mask_rcnn_dinov2_adapter_{}_fpn_3x_coco.py"
VA_DEIT = VA + "mask_rcnn_deit_adapter_{}_fpn_3x_coco.py"
VA_3X = "czczup/ViT-Adapter detection/configs/_base_/schedules/schedule_3x.py"
MMDET_MRCNN = "czczup/ViT-Adapter detection/configs/_base_/models/mask_rcnn_r50_fpn.py (mmdet's)"
MMDET_DATA = "czczup/ViT-Adapter detection/configs/_base_/datasets/coco_instance.py (mmdet's test Resize)"
DBOT = "liuxingbin/dbot evaluation/object_detection/configs/cascade_rcnn/vit_base_giou_4conv1f_coco_3x.py"
DBOT_SEED = "liuxingbin/dbot DOWNSTREAM.md (cascade_coco_det command's overrides)"
IBOT_BASE = "bytedance/ibot evaluation/object_detection/configs/_base_/models/cascade_mask_rcnn_vit_fpn.py"
VITDET = "facebookresearch/detectron2 projects/ViTDet/configs/common/models/mask_rcnn_vitdet.py"
VITDET_B = "facebookresearch/detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"
D2_DEFAULTS = "facebookresearch/detectron2 configs/common/models/mask_rcnn_fpn.py (RPN / FastRCNNOutputLayers " \
              "smooth_l1_beta default 0)"


def _mmdet_mask_rcnn_3x(size, source):
    """ViT-Adapter's Mask R-CNN 3x+MS rows shared by its DINOv2 and DeiT configs."""
    return [
        ("detector", "mask_rcnn", MMDET_MRCNN),
        ("out_channels", 256, source),  # FPN out_channels
        ("epochs", 36, VA_3X), ("lr_steps", [27, 33], VA_3X), ("warmup_iters", 500, VA_3X),
        ("lr", 1e-4, source), ("weight_decay", 0.05, source),
        ("window_size", 14, source),
        ("train_aug", "detr_ms", source), ("train_crop", 1024, source),  # RandomCrop (1024, 1024)
        ("test_size", [800, 1333], MMDET_DATA),
        ("box_head", "2fc", MMDET_MRCNN), ("mask_head_norm", "none", MMDET_MRCNN),  # FCNMaskHead
        ("rpn_smooth_l1_beta", 0.0, MMDET_MRCNN), ("box_loss", "smooth_l1", MMDET_MRCNN),  # L1Loss
        ("box_smooth_l1_beta", 0.0, MMDET_MRCNN), ("box_loss_weight", 1.0, MMDET_MRCNN),
        ("roi_align", "aligned", MMDET_MRCNN),  # mmcv RoIAlign(aligned=True)
        ("rois_per_image", 512, MMDET_MRCNN), ("max_dets", 100, MMDET_MRCNN),
    ]


def _dino(size, drop_path, layer_decay, global_blocks):
    src = VA_DINO.format(size)
    return _mmdet_mask_rcnn_3x(size, src) + [
        ("model", f"adapter_dinov2_{size}", src), ("drop_path", drop_path, src),
        ("layer_decay", layer_decay, src),  # paramwise_cfg layer_decay_rate
        ("global_blocks", global_blocks, src),  # window_attn False
    ]


def _deit(size, drop_path):
    src = VA_DEIT.format(size)
    return _mmdet_mask_rcnn_3x(size, src) + [
        ("model", f"adapter_{size}", src), ("drop_path", drop_path, src),
        ("layer_decay", 1.0, src),  # no LayerDecayOptimizerConstructor
        ("global_blocks", [2, 5, 8, 11], src),
    ]


REFERENCE = {
    "mask_rcnn_dinov2_adapter_small_fpn_3x_coco.yaml": _dino("small", 0.2, 0.7, [2, 5, 8, 11]),
    "mask_rcnn_dinov2_adapter_base_fpn_3x_coco.yaml": _dino("base", 0.3, 0.6, [2, 5, 8, 11]),
    "mask_rcnn_dinov2_adapter_large_fpn_3x_coco.yaml": _dino("large", 0.4, 0.65, [5, 11, 17, 23]),
    "mask_rcnn_deit_adapter_small_fpn_3x_coco.yaml": _deit("small", 0.2),
    "mask_rcnn_deit_adapter_base_fpn_3x_coco.yaml": _deit("base", 0.3),
    "cascade_mask_rcnn_vit_base_1x_coco.yaml": [
        ("model", "vit_base_patch16", DBOT), ("detector", "cascade_mask_rcnn", IBOT_BASE),
        ("drop_path", 0.2, DBOT), ("lr", 1e-4, DBOT), ("weight_decay", 0.05, DBOT),
        ("layer_decay", 0.75, DBOT_SEED), ("epochs", 12, DBOT_SEED), ("lr_steps", [8, 11], DBOT_SEED),
        ("batch_size", 2, DBOT_SEED), ("eff_batch_size", 16, DBOT_SEED),  # samples_per_gpu=2 x 8 GPUs
        ("warmup_iters", 500, DBOT),  # mmdet schedule_1x
        ("train_aug", "detr_ms", DBOT), ("train_crop", 0, DBOT), ("test_size", [800, 1333], DBOT),
        ("box_head", "4conv1fc", DBOT), ("box_head_norm", "bn", DBOT),  # ConvFCBBoxHead norm_cfg SyncBN
        ("class_specific_cascade", True, DBOT),  # reg_class_agnostic=False
        ("box_loss", "giou", DBOT), ("box_loss_weight", 10.0, DBOT),  # GIoULoss loss_weight 10
        ("rpn_smooth_l1_beta", 1 / 9, IBOT_BASE), ("mask_head_norm", "none", IBOT_BASE),  # FCNMaskHead
        ("roi_align", "aligned", IBOT_BASE), ("rois_per_image", 512, IBOT_BASE), ("out_channels", 256, IBOT_BASE),
        ("proposals_per_image", 2000, IBOT_BASE),  # rpn_proposal max_per_img 2000
    ],
    "mask_rcnn_vit_base_3x_coco.yaml": [
        ("model", "vit_base_patch16", VITDET_B), ("detector", "mask_rcnn", VITDET),
        ("drop_path", 0.1, VITDET), ("window_size", 14, VITDET), ("global_blocks", [2, 5, 8, 11], VITDET),
        ("use_rel_pos", True, VITDET),
        ("layer_decay", 0.7, VITDET_B),
        ("box_head", "4conv1fc", VITDET), ("box_head_norm", "ln", VITDET), ("mask_head_norm", "ln", VITDET),
        ("rpn_smooth_l1_beta", 0.0, D2_DEFAULTS),
        ("box_loss", "smooth_l1", D2_DEFAULTS), ("box_smooth_l1_beta", 0.0, D2_DEFAULTS),
        ("roi_align", "aligned", D2_DEFAULTS),  # ROIAlignV2
        ("epochs", 36, VA_3X), ("lr_steps", [27, 33], VA_3X), ("lr", 1e-4, VA_DINO.format("base")),
        ("weight_decay", 0.05, VA_DINO.format("base")), ("train_aug", "detr_ms", VA_DINO.format("base")),
        ("train_crop", 1024, VA_DINO.format("base")), ("test_size", [800, 1333], MMDET_DATA),
    ],
}
# the cascade recipe is also on ViTDet's pyramid: its window attention rows and relative positions
REFERENCE["cascade_mask_rcnn_vit_base_1x_coco.yaml"] += [("use_rel_pos", True, VITDET)]

# (recipe, key): (our value, the flag that gives the reference's) -- explained in README.md's detection section
DELIBERATE = {
    ("cascade_mask_rcnn_vit_base_1x_coco.yaml", "window_size"): (14, "--window_size 0"),
    ("mask_rcnn_vit_base_3x_coco.yaml", "train_aug"): ("detr_ms", "--train_aug lsj"),
}

ROWS = [(recipe, key, value, source) for recipe, rows in REFERENCE.items() for key, value, source in rows]


def test_every_detection_coco_recipe_has_a_reference_table():
    recipes = {p.name for p in DETECT.glob("*.yaml")} - {"demo.yaml", "demo_adapter.yaml"}
    assert recipes == set(REFERENCE)


@pytest.fixture(scope="module")
def resolved():
    return {name: vars(parse_args(main_detect.build_parser(), ["--config", str(DETECT / name)]))
            for name in REFERENCE}


@pytest.mark.parametrize("recipe, key, value, source", ROWS, ids=[f"{r[0][:-5]}:{r[1]}" for r in ROWS])
def test_recipe_value_is_the_references(resolved, recipe, key, value, source):
    args = resolved[recipe]
    if key not in args:
        pytest.skip(f"--{key} is not a flag of main_detect.py yet (reference: {source})")
    got = args[key]
    if isinstance(value, float):
        assert got == pytest.approx(value), f"{recipe}: {key} = {got}, {source} says {value}"
    else:
        assert got == value, f"{recipe}: {key} = {got}, {source} says {value}"


@pytest.mark.parametrize("recipe, key", sorted(DELIBERATE))
def test_deliberate_differences_are_what_the_readme_says(resolved, recipe, key):
    ours, flag = DELIBERATE[recipe, key]
    assert resolved[recipe][key] == ours
    readme = (ROOT / "README.md").read_text()
    assert flag in readme, f"README.md's detection section should name {flag} for {recipe}'s {key}"
    reference = parse_args(main_detect.build_parser(), ["--config", str(DETECT / recipe), *flag.split()])
    assert vars(reference)[key] != ours
