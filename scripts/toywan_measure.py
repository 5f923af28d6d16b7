"""Measure the toy Wan VAE's temporal compression, 1 vs 4 (issue 24): equal-time VAE training, then the
reconstruction error of held-out toy clips, and the transformer's tokens per clip and training-step time.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_measure.py [SECONDS_PER_VAE] > numbers.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_measure.py frames   # what the stock pipeline returns
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_measure.py zdim [ROUNDS]  # a transformer step, z 16 vs 32
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_measure.py slots [ROUNDS]  # 512 padded text slots vs
                                                                                       # collapsed (cav.wan.slots)
"""

import json
import sys
import time

import numpy as np
import torch

from cav.data import toyworld as tw
from cav.toy.wan_base import (ToyWanSpec, WanRecipe, build_components, render_batch, training_specs, vae_loss,
                              vae_step_batch)
from cav.wan.flow import FlowObjective, transformer_loss


def vae_run(temporal: int, seconds: float, recipe: WanRecipe) -> dict:
    comps = build_components(ToyWanSpec(temporal=temporal), recipe.seed)
    vae = comps["vae"]
    specs = training_specs(recipe)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    t0, steps = time.time(), 0
    while time.time() - t0 < seconds:
        clips, frames = vae_step_batch(specs, recipe, gen)
        loss = vae_loss(vae, *clips, recipe, gen) + vae_loss(vae, *frames, recipe, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    vae.eval()
    held = tw.sample_specs(np.random.default_rng(123), 16, tw.SEEN_MOTIONS)
    x = render_batch(held, recipe.frames, recipe.size)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample.clamp(-1, 1)
        err = (rec - x).abs() * 127.5
        # motion kept? the frame-to-frame change of the reconstruction vs the truth's
        dx, dr = x.diff(dim=2), rec.diff(dim=2)
    return {"temporal": temporal, "vae_params": sum(p.numel() for p in vae.parameters()), "vae_steps": steps,
            "vae_seconds": round(time.time() - t0, 1), "last_loss": round(loss.item(), 4),
            "recon_mae_255": round(float(err.mean()), 2),
            "recon_mae_255_per_frame": [round(float(v), 2) for v in err.mean(dim=(0, 1, 3, 4))],
            "frame_change_error_255": round(float((dr - dx).abs().mean() * 127.5), 2),
            "latent_shape_per_clip": list(z.shape[1:]), "latent_floats_per_clip": int(np.prod(z.shape[1:])),
            **transformer_cost(comps, z.shape[1:], recipe)}


def transformer_cost(comps: dict, latent_shape, recipe: WanRecipe, reps: int = 3) -> dict:
    """Tokens per clip and the seconds of one video training step (forward + backward, batch ``recipe.batch``)."""
    tr = comps["transformer"]
    c, f, h, w = latent_shape
    pt, ph, pw = tr.config.patch_size
    latents = torch.randn(recipe.batch, c, f, h, w)
    ctx = torch.randn(recipe.batch, recipe.max_sequence_length, tr.config.text_dim)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(reps + 1):
        t0 = time.time()
        transformer_loss(tr, latents, ctx, FlowObjective(), generator=gen).backward()
        times.append(time.time() - t0)
    return {"tokens_per_clip": (f // pt) * (h // ph) * (w // pw), "transformer_step_seconds": round(min(times[1:]), 3)}


def stock_frames() -> dict:
    """Frames the stock ``WanPipeline`` returns when asked for 9, per temporal compression (random tiny models)."""
    from diffusers import WanPipeline

    got = {}
    for t in (1, 4):
        spec = ToyWanSpec(heads=2, head_dim=12, layers=1, ffn_dim=16, text_dim=8, text_layers=1, text_heads=2,
                          text_ff=16, z_dim=4, vae_base_dim=4, vae_dim_mult=(1, 1, 1), temporal=t)
        pipe = WanPipeline(**build_components(spec))
        pipe.set_progress_bar_config(disable=True)
        got[f"temporal_{t}"] = pipe("a red circle", num_frames=9, height=16, width=16, num_inference_steps=1,
                                    max_sequence_length=16, output_type="np").frames.shape[1]
    return {"asked_frames": 9, "returned_frames": got}


def zdim_cost(rounds: int) -> dict:
    """The transformer's video training step at 16 and 32 latent channels (run 3's and run 4's VAE), timed in turns
    (so a change in the machine's load hits both), the fastest of ``rounds`` each."""
    recipe, comps = WanRecipe(), {z: build_components(ToyWanSpec(z_dim=z)) for z in (16, 32)}
    best = {z: [] for z in comps}
    for _ in range(rounds):
        for z, c in comps.items():
            best[z].append(transformer_cost(c, (z, 3, 8, 8), recipe, reps=1)["transformer_step_seconds"])
    return {"rounds": rounds, "batch": recipe.batch, "threads": torch.get_num_threads(),
            "transformer_step_seconds": {f"z{z}": min(t) for z, t in best.items()},
            "all": {f"z{z}": t for z, t in best.items()}}


def slots_cost(rounds: int) -> dict:
    """A phase-2 training step's text encoder + transformer (forward and backward, batch ``recipe.batch`` captions
    and clips at the default sizes) with the pipeline's 512 zero-padded text slots and with them collapsed
    (``cav.wan.slots``, what the trainer runs), timed in turns, the fastest of ``rounds`` each; and the two losses."""
    from diffusers import WanPipeline

    from cav.wan import slots

    recipe = WanRecipe()
    pipe = WanPipeline(**build_components(ToyWanSpec()))
    texts = [tw.caption(s)[0] for s in tw.sample_specs(np.random.default_rng(0), recipe.batch, tw.SEEN_MOTIONS)]
    latents = torch.randn(recipe.batch, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def step(collapsed: bool) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(1)
        t0 = time.time()
        if collapsed:
            embeds, bias = slots.short_prompt_embeds(pipe, texts, recipe.max_sequence_length)
        else:
            embeds, bias = pipe._get_t5_prompt_embeds(texts, max_sequence_length=recipe.max_sequence_length,
                                                      device=torch.device("cpu"), dtype=torch.float32), None
        loss = transformer_loss(pipe.transformer, latents, embeds, FlowObjective(shift=3), generator=gen,
                                slot_bias=bias)
        loss.backward()
        pipe.transformer.zero_grad(set_to_none=True)
        pipe.text_encoder.zero_grad(set_to_none=True)
        return time.time() - t0, loss.item()

    slots.install(pipe.transformer)
    times, losses = {"padded": [], "collapsed": []}, {}
    for _ in range(rounds + 1):  # the first round warms up, not counted
        for name in times:
            seconds, losses[name] = step(name == "collapsed")
            times[name].append(round(seconds, 3))
    best = {name: min(t[1:]) for name, t in times.items()}
    return {"rounds": rounds, "batch": recipe.batch, "threads": torch.get_num_threads(),
            "text_slots": recipe.max_sequence_length, "step_seconds": best,
            "ratio_collapsed_to_padded": round(best["collapsed"] / best["padded"], 3),
            "loss": {k: round(v, 6) for k, v in losses.items()}, "all": times}


def main() -> None:
    if sys.argv[1:2] == ["slots"]:
        print(json.dumps(slots_cost(int(sys.argv[2]) if len(sys.argv) > 2 else 5)))
        return
    if sys.argv[1:] == ["frames"]:
        print(json.dumps(stock_frames()))
        return
    if sys.argv[1:2] == ["zdim"]:
        print(json.dumps(zdim_cost(int(sys.argv[2]) if len(sys.argv) > 2 else 5)))
        return
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 150
    recipe = WanRecipe(clips=2000, vae_batch=4, vae_object_weight=0.0)  # as measured: before the object weight
    rows = [vae_run(t, seconds, recipe) for t in (1, 4)]
    print(json.dumps({"seconds_per_vae": seconds, "vae_batch": recipe.vae_batch, "threads": torch.get_num_threads(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
