"""Where LoRAs go on a Wan transformer: placements as anchored regexes, and the "temporal heads" selector.

Module names of ``WanTransformer3DModel`` (the same in every published size): ``blocks.N.attn1.{to_q,to_k,to_v,
to_out.0}`` (self-attention over all tokens of all frames, the only layer that mixes frames), ``blocks.N.attn2.*``
(cross-attention to the prompt) and ``blocks.N.ffn.net.{0.proj,2}``. peft ``re.fullmatch``es a string target,
so every pattern is anchored at both ends.

Where each adapter goes for each placement is the Wan row's table (``families.WAN_TARGETS``); this module reads it
(``PLACEMENTS``, ``ABSORBER``) and holds the mechanisms. Placements of the motion LoRA (rank 4 in cav):
- ``cav``: attn1 q/k/v/o of every block — all of the cross-frame path, as the UNet T-LoRA takes all temporal attention;
- ``qk``: attn1 q/k only — the attention pattern (where each token looks, e.g. along a trajectory) without the
  values, which carry what is moved (appearance);
- ``motiondirector``: attn1 q/k/v/o + the FFN (MotionDirector's temporal placement, a baseline);
- ``temporal-heads``: attn1 q/k/v/o restricted to the heads whose attention mass falls mostly across frames
  (measured on the reference clip by ``attention_mass_across_frames``, chosen by ``select_temporal_heads``:
  ``measure_temporal_heads`` does both for a run, once; enforced by ``restrict_to_heads``).
The appearance absorber (S-LoRA) is rank 1 on attn1 + attn2 of every block, trained in image mode, so its
self-attention sees one frame only.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig

from ..adapters.lora import add_lora
from ..errors import CavError
from ..families import WAN

# the Wan row's table (``families.WAN_TARGETS``: where each adapter goes for each placement), by placement name
_ROW = WAN.targets
PLACEMENTS = {name: p.temporal for name, p in _ROW.placements.items()}
ABSORBER = _ROW.placements["cav"].spatial
MOTION_RANK, MOTION_ALPHA = 4, 1.0
ABSORBER_RANK, ABSORBER_ALPHA = 1, 0.5


def target_regex(placement: str = "cav", blocks=None) -> str:
    """The peft target of a motion-LoRA ``placement`` (optionally only on the given block indices)."""
    if placement not in PLACEMENTS:
        hint = " (a DiT has no temporal convolutions)" if placement == "motiondirector+tconv" else ""
        raise CavError(f"placement '{placement}' does not exist for Wan{hint}: use one of {', '.join(PLACEMENTS)}")
    return _ROW.regex("temporal", placement, WAN.name, blocks)


def absorber_regex() -> str:
    return _ROW.block_regex() + ABSORBER


def add_motion_lora(transformer, name: str, placement: str = "cav", rank: int = MOTION_RANK,
                    alpha: float = MOTION_ALPHA, heads: dict[int, list[int]] | None = None) -> LoraConfig:
    """Inject the motion LoRA as peft adapter ``name``. ``temporal-heads`` needs ``heads`` (block → head indices,
    from ``select_temporal_heads``): only those blocks are adapted and only those heads' rows/columns train."""
    if (placement == "temporal-heads") != (heads is not None):
        raise CavError("placement temporal-heads needs measured heads (and only it takes them): measure them with "
                       "select_temporal_heads, or pick placement cav, qk or motiondirector")
    n_blocks, n_heads = len(transformer.blocks), transformer.config.num_attention_heads
    if heads is not None and any(not 0 <= b < n_blocks or any(not 0 <= h < n_heads for h in hs)
                                 for b, hs in heads.items()):
        raise CavError(f"temporal heads {heads} do not exist in this base ({n_blocks} blocks × {n_heads} heads): "
                       "measure them on this base")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                        target_modules=target_regex(placement, None if heads is None else heads.keys()))
    add_lora(transformer, name, config)
    if heads is not None:
        restrict_to_heads(transformer, name, heads)
    return config


