"""Sampling videos from a backbone: the one function used by `cav generate` and by validation samples.

Initial noise is drawn on the CPU from a seeded generator and then moved, so the same seed gives the same video
on every device, and a checkpoint's validation sample is reproduced exactly by `cav generate`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .backbone import Backbone, check_shape
from .prompts import check_prompts


def sample_video(bb: Backbone, prompt: str, *, frames: int, size: tuple[int, int], steps: int, guidance: float,
                 seed: int, negative_prompt: str | None = None, progress: bool = False) -> np.ndarray:
    """One video as uint8 (F, H, W, 3)."""
    return sample_videos(bb, [prompt], frames=frames, size=size, steps=steps, guidance=guidance, seeds=[seed],
                         negative_prompt=negative_prompt, progress=progress)[0]


@torch.no_grad()
def sample_videos(bb: Backbone, prompts: list[str], *, frames: int, size: tuple[int, int], steps: int,
                  guidance: float, seeds: list[int], negative_prompt: str | None = None,
                  progress: bool = False) -> np.ndarray:
    """A batch of videos, one per (prompt, seed), as uint8 (B, F, H, W, 3)."""
    h, w = size
    f = bb.vae_factor
    # the same checks as before training, against the loaded model: a sample never fails inside diffusers
    check_shape(bb.source, size, frames, unet_config=bb.unet.config, vae_config=bb.vae.config)
    check_prompts(bb.tokenizer, prompts, "the prompt", reported=bb.reported)
    if negative_prompt is not None:
        check_prompts(bb.tokenizer, [negative_prompt], "--negative-prompt", reported=bb.reported)
    shape = (1, bb.unet.config.in_channels, frames, h // f, w // f)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])
    latents = latents.to(bb.device, bb.dtype)
    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="sampling")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(list(prompts), num_frames=frames, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                   negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts), latents=latents, output_type="np")
    videos = np.asarray(out.frames, dtype=np.float32)
    return (np.clip(videos, 0.0, 1.0) * 255.0).round().astype(np.uint8)
