"""Sampling videos from a backbone: the one function used by `cav generate` and by validation samples, and the one
home of initial latents (fresh noise, the reference's noise prior, DDIM inversion, a still image's start).

Initial noise is drawn on the CPU from a seeded generator and then moved, so the same seed gives the same video
on every device, and a checkpoint's validation sample is reproduced exactly by `cav generate`.

Starting points other than fresh noise (:class:`Start`):

- **noise prior** ``A`` in [0, 1] (MotionDirector's formula): ``z_T = sqrt(A) * z_ref + sqrt(1 - A) * eps`` with
  ``eps`` the seed's fresh noise and ``z_ref`` the reference clip's latents at the first sampling timestep ``T``:
  its DDIM inversion (``invert``; MotionDirector inverts, too), else its forward-noised latents
  ``sqrt(abar_T) * z_0 + sqrt(1 - abar_T) * eps'`` with ``eps'`` a second noise of the same seed. ``A = 0`` is
  plain sampling, bit for bit. With a zero-terminal-SNR schedule (the toy model's) ``abar_T`` is ~0, so the
  forward-noised reference carries almost nothing of the clip: there only the inverted prior can steer motion.
- **inversion** alone is the noise prior 1 with ``invert`` (Tune-A-Video's start: DDIM inversion of the reference,
  empty prompt, no guidance, ``inversion_steps`` steps of ``DDIMInverseScheduler`` over the sampling schedule's
  timesteps).
- **image** at strength ``S``: a still clip of the image (every frame the image), inverted (or forward-noised) up to
  the timestep ``round(S * steps)`` steps before the end of the sampling schedule, then denoised from there with the
  prompt and the adapters (``S = 1``: from the top, ``S`` near 0: the image stays nearly as it is).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import lean
from .backbone import Backbone, check_shape
from .errors import CavError
from .prompts import check_prompts

if TYPE_CHECKING:
    from .config import SampleConfig


@dataclass(frozen=True)
class Start:
    """Initial latents (B, C, F, h, w) of a batch, at the sampling schedule's step ``skip`` (0: its first timestep)."""

    latents: torch.Tensor
    skip: int = 0


def sample_video(bb: Backbone, prompt: str, *, frames: int, size: tuple[int, int], steps: int, guidance: float,
                 seed: int, negative_prompt: str | None = None, progress: bool = False,
                 start: Start | None = None) -> np.ndarray:
    """One video as uint8 (F, H, W, 3)."""
    return sample_videos(bb, [prompt], frames=frames, size=size, steps=steps, guidance=guidance, seeds=[seed],
                         negative_prompt=negative_prompt, progress=progress, start=start)[0]


def sample_with(bb: Backbone, prompts: list[str], sample: "SampleConfig", seeds: list[int], *,
                size: tuple[int, int] | None = None, steps: int | None = None, progress: bool = False,
                start: Start | None = None) -> np.ndarray:
    """Videos made with the settings of ``sample`` (a ``config.SampleConfig``: frames, size, steps, guidance,
    negative prompt), one per (prompt, seed), as uint8 (B, F, H, W, 3). ``size`` / ``steps``: what the caller
    resolved instead (generate's default size; the estimate's timed steps)."""
    return sample_videos(bb, prompts, frames=sample.frames, size=tuple(size or sample.size),
                         steps=steps or sample.steps, guidance=sample.guidance, seeds=list(seeds),
                         negative_prompt=sample.negative_prompt, progress=progress, start=start)


