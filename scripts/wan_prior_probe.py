"""Probe (docs/DEMO-TUNING.md, "Issue 24"): DreamBooth-style prior preservation for the toy Wan's T-LoRA, not a cav
option. Before the T-LoRA stage the base (no adapter on) samples PRIOR_K clips, as latents, of toy prompts with
random appearances and seen motions; every T-LoRA step then adds PRIOR_M of them, with their own prompts, to the
reference's batch, so the adapter is trained to leave the base's prompt → appearance mapping alone. Prints a PRIOR
line, then scores as scripts/wan_demo_sweep.py does (same arguments and env):

    PRIOR_K=8 PRIOR_M=1 OMP_NUM_THREADS=1 PYTHONPATH=src \
        python scripts/wan_prior_probe.py OUT '{"seed": 0}' 100 0.75,1.0 1.0
"""
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

import cav.run as run_mod
from cav import stages, textcache
from cav.adapters import lora
from cav.data import toyworld as tw
from cav.sampling import fresh_noise, latent_shape

K, M = int(os.environ.get("PRIOR_K", "8")), int(os.environ.get("PRIOR_M", "1"))
t_lora_stage, run_texts = run_mod.t_lora_stage, textcache.run_texts


def prior_prompts(seed: int) -> list[str]:
    return [tw.caption(s)[0] for s in tw.sample_specs(np.random.default_rng(1000 + seed), K)]


def with_prior(bb, cfg, frames, ti, checkpoint=None, clips=None, heads=None):
    lora.activate(bb.unet, [])
    prompts = prior_prompts(cfg.seed)
    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    noise = fresh_noise(latent_shape(bb, cfg.data.frames, tuple(cfg.data.size)), list(range(K)))
    with torch.no_grad():
        latents = pipe(**bb.prompt_inputs(pipe, prompts, cfg.validation.guidance, None), num_frames=cfg.data.frames,
                       height=cfg.data.size[0], width=cfg.data.size[1], num_inference_steps=cfg.validation.steps,
                       guidance_scale=cfg.validation.guidance, latents=noise.to(bb.device, bb.dtype),
                       output_type="latent").frames
        conds = torch.cat([stages.encode_prompt(bb, p) for p in prompts])
    print("PRIOR clips", K, "per step", M, "latents", list(latents.shape), flush=True)
    stage = t_lora_stage(bb, cfg, frames, ti, checkpoint, clips=clips, heads=heads)
    reference_batch = stage.batch

    def batch(gen: torch.Generator):
        x, cond = reference_batch(gen)
        pick = torch.randint(K, (M,), generator=gen)
        return torch.cat([x, latents[pick].to(x)]), torch.cat([cond, conds[pick].to(cond)])

    stage.batch = batch
    return stage


run_mod.t_lora_stage = with_prior
textcache.run_texts = lambda cfg, clips: run_texts(cfg, clips) + prior_prompts(cfg.seed)  # encoded at the run's start
sys.argv = ["wan_demo_sweep.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).with_name("wan_demo_sweep.py")), run_name="__main__")
