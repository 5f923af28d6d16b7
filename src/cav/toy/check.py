"""`cav toy check-base`: does the base model draw the prompted colour, shape and (seen) motion?

Generates videos for seen-motion prompts and scores them against the toy world's ground truth (the object's colour
and shape, the background, the motion); also measures how far the base alone is from the held-out motions (it must
*not* produce them: that is what customization adds).
"""

from __future__ import annotations

import time

import numpy as np

from .. import backbone
from ..data import toyworld as tw
from ..metrics import toy as tm
from ..sampling import sample_videos

TOY_FRAMES, TOY_SIZE, TOY_GUIDANCE, TOY_STEPS = 8, 32, 6.0, 25


def check_base(base: str = "toy", n: int = 64, heldout: int = 24, seed: int = 0, steps: int = TOY_STEPS,
               guidance: float = TOY_GUIDANCE, device: str = "auto", batch: int = 16, quiet: bool = False) -> dict:
    """Scores of ``n`` seen-motion and ``heldout`` held-out-motion videos (minutes on a CPU: a progress bar counts
    the videos unless ``quiet``)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    bb = backbone.load(base, device)
    rng = np.random.default_rng(seed)
    seen = tw.sample_specs(rng, n, tw.SEEN_MOTIONS)
    held = tw.sample_specs(rng, heldout, tw.HELDOUT_MOTIONS)
    with tqdm(total=n + heldout, desc="check-base", unit="video", disable=quiet) as bar:
        scores = _score(bb, seen, steps, guidance, seed, batch, bar)
        held_scores = _score(bb, held, steps, guidance, seed + 10_000, batch, bar)
    return {
        "base": base,
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
        "seconds": round(time.time() - t0, 1),
    }


def _score(bb, specs, steps, guidance, seed, batch, bar) -> list[dict]:
    out = []
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        videos = sample_videos(bb, [tw.caption(s)[0] for s in chunk], frames=TOY_FRAMES, size=(TOY_SIZE, TOY_SIZE),
                               steps=steps, guidance=guidance, seeds=[seed + i + k for k in range(len(chunk))])
        out += [tm.score(v, s) for v, s in zip(videos, chunk)]
        bar.update(len(chunk))
    return out
