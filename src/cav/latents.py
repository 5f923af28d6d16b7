"""Between pixels and the latents a family's denoiser sees: one class per kind of VAE (a family's row holds one:
``families.Family.latents``); ``Backbone.encode_frames`` / ``encode_clip`` / ``decode`` and the shape checks ask it.

``FrameLatents`` (UNet3D, AnimateDiff): a 2-D VAE applied to each frame, latents scaled by its ``scaling_factor``,
one latent frame per frame; the spatial factor is 2 per VAE block after the first. Wan's causal video VAE
(4× temporal compression, per-channel normalisation) is ``cav.wan.family.WanLatents``.
"""

from __future__ import annotations

import torch


class FrameLatents:
    """A 2-D VAE frame by frame (the latents a UNet video model is trained on)."""

    @staticmethod
    def spatial_factor(vae_config) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @staticmethod
    def latent_frames(vae_config, frames: int) -> int:
        return frames

    @torch.no_grad()
    def encode_frames(self, bb, frames: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """VAE latents (N, C, h, w) of frames (N, 3, H, W) in [-1, 1], scaled by the VAE's scaling factor."""
        out = []
        for i in range(0, frames.shape[0], chunk):
            x = frames[i:i + chunk].to(bb.vae.device, bb.vae.dtype)
            out.append(bb.vae.encode(x).latent_dist.mode() * bb.vae_scale)
        return torch.cat(out).to(bb.device, bb.dtype)

    def encode_clip(self, bb, frames: torch.Tensor) -> torch.Tensor:
        """Latents (1, C, F, h, w) of a clip (F, 3, H, W) in [-1, 1]: its frames' latents, in order. (The view is
        made as sampling always made it: a UNet folds (B, F) into one dimension by a view or a copy depending on the
        strides, and the two take different convolution paths, so a different view changes the video's last bits.)"""
        return self.encode_frames(bb, frames).unsqueeze(0).permute(0, 2, 1, 3, 4)

    @staticmethod
    def decode(bb, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, h, w) → the video tensor the pipeline's video processor takes (its own decoding)."""
        return pipe.decode_latents(latents)

    @staticmethod
    def check_shape(base, size, frames: int, model_config, vae_config, motion_adapter=None) -> None:
        from .backbone import check_unet_shape

        check_unet_shape(base, size, frames, model_config, vae_config, motion_adapter)

    def default_size(self, bb) -> tuple[int, int]:
        """What the pipelines sample at by default: the UNet's ``sample_size`` times the VAE's factor."""
        s = int(bb.unet.config.sample_size) * bb.vae_factor
        return (s, s)


FRAMES = FrameLatents()
