"""`cav toy check-base`: does the base model draw the prompted colour, shape and (seen) motion?

Generates videos for seen-motion prompts and scores them against the toy world's ground truth (the object's colour
and shape, the background, the motion); also measures how far the base alone is from the held-out motions (it must
*not* produce them: that is what customization adds). The toy UNet (and any base cav loads) samples through cav's
backbone; a toy Wan (``toy-wan`` or a ``WanPipeline`` folder) through the stock ``WanPipeline``, which is what it
must work with. Both draw the same prompts and seeds and are scored by the same scorer.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .. import backbone
from ..data import toyworld as tw
from ..metrics import toy as tm
from ..options import at_least, option
from ..sampling import sample_videos

TOY_FRAMES, TOY_SIZE, TOY_GUIDANCE, TOY_STEPS = 8, 32, 6.0, 25


def _base_help() -> str:
    from .wan_base import TOY_WAN

    return f"base model to check: toy, {TOY_WAN} (sampled by the stock WanPipeline) or a folder of either"


@dataclass
class CheckBaseOptions:
    """`cav toy check-base` (its flags are built from these fields; defaults: this module's)."""

    base: str = option("toy", _base_help)
    videos: int = option(64, "seen-motion videos to generate and score", unit="videos", check=at_least(1))
    heldout: int = option(24, "held-out-motion videos (the base must not make these motions)", unit="videos",
                          check=at_least(1))
    steps: int = option(TOY_STEPS, "denoising steps per video", unit="steps", check=at_least(1))
    seed: int = option(0, "seed of the prompts drawn and of the videos' noise")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    json: bool = option(False, "JSON output")
    quiet: bool = option(False, "no progress bar")
WAN_FRAMES = 9  # Wan's VAE takes 4k+1 frames (the toy Wan's temporal compression is 4)


def check_base(base: str = "toy", n: int = 64, heldout: int = 24, seed: int = 0, steps: int = TOY_STEPS,
               guidance: float = TOY_GUIDANCE, device: str = "auto", batch: int = 16, quiet: bool = False) -> dict:
    """Scores of ``n`` seen-motion and ``heldout`` held-out-motion videos (minutes on a CPU: a progress bar counts
    the videos unless ``quiet``)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    draw = _sampler(base, device, steps, guidance)
    rng = np.random.default_rng(seed)
    seen = tw.sample_specs(rng, n, tw.SEEN_MOTIONS)
    held = tw.sample_specs(rng, heldout, tw.HELDOUT_MOTIONS)
    with tqdm(total=n + heldout, desc="check-base", unit="video", disable=quiet) as bar:
        scores = _score(draw, seen, seed, batch, bar)
        held_scores = _score(draw, held, seed + 10_000, batch, bar)
    return {
        "base": str(base),
        "videos": n,
        "colour_accuracy": float(np.mean([s["colour_ok"] for s in scores])),
        "shape_accuracy": float(np.mean([s["shape_ok"] for s in scores])),
        "background_accuracy": float(np.mean([s["background_ok"] for s in scores])),
        "background_accuracy_by_background": {
            b: float(np.mean([s["background_ok"] for s, spec in zip(scores, seen) if spec.background == b]))
            for b in tw.BACKGROUNDS if any(spec.background == b for spec in seen)},
        "motion_accuracy": float(np.mean([s["motion_ok"] for s in scores])),
        "seen_motion_error": float(np.mean([s["motion_error"] for s in scores])),
        "heldout_videos": heldout,
        "heldout_motion_error": float(np.mean([s["motion_error"] for s in held_scores])),
        "heldout_motion_accuracy": float(np.mean([s["motion_ok"] for s in held_scores])),
        # the prompt's appearance (colour, shape and background at once) in videos whose prompts name a held-out
        # motion: what customized videos are scored on, and what the base caps
        "heldout_appearance_accuracy": float(np.mean([s["colour_ok"] and s["shape_ok"] and s["background_ok"]
                                                      for s in held_scores])),
        "heldout_background_accuracy": float(np.mean([s["background_ok"] for s in held_scores])),
        # what the seen-motion videos drew where they missed: {"colour": {"yellow → white": 3, ...}, ...}
        "confusions": _confusions(scores, seen),
        "seconds": round(time.time() - t0, 1),
    }


def _sampler(base, device: str, steps: int, guidance: float):
    """(prompts, seeds) → uint8 videos (B, F, H, W, 3) of ``base``: a toy Wan's from the stock ``WanPipeline``,
    any other base's from cav's backbone."""
    from .wan_base import toy_wan_folder

    wan = toy_wan_folder(base)
    if wan is not None:
        return _wan_sampler(wan, device, steps, guidance)
    bb = backbone.load(base, device)
    return lambda prompts, seeds: sample_videos(bb, prompts, frames=TOY_FRAMES, size=(TOY_SIZE, TOY_SIZE),
                                                steps=steps, guidance=guidance, seeds=seeds)


def _wan_sampler(folder, device: str, steps: int, guidance: float):
    """The stock ``WanPipeline`` with its defaults (512 text slots, "" as the negative prompt, UniPC), one CPU
    generator per video seeded as the UNet's videos are."""
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder)).to(backbone.resolve_device(device))
    pipe.set_progress_bar_config(disable=True)

    def draw(prompts, seeds):
        frames = pipe(prompts, num_frames=WAN_FRAMES, height=TOY_SIZE, width=TOY_SIZE, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).frames
        return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)

    return draw


def _score(draw, specs, seed, batch, bar) -> list[dict]:
    out = []
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        videos = draw([tw.caption(s)[0] for s in chunk], [seed + i + k for k in range(len(chunk))])
        out += [{**tm.score(v, s), "drawn": tm.appearance(v)} for v, s in zip(videos, chunk)]
        bar.update(len(chunk))
    return out


def _confusions(scores: list[dict], specs: list[tw.ToySpec]) -> dict:
    """Per attribute, "asked → drawn": count over the videos that missed it, most frequent first."""
    out = {}
    for k, attr in enumerate(("colour", "shape", "background")):
        pairs = Counter(f"{getattr(spec, attr)} → {s['drawn'][k]}" for s, spec in zip(scores, specs)
                        if s["drawn"][k] != getattr(spec, attr))
        out[attr] = dict(pairs.most_common())
    return out