def latent_shape(bb: Backbone, frames: int, size: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """(1, C, F', h, w) of one video (F' latent frames: F, or fewer for a VAE that compresses time); a size the VAE
    cannot divide is a CavError."""
    h, w = size
    f = bb.vae_factor
    if h % f or w % f:
        raise CavError(f"--size {h}x{w} is not a multiple of the VAE factor {f}: pick a size divisible by {f}")
    return (1, bb.unet.config.in_channels, bb.latents.latent_frames(bb.vae.config, frames), h // f, w // f)


def fresh_noise(shape: tuple[int, ...], seeds: list[int], stream: int = 0) -> torch.Tensor:
    """Seeded standard normal noise, one (1, ...) draw per seed on the CPU; ``stream`` k > 0 is the k-th further
    draw of the same generator (a second, independent noise of the same seed)."""
    out = []
    for s in seeds:
        gen = torch.Generator("cpu").manual_seed(int(s))
        for _ in range(stream):
            torch.randn(shape, generator=gen)
        out.append(torch.randn(shape, generator=gen))
    return torch.cat(out)


@torch.no_grad()
def sample_videos(bb: Backbone, prompts: list[str], *, frames: int, size: tuple[int, int], steps: int,
                  guidance: float, seeds: list[int], negative_prompt: str | None = None,
                  progress: bool = False, start: Start | None = None) -> np.ndarray:
    """A batch of videos, one per (prompt, seed), as uint8 (B, F, H, W, 3); from fresh noise unless ``start``."""
    h, w = size
    # the same checks as before training, against the loaded model: a sample never fails inside diffusers
    check_shape(bb.source, size, frames, unet_config=bb.unet.config, vae_config=bb.vae.config, family=bb.family)
    check_prompts(bb.tokenizer, prompts, "the prompt", reported=bb.reported)
    if negative_prompt is not None:
        check_prompts(bb.tokenizer, [negative_prompt], "--negative-prompt", reported=bb.reported)
    shape = latent_shape(bb, frames, size)
    latents = fresh_noise(shape, seeds) if start is None else start.latents
    latents = latents.to(bb.device, bb.dtype)
    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="sampling")
    negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    # nothing trains while sampling: the active LoRAs are folded into the weights (no LoRA ops or casts per step)
    # and the exact weights come back afterwards
    with warnings.catch_warnings(), lean.FrozenMerge(bb.unet, lean.live_adapters(bb.unet), bb.swaps).merged():
        warnings.simplefilter("ignore")
        if start is not None and start.skip:
            videos = _denoise_tail(bb, pipe, latents, list(prompts), steps, start.skip, guidance, negatives)
        else:
            out = pipe(**bb.prompt_inputs(pipe, prompts, guidance, negatives), num_frames=frames, height=h, width=w,
                       num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="np")
            videos = out.frames
    videos = np.asarray(videos, dtype=np.float32)
    return (np.clip(videos, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _denoise_tail(bb: Backbone, pipe, latents: torch.Tensor, prompts: list[str], steps: int, skip: int,
                  guidance: float, negatives: list[str] | None) -> np.ndarray:
    """The pipeline's own denoising loop (same prompt encoding, guidance, DDIM step and decoding), run over the
    sampling schedule from step ``skip`` on: diffusers' text-to-video pipeline always starts at the top. The prompt
    is encoded by the pipeline's own ``encode_prompt`` and handed to the UNet in the family's one-tensor form (the
    hook of ``backbone.attach_condition`` unpacks it)."""
    cfg = guidance > 1.0
    cond, uncond = bb.sampling_condition(pipe, prompts, latents.device, cfg, negatives)
    embeds = torch.cat([uncond, cond]) if cfg else cond
    sched, objective = pipe.scheduler, bb.family.objective
    sched.set_timesteps(steps, device=latents.device)
    for t in pipe.progress_bar(sched.timesteps[skip:]):
        model_in = torch.cat([latents] * 2) if cfg else latents
        pred = bb.denoiser_at(t)(model_in, objective.model_timestep(t, model_in.shape[0]), encoder_hidden_states=embeds,
                                 return_dict=False)[0]
        if cfg:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_text - pred_uncond)
        latents = _per_frame(lambda x, p: sched.step(p, t, x).prev_sample, latents, pred)
    return pipe.video_processor.postprocess_video(video=bb.decode(pipe, latents), output_type="np")


def _per_frame(step, latents: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Apply a scheduler step to (B, C, F, h, w) tensors as the pipeline does: frames folded into the batch."""
    b, c, f, h, w = latents.shape
    fold = lambda x: x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
    return step(fold(latents), fold(pred)).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


# ---------------------------------------------------------------------------------------- initial latents
@torch.no_grad()
def encode_clip(bb: Backbone, clip_u8: np.ndarray) -> torch.Tensor:
    """VAE latents (1, C, F', h, w) of a uint8 (F, H, W, 3) clip, as the base's denoiser sees them."""
    from .data.video import to_tensor

    return bb.encode_clip(to_tensor(clip_u8))


@torch.no_grad()
def vae_round_trip(bb: Backbone, clip_u8: np.ndarray) -> np.ndarray:
    """A uint8 (F, H, W, 3) clip encoded by the base's VAE and decoded as the pipeline decodes a sample: the most of
    that clip the base can show, so the ceiling of any adapter trained toward it (the toy demo's ``ceiling``)."""
    pipe = bb.pipeline()
    video = pipe.video_processor.postprocess_video(video=bb.decode(pipe, encode_clip(bb, clip_u8)), output_type="np")
    return (np.clip(np.asarray(video[0], dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


@torch.no_grad()
def ddim_invert(bb: Backbone, latents: torch.Tensor, steps: int, upto: int | None = None) -> torch.Tensor:
    """DDIM inversion of clean latents (B, C, F, h, w): the empty prompt, no guidance, ``DDIMInverseScheduler`` over
    ``steps`` timesteps of the sampling schedule; stops after ``upto`` of them (None: all, ending at the first
    sampling timestep). The inverse scheduler is the family objective's (DDIM inversion for DDPM bases)."""
    pipe = bb.pipeline()
    inverse = bb.family.objective.inverse(bb.scheduler.config)
    inverse.set_timesteps(steps, device=bb.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty, _ = bb.pipeline_condition(pipe, [""] * latents.shape[0], bb.device, False, None)
    x = latents.to(bb.device, bb.dtype)
    for t in inverse.timesteps[:upto]:
        pred = bb.denoiser_at(t)(x, bb.family.objective.model_timestep(t, x.shape[0]), encoder_hidden_states=empty,
                                 return_dict=False)[0]
        x = _per_frame(lambda a, p: inverse.step(p, t, a).prev_sample, x, pred)
    return x


def _forward_noised(bb: Backbone, latents: torch.Tensor, seeds: list[int], steps: int, skip: int) -> torch.Tensor:
    """Clean latents noised to the sampling schedule's step ``skip`` with each seed's second noise draw (as the
    family's objective noises)."""
    objective = bb.family.objective
    sched = objective.sampler(bb.scheduler.config)
    sched.set_timesteps(steps)
    t = sched.timesteps[skip]
    noise = fresh_noise((1, *latents.shape[1:]), seeds, stream=1)
    return objective.add_noise(sched, latents.cpu().float(), noise, t.reshape(1)).to(latents.dtype)


def noise_prior_start(bb: Backbone, reference_u8: np.ndarray, seeds: list[int], *, steps: int, prior: float,
                      invert: bool, inversion_steps: int | None = None) -> Start:
    """The reference's noise prior ``prior`` (formula in the module doc) for each seed; ``prior`` 0: fresh noise."""
    if not 0.0 <= prior <= 1.0:
        raise CavError(f"--noise-prior {prior} is invalid: pass a value in [0, 1] (0: off, 1: the reference only)")
    shape = latent_shape(bb, len(reference_u8), reference_u8.shape[1:3])
    noise = fresh_noise(shape, seeds)
    if prior == 0.0:
        return Start(noise)
    z0 = encode_clip(bb, reference_u8)
    if invert:
        ref = ddim_invert(bb, z0, inversion_steps or steps).cpu().float().expand(len(seeds), -1, -1, -1, -1)
    else:
        ref = _forward_noised(bb, z0.expand(len(seeds), -1, -1, -1, -1), seeds, steps, 0)
    return Start(math.sqrt(prior) * ref.float() + math.sqrt(1.0 - prior) * noise)


def image_start(bb: Backbone, image_u8: np.ndarray, frames: int, seeds: list[int], *, steps: int, strength: float,
                invert: bool) -> Start:
    """A still clip of ``image_u8`` (H, W, 3) taken back ``round(strength * steps)`` sampling steps: DDIM-inverted
    along the sampling schedule (``invert``) or forward-noised with each seed's second noise draw."""
    if not 0.0 < strength <= 1.0:
        raise CavError(f"--strength {strength} is invalid: pass a value in (0, 1] (the share of the sampling "
                       "schedule re-run from the image; 1: from pure noise)")
    n = max(1, round(strength * steps))
    skip = steps - n
    z0 = encode_clip(bb, np.repeat(image_u8[None], frames, axis=0)).expand(len(seeds), -1, -1, -1, -1)
    if invert:
        return Start(ddim_invert(bb, z0, steps, upto=n).cpu(), skip)
    return Start(_forward_noised(bb, z0, seeds, steps, skip), skip)
