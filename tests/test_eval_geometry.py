"""Evaluation sees the token grid training saw: every detector input is padded to the img_size square (ViTDet's
test-time square pad, detectron2 ``SimpleFeaturePyramid(square_pad=1024)``), so the ViT's position embedding is
never resampled between training (LSJ canvases of img_size) and evaluation; boxes come back in the original
image's coordinates."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.adapter import create_adapter
from models.detectors import IMAGENET_MEAN, IMAGENET_STD, build_detector
from models.pyramid import ViTFeaturePyramid

IMG = 64  # training canvas (LSJ output) of these tiny detectors: a 4 x 4 token grid at patch 16
# (height, width) of test images: landscape, portrait, square, odd sizes, smaller and larger than the canvas
SHAPES = [(48, 64), (64, 48), (30, 64), (64, 17), (64, 64), (20, 20), (37, 53), (480, 640), (640, 480),
          (100, 33), (33, 100)]


def _pyramid(**kw):
    return ViTFeaturePyramid("vit_tiny_patch16", img_size=IMG, out_channels=32, extra_pool=True, depth=2, **kw)


def _adapter():
    return create_adapter("adapter_tiny", fpn_channels=32, embed_dim=32, depth=4, num_heads=2, deform_num_heads=2,
                          conv_inplane=8, img_size=IMG)


BACKBONES = {"pyramid": _pyramid, "pyramid_rel_pos": lambda: _pyramid(use_rel_pos=True), "adapter": _adapter}


def _vit(model):
    body = model.backbone
    return body.vit if hasattr(body, "vit") else body.body.vit  # the adapter sits in its FPN wrapper


def _record_grids(model):
    """Token grids (h, w) the ViT's patch embedding produces, one per forward."""
    grids = []
    _vit(model).patch_embed.proj.register_forward_hook(lambda m, i, out: grids.append(tuple(out.shape[-2:])))
    return grids


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_evaluation_runs_the_vit_on_the_training_grid(name):
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", BACKBONES[name](), 3, img_size=IMG, anchor_sizes=(8, 16, 32, 64, 128),
                           box_fc=32, proposals_per_image=50)
    grids = _record_grids(model)
    train_grid = _vit(model).patch_embed.grid_size
    assert tuple(train_grid) == (IMG // 16, IMG // 16)
    model.train()  # a training batch: LSJ canvases of IMG x IMG
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, IMG, IMG, dtype=torch.uint8)}
    target["masks"][0, 4:30, 4:40] = 1
    model([torch.rand(3, IMG, IMG)], [target])
    model.eval()
    with torch.no_grad():
        for h, w in SHAPES:
            out = model([torch.rand(3, h, w)])
            assert out[0]["masks"].shape[-2:] == (h, w)
        model([torch.rand(3, *s) for s in SHAPES[:3]])  # a mixed batch
    assert grids == [tuple(train_grid)] * (2 + len(SHAPES))


def test_the_unpadded_transform_would_resample_the_grid():
    """The check above can fail: torchvision's own padding (to a multiple of 32) gives a 30 x 64 image a 2 x 4 grid."""
    model = build_detector("mask_rcnn", _pyramid(), 3, img_size=IMG, proposals_per_image=50,
                           pad_to_square=False).eval()
    grids = _record_grids(model)
    with torch.no_grad():
        model([torch.rand(3, 30, 64)])
    assert grids == [(2, 4)]


class _FixedBox(nn.Module):
    """RPN / RoI heads stand-in: one detection at a fixed place of the padded input; records what it is given."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def forward(self, images_or_features, proposals_or_features, image_shapes=None, targets=None):
        if image_shapes is None:  # as the RPN: (images, features) -> (proposals, losses)
            self.seen["batch"] = images_or_features.tensors
            self.seen["image_sizes"] = images_or_features.image_sizes
            return [torch.zeros(1, 4)], {}
        box = torch.tensor([[10.0, 5.0, 30.0, 20.0]])
        return [{"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}], {}


def test_boxes_come_back_in_original_image_coordinates_by_hand():
    """A 48 x 128 image, img_size 64: resized by 1/2 to 24 x 64, padded at the bottom to 64 x 64. A box found at
    (10, 5, 30, 20) on the padded input is (20, 10, 60, 40) on the original image."""
    model = build_detector("mask_rcnn", _pyramid(), 3, img_size=IMG, proposals_per_image=50).eval()
    model.rpn = stub = _FixedBox()
    model.roi_heads = stub
    image = torch.rand(3, 48, 128)
    with torch.no_grad():
        out = model([image])
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[20.0, 10.0, 60.0, 40.0]]))
    assert stub.seen["image_sizes"] == [(24, 64)]  # heads clip to the image, not to the padding
    batch = stub.seen["batch"]
    assert batch.shape == (1, 3, IMG, IMG)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    want = F.interpolate(((image - mean) / std)[None], scale_factor=0.5, mode="bilinear", align_corners=False,
                         recompute_scale_factor=True)[0]
    torch.testing.assert_close(batch[0, :, :24], want)
    assert batch[0, :, 24:].abs().sum() == 0  # zeros after normalisation, as torchvision's and detectron2's pad


def test_an_image_larger_than_the_square_after_resizing_is_refused():
    from models.det_transform import SquarePadTransform
    transform = SquarePadTransform(IMG, IMG, IMAGENET_MEAN, IMAGENET_STD, square=IMG)
    with pytest.raises(ValueError, match="exceed the 64 x 64 square"):
        transform.batch_images([torch.zeros(3, 64, 96)])
