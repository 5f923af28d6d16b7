"""The paper's two stages as small builders over ``trainer.Stage``.

Stage 1 (appearance absorbers): S-LoRA and/or textual inversion on *unordered*, *patch-cropped* frames, temporal
layers bypassed (the T2V UNet acts as a T2I UNet), spatial (appearance-only) prompt. ``--absorber-mode video`` (the
ablation's control, "does image mode matter?"): the whole clip in order with one patch crop, temporal layers on.
Stage 2 (T-LoRA): temporal-attention LoRA on the whole clip with the absorbers loaded and frozen, full prompt
(textual-inversion tokens in it).
On a two-expert base both stages train the expert ``--experts`` names (``Backbone.unet``) on its own noise range
only (``Backbone.train_window``): the timesteps the pipeline hands that expert.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import lean
from .accel import offload
from .adapters import lora
from .adapters.targets import target_regex
from .adapters.textual_inversion import TextualInversion
from .backbone import Backbone
from .config import TrainConfig
from .data.frames import random_patch_crop
from .prompts import check_prompt
from .trainer import Stage

S_LORA, T_LORA = "s_lora", "t_lora"


def encode_prompt(bb: Backbone, prompt: str, grad: bool = False) -> torch.Tensor:
    """``Backbone.encode_prompt`` (the family's text condition of ``prompt``), under the stages' name."""
    return bb.encode_prompt(prompt, grad)


def encode_frames(bb: Backbone, frames: torch.Tensor) -> torch.Tensor:
    """``Backbone.encode_frames`` (latents (N, C, h, w) of independent frames), under the stages' name."""
    return bb.encode_frames(frames)


@dataclass
class ClipInputs:
    """One reference clip of stage 2 with its own absorbers: frames (F, 3, H, W) in [-1, 1], its textual inversion
    (or None) and the name of its S-LoRA adapter (or None)."""

    frames: torch.Tensor
    ti: TextualInversion | None
    s_lora: str | None


def s_lora_name(index: int) -> str:
    """Adapter name of the S-LoRA of the run's clip number ``index`` (from 0): ``s_lora`` for the first (as for one
    clip), ``s_lora_K`` after."""
    return S_LORA if index == 0 else f"{S_LORA}_{index}"


def make_textual_inversion(bb: Backbone, cfg: TrainConfig, index: int = 0) -> TextualInversion:
    """Clip ``index``'s textual-inversion absorber, the condition's own (``condition.ti``): new tokens in the base's
    text encoder(s) (Wan: prompt vectors in umT5's output); the first clip's from ``--ti-from``'s file when given."""
    return bb.condition.ti.new(bb, cfg, index)


def given_absorbers(bb: Backbone, cfg: TrainConfig) -> None:
    """Stage 1 replaced by existing appearance work: ``--s-lora-from``'s image LoRA becomes the frozen S-LoRA (a
    bypassed UNet is its image model, so an image LoRA of that model absorbs appearance as it stands)."""
    if cfg.absorbers.s_lora_from:
        bb.family.image_lora(bb.unet, cfg.absorbers.s_lora_from, S_LORA, bb.family)
        lora.place(bb.unet, S_LORA, bb.device)  # beside the blocks' resting weights when they are swapped


def absorber_stage(bb: Backbone, cfg: TrainConfig, frames: torch.Tensor, ti: TextualInversion | None,
                   checkpoint: Callable | None = None, *, s_lora: str = S_LORA, prompt: str | None = None) -> Stage:
    """Stage 1 over one clip's frames (F, 3, H, W) in [-1, 1] with that clip's own absorbers: its S-LoRA (adapter
    ``s_lora``; the other clips' inactive), its TI and its spatial ``prompt`` (None: the first clip's); ``checkpoint``
    is the callback ``Stage.checkpoint`` describes. Its step is lean for the S-LoRA (``lean.LeanStep``)."""
    groups, after_backward, after_step = [], [], []
    if cfg.absorbers.uses_s_lora:
        lora.add_lora(bb.unet, s_lora, cfg.lora_config("spatial", bb.family), device=bb.device)
        lora.activate(bb.unet, [s_lora], trainable=s_lora)
        groups.append({"params": lora.lora_parameters(bb.unet, s_lora), "lr": cfg.absorbers.s_lora_lr, "name": s_lora})
    prompt = cfg.spatial_prompt_of(0) if prompt is None else prompt
    if ti is not None:
        prompt = ti.expand(prompt)
        groups.append({"params": ti.trainable(), "lr": cfg.absorbers.ti_lr, "name": "textual_inversion"})
        after_backward.append(ti.mask_grad)
        after_step.append(ti.restore_rows)
    check_prompt(bb.tokenizer, prompt, "the absorbers' prompt", warn=False)  # a cut placeholder would learn nothing
    cached_cond = None if ti is not None else encode_prompt(bb, prompt)
    n = min(cfg.absorbers.batch, frames.shape[0])

    video = cfg.absorbers.mode == "video"

    def batch(gen: torch.Generator):
        if video:  # the whole clip in order, one patch crop (same window) for all its frames
            f, c, h, w = frames.shape
            crop = random_patch_crop(frames.reshape(1, f * c, h, w), gen, tuple(cfg.absorbers.crop_ratio)).reshape(f, c, h, w)
            latents, k = bb.encode_clip(crop), 1  # (1, C, F', h, w): one video
        else:
            idx = torch.randint(0, frames.shape[0], (n,), generator=gen)  # unordered frames
            crops = random_patch_crop(frames[idx], gen, tuple(cfg.absorbers.crop_ratio))
            latents, k = encode_frames(bb, crops).unsqueeze(2), n  # (n, C, 1, h, w): n independent images
        cond = cached_cond if cached_cond is not None else ti.encode(bb, prompt, grad=True)
        return latents, cond.expand(k, -1, -1)

    # the fused forward of the S-LoRA this clip trains; TI alone: the plain step
    step = lean.LeanStep(bb.unet, s_lora, lean.autocast_dtype(bb.device, bb.dtype)) if cfg.absorbers.uses_s_lora else None
    return Stage("absorbers", cfg.absorbers.steps, groups, batch, bb.family.objective,
                 None if video else bb.family.image_mode,  # video: temporal layers / full attention on
                 timesteps=bb.train_window(None), after_backward=after_backward, after_step=after_step, checkpoint=checkpoint,
                 checkpoint_every=cfg.checkpoint_every, forward_backward_context=step or contextlib.nullcontext)


def _clip_inputs(bb: Backbone, cfg: TrainConfig, clips: list[ClipInputs]):
    """(prompts, encode): each clip's prompt as the T-LoRA trains on it (its TI tokens in it, checked against the
    tokenizer) and ``encode(k)`` → clip ``k``'s (latents (1, C, F', h, w), condition (1, L, D))."""
    for c in clips:
        if c.ti is not None:
            c.ti.freeze()
    prompts = [c.ti.expand(cfg.prompt) if c.ti is not None else cfg.prompt for c in clips]
    for p in prompts:
        check_prompt(bb.tokenizer, p, "--prompt", warn=False)  # cut placeholders: refused (preflight warned of cuts)

    def encode(k: int):
        ti = clips[k].ti  # its absorber encodes its prompt (TI: the tokens' rows; Wan: vectors after the prompt)
        cond = ti.encode(bb, prompts[k]) if ti is not None else encode_prompt(bb, prompts[k])
        return bb.encode_clip(clips[k].frames), cond  # (1, C, F', h, w), (1, L, D)
    return prompts, encode


def t_lora_config(bb: Backbone, cfg: TrainConfig, heads: dict | None = None):
    """The T-LoRA's peft config: the recipe's (``TrainConfig.lora_config``), on the blocks of ``heads`` only when
    the placement cuts it to measured heads."""
    config = cfg.lora_config("temporal", bb.family)
    if heads is not None:
        config.target_modules = target_regex("temporal", cfg.motion.placement, bb.family, list(heads))
    return config


def measure_heads(bb: Backbone, cfg: TrainConfig, clips: list[ClipInputs]) -> tuple[dict, list]:
    """The heads a placement that cuts the T-LoRA to measured heads (the row's ``targets.heads``: Wan's
    ``temporal-heads``) trains, measured once on the run's clips, each with its own absorbers on, before the T-LoRA
    exists (``targets.measure_heads``; its noise comes from a generator of its own, so the run's draws are
    untouched), at the middle of the timesteps the T-LoRA trains on (``--t-lora-timesteps`` within the trained
    expert's range: 500 of 1000 by default, σ = 0.5). Returns (block → heads, the (blocks, heads) shares of attention across frames, as lists)."""
    _, encode = _clip_inputs(bb, cfg, clips)

    def inputs():  # consumed one clip at a time: each clip's S-LoRA on while its own forward runs
        for k, clip in enumerate(clips):
            if clip.s_lora:
                lora.activate(bb.unet, [clip.s_lora])
            yield encode(k)

    lo, hi = bb.train_window(tuple(int(t) for t in cfg.motion.timesteps)) or (0, 1000)
    total = int(bb.scheduler.config.num_train_timesteps)
    sigma = min(lo + hi, 2 * total) / (2 * total)  # the middle of the timesteps the T-LoRA trains on (its expert's)
    heads, mass = bb.family.targets.measure_heads(bb.unet, inputs(), cfg.motion.placement, cfg.seed, sigma)
    return heads, mass.tolist()


def t_lora_stage(bb: Backbone, cfg: TrainConfig, frames: torch.Tensor, ti: TextualInversion | None,
                 checkpoint: Callable | None = None, clips: list[ClipInputs] | None = None,
                 heads: dict | None = None) -> Stage:
    """Stage 2 over the whole clip (F, 3, H, W) in [-1, 1]; absorbers (if any) active and frozen; its step is lean
    for the T-LoRA (``lean.LeanStep``). ``heads`` (block → head indices, ``measure_heads``): the T-LoRA is on those
    blocks only and trains those heads' rows only (a placement whose row cuts it to measured heads).

    With ``clips`` (several references of one motion) each step draws one clip from the generator and trains the one
    T-LoRA on it with that clip's own absorbers active (its S-LoRA, its TI tokens in the prompt) and no other's.
    """
    clips = clips or [ClipInputs(frames, ti, S_LORA if cfg.absorbers.uses_s_lora else None)]
    prompts, encode = _clip_inputs(bb, cfg, clips)
    lora.add_lora(bb.unet, T_LORA, t_lora_config(bb, cfg, heads), device=bb.device)
    after_backward = [bb.family.targets.restrict(bb.unet, T_LORA, heads)] if heads is not None else []
    lora.activate(bb.unet, active_adapters(clips[0]), trainable=T_LORA)

    # the condition guidance's unconditional branch sees at sampling (the empty prompt's; zeros for SDXL)
    empty = bb.condition.unconditional(bb) if cfg.motion.prompt_dropout > 0 else None
    if cfg.system.cache_inputs:  # encode the clips and their prompts once, reuse them every step
        cached = [encode(k) for k in range(len(clips))]
        if cfg.system.offload_frozen:
            offload(bb.vae, *bb.text_encoders)

    def batch(gen: torch.Generator):
        k = 0
        if len(clips) > 1:  # one clip per step, its own absorbers on (one clip: no draw, the run is as before)
            k = int(torch.randint(len(clips), (1,), generator=gen))
            lora.activate(bb.unet, active_adapters(clips[k]), trainable=T_LORA)
        latents, cond = cached[k] if cfg.system.cache_inputs else encode(k)
        n = cfg.motion.batch  # copies of the clip, each with its own noise and timestep in diffusion_loss
        latents, cond = latents.expand(n, *latents.shape[1:]), cond.expand(n, *cond.shape[1:])
        if empty is not None:  # the unconditional branch of guidance learns the motion too
            drop = (torch.rand(n, generator=gen) < cfg.motion.prompt_dropout).to(cond.device)
            cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        return latents, cond

    groups = [{"params": lora.lora_parameters(bb.unet, T_LORA), "lr": cfg.motion.lr, "name": T_LORA}]
    return Stage("t_lora", cfg.motion.steps, groups, batch, bb.family.objective,
                 timesteps=bb.train_window(tuple(int(t) for t in cfg.motion.timesteps)), checkpoint=checkpoint,
                 checkpoint_every=cfg.checkpoint_every, after_backward=after_backward,
                 forward_backward_context=lean.LeanStep(bb.unet, T_LORA, lean.autocast_dtype(bb.device, bb.dtype)),
                 frame_diff_loss=cfg.motion.frame_diff_loss)


def active_adapters(clip: ClipInputs) -> list[str]:
    """What is on while the T-LoRA trains on ``clip``: its S-LoRA (if any) and the T-LoRA."""
    return ([clip.s_lora] if clip.s_lora else []) + [T_LORA]
