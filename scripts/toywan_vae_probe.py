"""Equal-time probe of the toy Wan VAE's recipe: does the reconstruction keep the object?

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_vae_probe.py SECONDS OBJECT_WEIGHT [LR]
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/toywan_vae_probe.py FOLDER [CLIPS [SEED]]   (a toy Wan model or run)

Trains the VAE from scratch with ``cav.toy.wan_base``'s own step (batch 4 clips + 4 single frames) for SECONDS, or
loads FOLDER's; then reconstructs 16 (or CLIPS) clips it never saw (specs of seed 123, or SEED) through the posterior
mode and prints the object's and the background's mean absolute error (0..255) and the toy scorer's colour / shape /
motion accuracy on the reconstructions, and per frame (clips, and each frame encoded alone) the shape votes and the
scored object's area over the true one: the transformer cannot draw what this decoder cannot.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cav.data import toyworld as tw
from cav.metrics import toy as tm
from cav.toy.wan_base import (ToyWanSpec, WanRecipe, build_components, render_with_masks, training_specs, vae_error,
                              vae_loss, vae_step_batch)


def train(seconds: float, recipe: WanRecipe):
    vae = build_components(ToyWanSpec(), recipe.seed)["vae"]
    specs, gen = training_specs(recipe), torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    t0, steps = time.time(), 0
    while time.time() - t0 < seconds:
        clips, frames = vae_step_batch(specs, recipe, gen)
        (vae_loss(vae, *clips, recipe, gen) + vae_loss(vae, *frames, recipe, gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    return vae, {"steps": steps, "seconds": round(time.time() - t0)}


@torch.no_grad()
def measure(vae, recipe: WanRecipe, clips: int = 16, seed: int = 123) -> dict:
    test = tw.sample_specs(np.random.default_rng(seed), clips, tw.SEEN_MOTIONS)
    x, _ = render_with_masks(test, recipe.frames, recipe.size)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    alone = torch.cat([vae.decode(vae.encode(x[:, :, f:f + 1]).latent_dist.mode()).sample.clamp(-1, 1)
                       for f in range(recipe.frames)], dim=2)
    scores = [tm.score(v, s) for v, s in zip(_np(rec), test)]
    return {"clips": clips, **vae_error(vae, test, recipe, clips),
            **{f"{k}_accuracy": float(np.mean([s[f"{k}_ok"] for s in scores])) for k in ("colour", "shape", "motion")},
            "per_frame_clip": per_frame(_np(rec), _np(x), test),
            "per_frame_encoded_alone": per_frame(_np(alone), _np(x), test)}


def _np(video: torch.Tensor) -> np.ndarray:
    return (video.permute(0, 2, 3, 4, 1).numpy() + 1) / 2


def per_frame(rec: np.ndarray, truth: np.ndarray, specs) -> dict:
    """Per frame: how many reconstructions the scorer gives the right shape, and the mean area of the scored object
    mask over the true one (> 1: the object bleeds into the background or smears over its positions)."""
    ok, ratio = np.zeros(rec.shape[1]), np.zeros(rec.shape[1])
    for v, o, s in zip(rec, truth, specs):
        for f in range(rec.shape[1]):
            mask, true = tm.object_mask(v[f:f + 1]), tm.object_mask(o[f:f + 1])
            ok[f] += tm._shape(mask) == s.shape
            ratio[f] += mask.sum() / max(true.sum(), 1) / len(specs)
    return {"shape_right": ok.astype(int).tolist(), "mask_area_ratio": ratio.round(2).tolist()}


def load_vae(folder: Path):
    """The run's latest VAE: its phase-1 state when there is one (saved while training), else the model's."""
    state = folder / ".train_state" / "vae" / "modules.safetensors"
    if not state.is_file():
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_pretrained(folder / "vae")
    from safetensors.torch import load_file

    spec = json.loads((folder / ".train_state" / "run.json").read_text())["spec"]
    vae = build_components(ToyWanSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}))["vae"]
    vae.load_state_dict({k[len("vae."):]: v for k, v in load_file(str(state)).items()})
    return vae


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    clips, seed = 16, 123
    if Path(argv[0]).is_dir():
        recipe, vae, run = WanRecipe(), load_vae(Path(argv[0])), {"folder": argv[0]}
        clips = int(argv[1]) if len(argv) > 1 else clips
        seed = int(argv[2]) if len(argv) > 2 else seed
        run["seed"] = seed
    else:
        recipe = WanRecipe(vae_batch=4, vae_object_weight=float(argv[1]),
                           vae_lr=float(argv[2]) if len(argv) > 2 else WanRecipe.vae_lr)
        vae, run = train(float(argv[0]), recipe)
        run.update(object_weight=recipe.vae_object_weight, lr=recipe.vae_lr)
    print(json.dumps({**run, **measure(vae.eval(), recipe, clips, seed)}))


if __name__ == "__main__":
    main(sys.argv[1:])
