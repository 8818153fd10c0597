"""Tests of models/decoders.py: mask-token insertion against the masking permutation, LocalMIM head shapes."""
import pytest
import torch
import torch.nn as nn

from models.decoders import LocalMIMDecoder, insert_mask_tokens, prediction_head
from models.masking import random_masking


def test_insert_mask_tokens_puts_visible_tokens_back_in_place():
    x = torch.randn(3, 16, 4)
    kept, mask, ids_restore = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    cls = torch.randn(3, 1, 4)
    mask_token = torch.randn(1, 1, 4)
    out = insert_mask_tokens(torch.cat([cls, kept], dim=1), mask_token, ids_restore)
    assert out.shape == (3, 17, 4)
    assert torch.equal(out[:, 0], cls[:, 0])
    for b in range(3):
        for i in range(16):
            expected = x[b, i] if mask[b, i] == 0 else mask_token[0, 0]
            assert torch.equal(out[b, 1 + i], expected)


@pytest.mark.parametrize("scale, cells", [(8.0, 32), (4.0, 16), (2.0, 8), (1.0, 4), (0.5, 2)])
def test_localmim_decoder_output_grid(scale, cells):
    decoder = LocalMIMDecoder(in_dim=24, out_dim=27, scale=scale, grid_size=4, embed_dim=64, num_heads=2)
    latent = torch.randn(2, 1 + 4, 24)
    _, _, ids_restore = random_masking(torch.zeros(2, 16, 1), 0.75)
    assert decoder(latent, ids_restore).shape == (2, cells * cells, 27)


def test_prediction_head_layers_follow_localmim():
    kinds = [type(m).__name__ for m in prediction_head(256, 27, 4.0)]
    assert kinds == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", "Conv2d"]
    head = prediction_head(256, 27, 4.0)
    assert (head[0].out_channels, head[3].out_channels, head[4].in_channels) == (128, 64, 64)
    assert [type(m) for m in prediction_head(256, 27, 0.5)] == [nn.AvgPool2d, nn.Conv2d]
    assert [type(m) for m in prediction_head(256, 27, 1.0)] == [nn.Conv2d]
    # channels-first LayerNorm: normalizes over channels at each position
    norm = prediction_head(8, 3, 4.0)[1]
    y = norm(torch.randn(2, 4, 5, 5) * 3 + 1)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 5, 5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        prediction_head(256, 27, 3.0)
