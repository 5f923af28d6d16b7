"""Tests for cav.data.frames: random patch crops and frame shuffling for the appearance absorbers."""

from __future__ import annotations

import pytest
import torch

from cav.data.frames import random_patch_crop, shuffle_frames
from cav.errors import CavError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ramp(n: int = 8, c: int = 3, h: int = 24, w: int = 32) -> torch.Tensor:
    """Frames whose value at column x is x / (w - 1): a crop's width shows up as the range of values."""
    return torch.linspace(0, 1, w).expand(n, c, h, w).clone()


def test_same_seed_same_output_and_shape() -> None:
    frames = torch.randn(6, 4, 16, 16)  # latents
    a = random_patch_crop(frames, gen(1))
    assert a.shape == frames.shape and a.dtype == frames.dtype
    assert torch.equal(a, random_patch_crop(frames, gen(1)))
    assert not torch.equal(a, random_patch_crop(frames, gen(2)))


def test_frames_get_different_crops() -> None:
    out = random_patch_crop(torch.rand(1, 3, 32, 32).expand(8, 3, 32, 32), gen(3))
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    assert all(not torch.allclose(out[i], out[j]) for i, j in pairs)


def test_identity_at_full_ratio() -> None:
    frames = torch.rand(5, 3, 20, 28)
    torch.testing.assert_close(random_patch_crop(frames, gen(), ratio=(1.0, 1.0)), frames, atol=1e-6, rtol=0)


def test_values_stay_in_range_and_crop_size_follows_ratio() -> None:
    frames = ramp()
    for ratio in [(0.33, 0.67), (0.5, 0.5), (0.2, 0.3)]:
        out = random_patch_crop(frames, gen(4), ratio=ratio)
        assert out.min() >= frames.min() - 1e-6 and out.max() <= frames.max() + 1e-6
        spans = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))  # visible fraction of the ramp per frame
        assert (spans <= ratio[1] + 0.05).all() and (spans >= ratio[0] - 0.1).all()
    half = random_patch_crop(frames, gen(5), ratio=(0.5, 0.5))
    # a 16-column window resized to 32 columns: its first value is the window's left edge
    assert all(round(v * 31) in range(0, 17) for v in half[:, 0, 0, 0].tolist())


def test_crop_uses_only_the_generator() -> None:
    frames = torch.rand(4, 3, 16, 16)
    torch.manual_seed(0)
    a = random_patch_crop(frames, gen(7))
    torch.manual_seed(123)
    assert torch.equal(a, random_patch_crop(frames, gen(7)))


@pytest.mark.parametrize("ratio", [(0.0, 0.5), (0.6, 0.5), (0.5, 1.2), (-0.1, 0.3)])
def test_invalid_ratio(ratio: tuple[float, float]) -> None:
    with pytest.raises(CavError, match="ratio"):
        random_patch_crop(torch.rand(2, 3, 8, 8), gen(), ratio=ratio)


def test_shuffle_frames() -> None:
    perm = shuffle_frames(16, gen(9))
    assert sorted(perm.tolist()) == list(range(16))
    assert torch.equal(perm, shuffle_frames(16, gen(9)))
    assert not torch.equal(perm, torch.arange(16))
