"""Detection input transform that pads every batch to the training square, as ViTDet does at test time.

LSJ training (ViTDet, Li et al., ECCV 2022) always feeds ``img_size`` x ``img_size`` canvases, so the ViT learns
its absolute position embedding on that token grid. torchvision's ``GeneralizedRCNNTransform`` resizes a test
image so that its longer side is ``img_size`` and pads only to a multiple of 32: a 480 x 640 COCO image becomes
768 x 1024 and the ViT sees a 48 x 64 grid, its position embedding resampled from the 64 x 64 one it trained on.
detectron2 pads every test image to the square instead: ``SimpleFeaturePyramid(square_pad=1024)``
(``detectron2/modeling/backbone/vit.py``, ``projects/ViTDet/configs/common/coco_loader_lsj.py``) gives
``padding_constraints={"square_size": 1024}`` to ``ImageList.from_tensors`` after the test mapper's
``ResizeShortestEdge(short_edge_length=1024, max_size=1024)``. ``SquarePadTransform`` does the same here.

Padding is at the bottom and right (as torchvision's), so ``image_sizes`` (the resized images' own sizes) and
``postprocess`` (boxes and masks scaled back to each original image) are unchanged.
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

__all__ = ["SquarePadTransform", "square_padded"]


class _SquarePad:
    """Mixin over a ``GeneralizedRCNNTransform`` class: every batch padded to ``square`` x ``square`` (zeros after
    normalisation, bottom / right) instead of to a multiple of 32."""

    def __init__(self, *args, square: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.square = int(square)

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        too_big = [tuple(img.shape[-2:]) for img in images if max(img.shape[-2:]) > self.square]
        if too_big:
            raise ValueError(f"images of {too_big} (after resizing) exceed the {self.square} x {self.square} square "
                             "they are padded to: resize the longer side to at most the square (max_size)")
        batch = images[0].new_zeros((len(images), images[0].shape[0], self.square, self.square))
        for canvas, img in zip(batch, images):
            canvas[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch


def square_padded(transform: type[GeneralizedRCNNTransform]) -> type[GeneralizedRCNNTransform]:
    """``transform`` (torchvision's class or a subclass of it) whose batches are padded to a square; its
    constructor takes ``square=`` besides the usual arguments."""
    if transform is GeneralizedRCNNTransform:
        return SquarePadTransform
    return type(f"SquarePad{transform.__name__}", (_SquarePad, transform), {})


class SquarePadTransform(_SquarePad, GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` (normalise, resize the longer side to ``max_size``) whose batches are always
    padded to ``square`` x ``square``."""

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform, square: int) -> "SquarePadTransform":
        """A square-padding copy of ``transform`` (same sizes, mean, std, divisibility)."""
        return cls(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                   size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
                   _skip_resize=transform._skip_resize, square=square)
