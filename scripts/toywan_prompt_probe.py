"""Does a toy Wan's transformer use its prompt?

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_prompt_probe.py FOLDER

For 4 noise latents at sigma 0.95 / 0.7 / 0.4: the relative L2 difference of the predicted velocity between prompts
differing in one word (colour, shape, motion) and between the prompt and "" (the pipeline's 512 zero-padded text
slots, as generation uses them); then, per block, the cross-attention mass that random queries put on the prompt's
real (non-padding) slots (uniform over 512 slots would be 10/512 = 0.02). The latents have the shape the pipeline
samples at its defaults (9 frames of 32 px), read from the folder's VAE and transformer configs. Prints JSON.
"""

from __future__ import annotations

import json
import sys

import torch
from diffusers import WanPipeline

PROMPT = "a red circle moving left on a navy background"
ONE_WORD_OFF = {"colour": "a blue circle moving left on a navy background",
                "shape": "a red square moving left on a navy background",
                "motion": "a red circle moving up on a navy background", "uncond": ""}


def latent_shape(pipe: WanPipeline, frames: int = 9, size: int = 32) -> tuple[int, int, int, int]:
    """(channels, latent frames, height, width) of a ``frames`` × ``size`` px clip, as ``WanPipeline`` makes it."""
    time, space = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return pipe.transformer.config.in_channels, (frames - 1) // time + 1, size // space, size // space


def probe(pipe: WanPipeline, slots: int = 512, seed: int = 0) -> dict:
    tr = pipe.transformer.eval()

    def encode(text):
        return pipe._get_t5_prompt_embeds(text, max_sequence_length=slots, device=torch.device("cpu"),
                                          dtype=torch.float32)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, *latent_shape(pipe), generator=g)
    with torch.no_grad():
        base = encode([PROMPT])
        others = {name: encode([text]) for name, text in ONE_WORD_OFF.items()}
        velocity_change = {}
        for sigma in (0.95, 0.7, 0.4):
            t = torch.full((4,), sigma * 1000.0)

            def v(e):
                return tr(hidden_states=x, timestep=t, encoder_hidden_states=e.expand(4, -1, -1), return_dict=False)[0]

            va = v(base)
            velocity_change[str(sigma)] = {name: round(float((va - v(e)).norm() / va.norm()), 4)
                                           for name, e in others.items()}
        real = int(pipe.tokenizer([PROMPT], return_tensors="pt").attention_mask.sum())
        text = tr.condition_embedder.text_embedder(base)
        masses = []
        for block in tr.blocks:  # random queries through each block's cross-attention: mass on the real slots
            attn = block.attn2
            k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
            q = attn.norm_q(attn.to_q(torch.randn(1, 64, attn.to_q.in_features, generator=g)))
            q = q.unflatten(2, (attn.heads, -1))
            weights = (torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)
            masses.append(round(float(weights[..., :real].sum(-1).mean()), 4))
    return {"velocity_change": velocity_change, "real_text_slots": real, "uniform_mass": round(real / slots, 4),
            "cross_attention_mass_on_prompt": masses}


if __name__ == "__main__":
    pipeline = WanPipeline.from_pretrained(sys.argv[1])
    print(json.dumps(probe(pipeline)))
