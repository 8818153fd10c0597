"""Tests of models/masking.py against hand examples and an independent sort of the noise."""
import pytest
import torch

from models.masking import random_masking, rescale_mask


def test_random_masking_keeps_the_smallest_noise_tokens_and_restores_order():
    batch, length, dim, ratio = 3, 16, 5, 0.75
    x = torch.randn(batch, length, dim)
    kept, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(7))
    num_keep = int(length * (1 - ratio))
    assert kept.shape == (batch, num_keep, dim)
    assert mask.dtype == torch.float32 and ids_restore.dtype == torch.long
    assert mask.sum(dim=1).tolist() == [length - num_keep] * batch
    # Independent: the same generator draw, sorted in Python, gives the kept tokens in ascending-noise order.
    noise = torch.rand(batch, length, generator=torch.Generator().manual_seed(7))
    for b in range(batch):
        order = sorted(range(length), key=lambda i: noise[b, i].item())
        assert torch.equal(kept[b], x[b, order[:num_keep]])
        assert [i for i in range(length) if mask[b, i] == 0] == sorted(order[:num_keep])
    # Gathering [kept, removed placeholders] with ids_restore puts every kept token back at its position.
    full = torch.cat([kept, torch.zeros(batch, length - num_keep, dim)], dim=1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    visible = (mask == 0).unsqueeze(-1)
    assert torch.equal(torch.where(visible, restored, 0.0), torch.where(visible, x, 0.0))
    assert torch.equal(restored[mask == 1], torch.zeros(int(mask.sum()), dim))


@pytest.mark.parametrize("length, ratio, expected", [(196, 0.75, 49), (256, 0.75, 64), (10, 0.5, 5), (7, 0.0, 7),
                                                     (9, 0.6, 3)])
def test_keep_count_is_floor(length, ratio, expected):
    kept, mask, _ = random_masking(torch.zeros(2, length, 1), ratio)
    assert kept.shape[1] == expected
    assert mask.sum().item() == 2 * (length - expected)


def test_same_seed_same_mask_and_other_seed_differs():
    x = torch.randn(4, 64, 8)
    _, m1, r1 = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    _, m2, r2 = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    _, m3, _ = random_masking(x, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    assert not torch.equal(m1, m3)


def test_given_noise_replaces_the_draw():
    x = torch.randn(3, 16, 4)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(7))
    drawn = random_masking(x, 0.75, torch.Generator().manual_seed(7))
    given = random_masking(x, 0.75, torch.Generator().manual_seed(99), noise=noise)  # the generator is unused
    assert all(torch.equal(a, b) for a, b in zip(drawn, given))
    with pytest.raises(ValueError, match="noise has shape"):
        random_masking(x, 0.75, noise=noise[:, :8])


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_invalid_ratio(ratio):
    with pytest.raises(ValueError):
        random_masking(torch.zeros(1, 4, 1), ratio)


def test_rescale_mask_upsampling_hand_example():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # grid 2: [[1, 0], [0, 1]]
    expected = torch.tensor([[1, 1, 0, 0],
                             [1, 1, 0, 0],
                             [0, 0, 1, 1],
                             [0, 0, 1, 1]], dtype=torch.float32).reshape(1, -1)
    assert torch.equal(rescale_mask(mask, 2.0, 2), expected)
    assert torch.equal(rescale_mask(mask, 1.0, 2), mask)
    up4 = rescale_mask(mask, 4, 2)
    assert up4.shape == (1, 64) and up4.reshape(8, 8)[0:4, 0:4].eq(1).all() and up4.reshape(8, 8)[0:4, 4:].eq(0).all()


def test_rescale_mask_downsampling_hand_example():
    grid = torch.tensor([[1, 0, 1, 1],
                         [0, 0, 1, 0],
                         [1, 1, 0, 1],
                         [0, 0, 0, 0]], dtype=torch.float32)
    expected = torch.tensor([[0.25, 0.75], [0.5, 0.25]]).reshape(1, -1)
    assert torch.equal(rescale_mask(grid.reshape(1, -1), 0.5, 4), expected)


@pytest.mark.parametrize("scale, grid", [(1.5, 4), (0.5, 3), (0.3, 4), (0.0, 4)])
def test_rescale_mask_rejects_bad_scales(scale, grid):
    with pytest.raises(ValueError):
        rescale_mask(torch.zeros(1, grid * grid), scale, grid)
