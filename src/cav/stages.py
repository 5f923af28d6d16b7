"""The paper's two stages as small builders over ``trainer.Stage``.

Stage 1 (appearance absorbers): S-LoRA and/or textual inversion on *unordered*, *patch-cropped* frames, temporal
layers bypassed (the T2V UNet acts as a T2I UNet), spatial (appearance-only) prompt.
Stage 2 (T-LoRA): temporal-attention LoRA on the whole clip with the absorbers loaded and frozen, full prompt
(textual-inversion tokens in it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .accel import offload
from .adapters import lora
from .adapters.image_lora import load_image_lora
from .adapters.textual_inversion import TextualInversion
from .backbone import Backbone
from .config import TrainConfig
from .data.frames import random_patch_crop
from .prompts import check_prompt
from .trainer import Stage

S_LORA, T_LORA = "s_lora", "t_lora"


def encode_prompt(bb: Backbone, prompt: str, grad: bool = False) -> torch.Tensor:
    """Text-encoder hidden states (1, L, D) of ``prompt`` (padded to the tokenizer's max length)."""
    ids = bb.tokenizer(prompt, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(bb.text_encoder.device)
    with torch.set_grad_enabled(grad):
        return bb.text_encoder(ids)[0].to(bb.device, bb.dtype)


@torch.no_grad()
def encode_frames(bb: Backbone, frames: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """VAE latents (N, C, h, w) of frames (N, 3, H, W) in [-1, 1], scaled by the VAE's scaling factor."""
    out = []
    for i in range(0, frames.shape[0], chunk):
        x = frames[i:i + chunk].to(bb.vae.device, bb.vae.dtype)
        out.append(bb.vae.encode(x).latent_dist.mode() * bb.vae_scale)
    return torch.cat(out).to(bb.device, bb.dtype)


def make_textual_inversion(bb: Backbone, cfg: TrainConfig) -> TextualInversion:
    """New tokens in the base's own text encoder: from ``--ti-from``'s embedding, else initialised from a word."""
    if cfg.ti_from:
        return TextualInversion.from_file(bb.tokenizer, bb.text_encoder, Path(cfg.ti_from), cfg.ti_token)
    return TextualInversion(bb.tokenizer, bb.text_encoder, cfg.ti_token, cfg.ti_tokens, cfg.ti_init)


def given_absorbers(bb: Backbone, cfg: TrainConfig) -> None:
    """Stage 1 replaced by existing appearance work: ``--s-lora-from``'s image LoRA becomes the frozen S-LoRA (a
    bypassed UNet is its image model, so an image LoRA of that model absorbs appearance as it stands)."""
    if cfg.s_lora_from:
        load_image_lora(bb.unet, cfg.s_lora_from, S_LORA, bb.family)


def absorber_stage(bb: Backbone, cfg: TrainConfig, frames: torch.Tensor, ti: TextualInversion | None,
                   checkpoint: Callable | None = None) -> Stage:
    """Stage 1 over frames (F, 3, H, W) in [-1, 1]; ``checkpoint`` is the callback ``Stage.checkpoint`` describes."""
    groups, after_backward, after_step = [], [], []
    if cfg.uses_s_lora:
        lora.add_lora(bb.unet, S_LORA, cfg.lora_config("spatial", bb.family))
        lora.activate(bb.unet, [S_LORA], trainable=S_LORA)
        groups.append({"params": lora.lora_parameters(bb.unet, S_LORA), "lr": cfg.s_lora_lr, "name": S_LORA})
    prompt = cfg.spatial_prompt or cfg.prompt
    if ti is not None:
        prompt = ti.expand(prompt)
        groups.append({"params": ti.trainable(), "lr": cfg.ti_lr, "name": "textual_inversion"})
        after_backward.append(ti.mask_grad)
        after_step.append(ti.restore_rows)
    check_prompt(bb.tokenizer, prompt, "the absorbers' prompt", warn=False)  # a cut placeholder would learn nothing
    cached_cond = None if ti is not None else encode_prompt(bb, prompt)
    n = min(cfg.absorber_batch, frames.shape[0])

    def batch(gen: torch.Generator):
        idx = torch.randint(0, frames.shape[0], (n,), generator=gen)  # unordered frames
        crops = random_patch_crop(frames[idx], gen, tuple(cfg.crop_ratio))
        latents = encode_frames(bb, crops).unsqueeze(2)  # (n, C, 1, h, w): n independent images
        cond = cached_cond if cached_cond is not None else encode_prompt(bb, prompt, grad=True)
        return latents, cond.expand(n, -1, -1)

    return Stage("absorbers", cfg.absorber_steps, groups, batch, bypass=True, after_backward=after_backward,
                 after_step=after_step, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every)


def t_lora_stage(bb: Backbone, cfg: TrainConfig, frames: torch.Tensor, ti: TextualInversion | None,
                 checkpoint: Callable | None = None) -> Stage:
    """Stage 2 over the whole clip (F, 3, H, W) in [-1, 1]; absorbers (if any) active and frozen."""
    if ti is not None:
        ti.freeze()
    lora.add_lora(bb.unet, T_LORA, cfg.lora_config("temporal", bb.family))
    active = ([S_LORA] if cfg.uses_s_lora else []) + [T_LORA]
    lora.activate(bb.unet, active, trainable=T_LORA)
    prompt = ti.expand(cfg.prompt) if ti is not None else cfg.prompt
    check_prompt(bb.tokenizer, prompt, "--prompt", warn=False)  # cut placeholders: refused (preflight warned of cuts)

    def encode():
        return encode_frames(bb, frames).permute(1, 0, 2, 3).unsqueeze(0), encode_prompt(bb, prompt)  # (1,C,F,h,w)

    empty = encode_prompt(bb, "") if cfg.t_lora_prompt_dropout > 0 else None
    if cfg.cache_inputs:  # encode the clip and the prompt once, reuse them every step
        cached = encode()
        if cfg.offload_frozen:
            offload(bb.vae, bb.text_encoder)

    def batch(gen: torch.Generator):
        latents, cond = cached if cfg.cache_inputs else encode()
        n = cfg.t_lora_batch  # copies of the clip, each with its own noise and timestep in diffusion_loss
        latents, cond = latents.expand(n, *latents.shape[1:]), cond.expand(n, *cond.shape[1:])
        if empty is not None:  # the unconditional branch of guidance learns the motion too
            drop = (torch.rand(n, generator=gen) < cfg.t_lora_prompt_dropout).to(cond.device)
            cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        return latents, cond

    groups = [{"params": lora.lora_parameters(bb.unet, T_LORA), "lr": cfg.t_lora_lr, "name": T_LORA}]
    return Stage("t_lora", cfg.steps, groups, batch, bypass=False, timesteps=tuple(int(t) for t in cfg.t_lora_timesteps),
                 checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every)
