"""Image mode for Wan: the video DiT run as an image model (the paper's "temporal layers bypassed").

In a Wan block, self-attention (``attn1``) is the only operation that mixes tokens of different frames: the FFN,
the cross-attention to the prompt and the timestep modulation act on each token alone. So removing the temporal
path means restricting ``attn1`` to tokens of the same frame. Wan's positions are rotary (RoPE), so an attention
score depends only on the *difference* of two tokens' (t, h, w) positions; inside one frame the time offset is 0
whichever frame it is. Hence running each frame as its own 1-frame video gives exactly what the whole clip gives
under a frame-local attention mask (``/work/shared/probes/wan_framelocal.py``; ``tests/test_wan_image_mode.py``).

``image_mode_forward`` folds the frames into the batch (cheaper than a masked full-length attention: f
sequences of n tokens instead of one of f·n); ``frame_local`` installs the masked processor, for checks and for
measuring what a block does without its cross-frame attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def fold_frames(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) → (B·F, C, 1, H, W): every frame a 1-frame video (batch-major: frame f of clip b at b·F+f)."""
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, 1, h, w)


def unfold_frames(folded: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Inverse of ``fold_frames``."""
    bf, c, one, h, w = folded.shape
    return folded.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def _fold_timestep(timestep: torch.Tensor, batch: int, num_frames: int) -> torch.Tensor:
    """Per-clip timesteps (B,) repeat per frame; Wan 2.2 TI2V's per-token timesteps (B, F·n) split per frame."""
    timestep = torch.as_tensor(timestep)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.ndim == 1:
        return timestep.repeat_interleave(num_frames)
    return timestep.reshape(batch * num_frames, timestep.shape[1] // num_frames)


def image_mode_forward(transformer, latents: torch.Tensor, timestep: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The transformer's velocity for ``latents`` (B, C, F, H, W) with every frame seen alone (frames folded into
    the batch, the prompt repeated per frame). Same shape as a normal forward."""
    if transformer.config.patch_size[0] != 1:
        raise ValueError("image mode needs a temporal patch size of 1 (every published Wan has 1)")
    b, _, f = latents.shape[:3]
    out = transformer(hidden_states=fold_frames(latents), timestep=_fold_timestep(timestep, b, f),
                      encoder_hidden_states=encoder_hidden_states.repeat_interleave(f, dim=0),
                      return_dict=False, **kwargs)[0]
    return unfold_frames(out, f)


def frame_local_mask(num_frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """(N, N) boolean SDPA mask over Wan's frame-major token order: True where query and key share a frame."""
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return frame[:, None] == frame[None, :]


class FrameLocalProcessor(WanAttnProcessor):
    """Wan's own attention processor with a fixed self-attention mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.mask.to(hidden_states.device)[None, None]
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def tokens_per_frame(transformer, height: int, width: int) -> int:
    """Patch tokens in one latent frame of size ``height`` × ``width``."""
    _, ph, pw = transformer.config.patch_size
    return (height // ph) * (width // pw)


@contextmanager
def frame_local(transformer, num_frames: int, height: int, width: int):
    """Within the block, every ``attn1`` of ``transformer`` attends only inside each frame (latent sizes given)."""
    mask = frame_local_mask(num_frames, tokens_per_frame(transformer, height, width))
    saved = [block.attn1.processor for block in transformer.blocks]
    try:
        for block in transformer.blocks:
            block.attn1.set_processor(FrameLocalProcessor(mask))
        yield transformer
    finally:
        for block, processor in zip(transformer.blocks, saved):
            block.attn1.set_processor(processor)


__all__ = ["fold_frames", "unfold_frames", "image_mode_forward", "frame_local_mask", "FrameLocalProcessor",
           "tokens_per_frame", "frame_local"]