def add_absorber_lora(transformer, name: str = "s_lora", rank: int = ABSORBER_RANK,
                      alpha: float = ABSORBER_ALPHA) -> LoraConfig:
    """The appearance absorber: rank 1 on every block's self- and cross-attention (train it in image mode)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                        target_modules=absorber_regex())
    add_lora(transformer, name, config)
    return config


def _head_mask(attn, heads, device) -> torch.Tensor:
    width = attn.inner_dim // attn.heads
    mask = torch.zeros(attn.inner_dim, device=device)
    for h in heads:
        mask[h * width:(h + 1) * width] = 1.0
    return mask


def restrict_to_heads(transformer, name: str, heads: dict[int, list[int]]):
    """Make adapter ``name`` act on the listed heads only: q/k/v LoRAs write only those heads' output rows (lora_B
    rows), the output projection's LoRA reads only their columns (lora_A columns). Other entries are zeroed and
    their gradients masked, so they stay zero through training and in every saved format. Returns
    ``mask_grads()``, which masks the ``.grad`` of those parameters again: a step whose backward ran on compute
    copies (``lean.ComputeCopies``) hands its gradients to the parameters without passing their hooks, so a stage
    runs it after each backward (``Stage.after_backward``)."""
    masked: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for b, hs in heads.items():
        attn = transformer.blocks[b].attn1
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            layer = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
            if not hasattr(layer, "lora_A") or name not in layer.lora_A:
                continue
            param = layer.lora_A[name].weight if proj == "to_out" else layer.lora_B[name].weight
            mask = _head_mask(attn, hs, param.device)
            mask = mask[None, :] if proj == "to_out" else mask[:, None]
            with torch.no_grad():
                param.mul_(mask)
            param.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype))
            masked.append((param, mask))

    def mask_grads() -> None:
        with torch.no_grad():
            for param, mask in masked:
                if param.grad is not None:
                    param.grad.mul_(mask.to(param.grad.dtype))
    return mask_grads


# ------------------------------------------------------------------------------ where each head's attention goes
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (as ``WanAttnProcessor`` applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class AttentionMassProcessor(WanAttnProcessor):
    """Self-attention computed explicitly (query chunk by chunk), recording per head the mean attention mass that
    queries put on keys of *other* frames. Returns the same output as Wan's processor."""

    def __init__(self, tokens_per_frame: int, chunk: int = 1024):
        super().__init__()
        self.tokens_per_frame, self.chunk = tokens_per_frame, chunk
        self.mass: torch.Tensor | None = None  # (batch, heads)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        n = q.shape[2]
        frame = torch.arange(n, device=q.device) // self.tokens_per_frame
        outs, across = [], torch.zeros(q.shape[:2], device=q.device)
        for start in range(0, n, self.chunk):
            qc = q[:, :, start:start + self.chunk]
            probs = ((qc.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
            other = (frame[start:start + self.chunk, None] != frame[None, :]).float()
            across += (probs * other).sum(-1).sum(-1)
            outs.append((probs @ v.float()).type_as(v))
        self.mass = across / n
        out = torch.cat(outs, dim=2).transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def attention_mass_across_frames(transformer, latents: torch.Tensor, timestep: torch.Tensor,
                                 encoder_hidden_states: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(blocks, heads): the share of each self-attention head's attention that goes to other frames, averaged over
    queries and the batch, for one forward of ``latents`` (B, C, F, H, W). Uniform attention over F frames gives
    (F − 1)/F; a head that looks only within its frame gives 0."""
    from .image_mode import tokens_per_frame

    n = tokens_per_frame(transformer, *latents.shape[3:])
    saved = [block.attn1.processor for block in transformer.blocks]
    recorders = [AttentionMassProcessor(n, chunk) for _ in transformer.blocks]
    try:
        for block, rec in zip(transformer.blocks, recorders):
            block.attn1.set_processor(rec)
        transformer(latents, timestep, encoder_hidden_states, return_dict=False)
    finally:
        for block, processor in zip(transformer.blocks, saved):
            block.attn1.set_processor(processor)
    return torch.stack([rec.mass.mean(0) for rec in recorders])


def select_temporal_heads(mass: torch.Tensor, fraction: float = 0.25) -> dict[int, list[int]]:
    """The ``fraction`` of all heads with the most cross-frame mass (at least one), as block → head indices."""
    if not 0 < fraction <= 1:
        raise CavError(f"temporal-heads fraction must be in (0, 1], got {fraction}: pass e.g. 0.25")
    count = max(1, round(fraction * mass.numel()))
    chosen = mass.flatten().topk(count).indices.tolist()
    heads: dict[int, list[int]] = {}
    for i in sorted(chosen):
        heads.setdefault(i // mass.shape[1], []).append(i % mass.shape[1])
    return heads


@torch.no_grad()
def measure_temporal_heads(transformer, inputs, fraction: float, seed: int = 0,
                           sigma: float = 0.5) -> tuple[dict[int, list[int]], torch.Tensor]:
    """Choose a run's temporal heads, once, on its clip(s): ``inputs`` is a list of (clean latents (1, C, F, h, w),
    condition (1, L, D)), one per clip. Each clip is put at ``sigma`` on the flow path (0.5: equal parts clip and
    noise; the noise drawn from a generator of its own seeded ``seed``, so the training draws stay as they are) and one forward records each head's share of attention across frames (``attention_mass_across_frames``);
    the shares are averaged over the clips and the ``fraction`` of heads with the most are chosen. Returns (block →
    heads, the (blocks, heads) shares)."""
    gen = torch.Generator().manual_seed(seed)
    masses = []
    for latents, cond in inputs:
        noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        t = torch.full((latents.shape[0],), 1000.0 * sigma, device=latents.device)
        masses.append(attention_mass_across_frames(transformer, noisy, t, cond.to(latents.dtype)))
    mass = torch.stack(masses).mean(0).cpu()
    return select_temporal_heads(mass, fraction), mass


__all__ = ["PLACEMENTS", "target_regex", "absorber_regex", "add_motion_lora", "add_absorber_lora",
           "restrict_to_heads", "AttentionMassProcessor", "attention_mass_across_frames", "select_temporal_heads",
           "measure_temporal_heads"]
