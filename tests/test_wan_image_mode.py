"""Wan image mode: frames folded into the batch = each frame alone = the whole clip under a frame-local mask."""

import pytest
import torch

from cav.wan.image_mode import fold_frames, frame_local, image_mode_forward, unfold_frames
from cav.wan.latents import decode, encode_frames, encode_video
from cav.wan.tiny import TinyWanSpec, build_components, build_transformer

SPEC = TinyWanSpec()


@pytest.fixture(scope="module")
def wan():
    return build_transformer(SPEC).eval()


def _inputs(batch=2, frames=3, size=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, SPEC.z_dim, frames, size, size, generator=g)
    ctx = torch.randn(batch, 8, SPEC.text_dim, generator=g)
    return x, torch.tensor([700, 300]), ctx


def test_fold_unfold_roundtrip():
    x = torch.randn(2, 4, 5, 3, 3)
    folded = fold_frames(x)
    assert folded.shape == (10, 4, 1, 3, 3)
    assert torch.equal(folded[1 * 5 + 3, :, 0], x[1, :, 3])
    assert torch.equal(unfold_frames(folded, 5), x)


@torch.no_grad()
def test_image_mode_equals_each_frame_alone_and_frame_local_mask(wan):
    x, ts, ctx = _inputs()
    folded = image_mode_forward(wan, x, ts, ctx)
    per_frame = torch.stack([
        torch.cat([wan(x[b:b + 1, :, f:f + 1], ts[b:b + 1], ctx[b:b + 1], return_dict=False)[0]
                   for f in range(x.shape[2])], dim=2)[0]
        for b in range(x.shape[0])])
    with frame_local(wan, *x.shape[2:]):
        masked = wan(x, ts, ctx, return_dict=False)[0]
    full = wan(x, ts, ctx, return_dict=False)[0]
    assert folded.shape == x.shape
    assert (folded - per_frame).abs().max() < 1e-5
    assert (folded - masked).abs().max() < 1e-5
    assert (folded - full).abs().max() > 1e-2  # the full clip really mixes frames: the check is not vacuous
    assert type(wan.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"  # frame_local restored the processor


@torch.no_grad()
def test_image_mode_takes_per_token_timesteps(wan):
    """Wan 2.2 TI2V passes one timestep per token (B, F·n): folded per frame, it matches per-clip timesteps."""
    x, ts, ctx = _inputs()
    n = (x.shape[3] // 2) * (x.shape[4] // 2)
    per_token = ts[:, None].expand(-1, x.shape[2] * n)
    assert torch.allclose(image_mode_forward(wan, x, per_token, ctx), image_mode_forward(wan, x, ts, ctx), atol=1e-6)


@torch.no_grad()
def test_encode_frames_encodes_each_frame_as_a_first_frame():
    vae = build_components(SPEC)["vae"].eval()
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    frames = encode_frames(vae, video)
    clip = encode_video(vae, video)
    assert frames.shape == (1, SPEC.z_dim, 5, 2, 2) and clip.shape == (1, SPEC.z_dim, 2, 2, 2)
    alone = encode_video(vae, video[:, :, 3:4])
    assert torch.allclose(frames[:, :, 3:4], alone, atol=1e-6)
    assert torch.allclose(frames[:, :, 0], clip[:, :, 0], atol=1e-6)  # the causal VAE's first latent = frame 0 alone
    assert decode(vae, frames[:, :, :1]).shape == (1, 3, 1, 16, 16)
