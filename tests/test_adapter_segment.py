"""ViT-Adapter (models/adapter.py): the segmentation form of the outputs, LayerScale in the DeiT rows, level_embed
without weight decay. References: czczup/ViT-Adapter ``segmentation/mmseg_custom/models/backbones/vit_adapter.py``
(interaction i's ViT tokens to level i), ``detection/mmdet_custom/models/backbones/vit_adapter.py`` (the last
interaction's tokens everywhere), ``*/backbones/base/vit.py`` (``layer_scale=True`` by default, gammas of ones) and
``detection/configs/mask_rcnn/mask_rcnn_deit_adapter_base_fpn_3x_coco.py`` (``'level_embed': dict(decay_mult=0.)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.adapter import ViTAdapter, create_adapter
from util.param_groups import param_groups

TINY = dict(embed_dim=32, depth=4, num_heads=2, deform_num_heads=2, n_points=2, conv_inplane=8, img_size=64,
            interaction_indexes=[(0, 0), (1, 1), (2, 2), (3, 3)])


def _hand_composed(model: ViTAdapter, x: torch.Tensor, per_interaction: bool) -> list[torch.Tensor]:
    """The reference's output: (c1 + up(c2), c2, c3, c4) + resized ViT tokens, each through its BatchNorm."""
    outs, c, c1, (h, w) = model.forward_interactions(x)
    b, d, prefix = x.shape[0], model.embed_dim, model.vit.num_prefix_tokens
    grids = [o[:, prefix:].transpose(1, 2).reshape(b, d, h, w) for o in outs]
    n2, n3 = 4 * h * w, h * w
    c2 = c[:, :n2].transpose(1, 2).reshape(b, d, 2 * h, 2 * w)
    c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(b, d, h, w)
    c4 = c[:, n2 + n3:].transpose(1, 2).reshape(b, d, h // 2, w // 2)
    x1, x2, x3, x4 = grids if per_interaction else [grids[-1]] * 4
    up = lambda t, s: F.interpolate(t, scale_factor=s, mode="bilinear", align_corners=False)  # noqa: E731
    feats = [model.up(c2) + c1 + up(x1, 4), c2 + up(x2, 2), c3 + x3, c4 + up(x4, 0.5)]
    return [norm(f) for norm, f in zip(model.norms, feats)]


def test_segmentation_form_adds_interaction_i_tokens_to_level_i():
    torch.manual_seed(0)
    seg = ViTAdapter(**TINY, init_values=0.5, vit_feature_per_interaction=True).eval()
    det = ViTAdapter(**TINY, init_values=0.5).eval()
    det.load_state_dict(seg.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got_seg, got_det = list(seg(x).values()), list(det(x).values())
        want_seg, want_det = _hand_composed(seg, x, True), _hand_composed(det, x, False)
    for a, b in zip(got_seg, want_seg):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_det, want_det):  # detection keeps the last tokens everywhere
        torch.testing.assert_close(a, b)
    assert (got_seg[0] - got_det[0]).abs().max() > 1e-3  # the two forms differ where the interactions do
    torch.testing.assert_close(got_seg[3], got_det[3])  # level 3 reads the last interaction in both


def test_deit_rows_have_layer_scale_initialised_to_one():
    with torch.device("meta"):
        model = create_adapter("adapter_base")
    assert model.layer_scale and all(hasattr(b.ls1, "gamma") and hasattr(b.ls2, "gamma") for b in model.vit.blocks)
    tiny = ViTAdapter(**TINY, layer_scale=True)
    assert all(torch.equal(b.ls1.gamma, torch.ones(32)) and torch.equal(b.ls2.gamma, torch.ones(32))
               for b in tiny.vit.blocks)


def test_level_embed_does_not_decay():
    model = ViTAdapter(**TINY)
    groups = param_groups(model, weight_decay=0.05, unit_of=model.layer_id, layer_decay=0.7,
                          num_layers=model.num_layers, no_weight_decay=model.no_weight_decay())
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay["level_embed"] == 0.0 and decay["spm.fc1.weight"] == 0.05
