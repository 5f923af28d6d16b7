"""Between pixels and Wan's normalised latents: the whole clip (causal 4× temporal compression) or each frame alone.

Wan's VAE is causal in time: latent frame 0 encodes pixel frame 0 alone, each later latent frame encodes the next
four pixel frames (so a clip has 4k+1 frames). A frame encoded on its own is read as a first frame, which is how
an image is encoded for Wan; ``encode_frames`` does that for every frame (frames folded into the batch), giving one
latent frame per pixel frame for image-mode training. Latents are normalised as the pipeline expects:
``(z - latents_mean) / latents_std`` (``WanPipeline`` undoes it before decoding).
"""

from __future__ import annotations

import torch

from .image_mode import fold_frames, unfold_frames


def _stats(vae, like: torch.Tensor):
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def normalize(vae, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return (z - mean) / std


def denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, latents)
    return latents * std + mean


def _encode(vae, video: torch.Tensor, generator=None) -> torch.Tensor:
    dist = vae.encode(video.to(vae.dtype)).latent_dist
    return dist.mode() if generator is None else dist.sample(generator)


def encode_video(vae, video: torch.Tensor, generator=None) -> torch.Tensor:
    """Video (B, 3, 4k+1, H, W) in [-1, 1] → normalised latents (B, z, k+1, H/8, W/8); the mode unless a
    ``generator`` asks for a posterior sample."""
    return normalize(vae, _encode(vae, video, generator))


def encode_frames(vae, video: torch.Tensor, generator=None) -> torch.Tensor:
    """Video (B, 3, F, H, W) → normalised latents (B, z, F, H/8, W/8), every frame encoded alone (as an image)."""
    return unfold_frames(normalize(vae, _encode(vae, fold_frames(video), generator)), video.shape[2])


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents → video in [-1, 1] (B, 3, F, H, W)."""
    return vae.decode(denormalize(vae, latents).to(vae.dtype), return_dict=False)[0]


__all__ = ["normalize", "denormalize", "encode_video", "encode_frames", "decode"]
