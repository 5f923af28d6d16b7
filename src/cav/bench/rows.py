"""Row options of the ablation beyond TrainConfig keys: the tools of issue 12, each measured as its own row.

- ``reuse: KEY`` — sample with an earlier row's trained runs (no training of its own: an inference-time row);
- ``clips: N`` — train on N clips of the reference's motion: the reference plus N-1 renders with other appearances
  (never a prompt's), each with its own absorbers and spatial prompt;
- ``noise_prior: A`` / ``invert: true`` — start every video from the reference's noise prior (inverted latents with
  ``invert``; ``invert`` alone: A = 1), ``cav.sampling.noise_prior_start``;
- ``image_strength: S`` — animate an image: frame 0 of the prompt's appearance rendered with the reference's motion,
  DDIM-inverted S of the schedule back (``cav.sampling.image_start``); scored against that appearance;
- ``select: true`` — sample with the checkpoint ``cav select`` picks (``RUN/selected``), not the last one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import toyworld as tw
from ..errors import CavError

KEYS = ("reuse", "clips", "noise_prior", "invert", "image_strength", "select")


def check(rows: list[dict], path) -> None:
    """Refuse rows whose options cannot run, before any training."""
    seen = {}
    for row in rows:
        reuse = row.get("reuse")
        if reuse is not None and (reuse not in seen or not seen[reuse].get("train", True) or seen[reuse].get("reuse")):
            raise CavError(f"row '{row['key']}' in '{path}' reuses '{reuse}', which is not an earlier trained row: "
                           "name a row above it that trains")
        if int(row.get("clips", 1)) < 1:
            raise CavError(f"row '{row['key']}' in '{path}': clips must be ≥ 1")
        if not 0.0 <= float(row.get("noise_prior", 0.0)) <= 1.0:
            raise CavError(f"row '{row['key']}' in '{path}': noise_prior must be in [0, 1]")
        if row.get("image_strength") is not None and not 0.0 < float(row["image_strength"]) <= 1.0:
            raise CavError(f"row '{row['key']}' in '{path}': image_strength must be in (0, 1]")
        seen[row["key"]] = row


def extra_clips(ref: tw.ToySpec, targets: list[tw.ToySpec], n: int, seed: int) -> list[tw.ToySpec]:
    """``n`` more appearances of the reference's motion, none of them a prompt's colour-and-shape."""
    taken = {(t.shape, t.colour) for t in targets} | {(ref.shape, ref.colour)}
    out = []
    for spec in tw.new_appearances(ref, 64, np.random.default_rng(seed)):
        if (spec.shape, spec.colour) not in taken:
            out.append(spec)
            taken.add((spec.shape, spec.colour))
        if len(out) == n:
            return out
    raise CavError(f"no {n} more distinct appearances for clips: lower clips")


def train_inputs(row: dict, ref: tw.ToySpec, ref_path: Path, targets, cfg, out: Path, seed: int):
    """(videos, spatial prompts) that ``api.train`` gets for this row: the reference alone, or N clips."""
    from ..data.video import write_video

    n = int(row.get("clips", 1))
    if n == 1:
        return ref_path, None
    paths, spatial = [ref_path], [tw.caption(ref)[1]]
    for k, spec in enumerate(extra_clips(ref, targets, n - 1, seed)):
        video, _ = tw.render(spec, frames=cfg.data.frames, size=cfg.data.size[0])
        paths.append(write_video(out / f"{ref_path.stem}-clip{k + 1}.mp4", video))
        spatial.append(tw.caption(spec)[1])
    return paths, spatial


def adapter_dir(row: dict, run_dir: Path) -> Path:
    """The T-LoRA a row samples with: the run's last one, or the one ``cav select`` picks."""
    if not row.get("select"):
        return run_dir
    from ..selection import select

    return Path(select(run_dir)["adapter"])


def start(bb, row: dict, cfg, ref_video: np.ndarray, targets, seeds: list[int], n_seeds: int):
    """The batch's initial latents for this row (None: fresh noise), prompt-major with seeds inner."""
    import torch

    from ..sampling import Start, image_start, noise_prior_start

    if row.get("image_strength") is not None:
        parts = [image_start(bb, tw.render(t, frames=cfg.data.frames, size=cfg.data.size[0])[0][0], cfg.data.frames,
                             seeds[p * n_seeds:(p + 1) * n_seeds], steps=cfg.validation.steps,
                             strength=float(row["image_strength"]), invert=True) for p, t in enumerate(targets)]
        return Start(torch.cat([s.latents for s in parts]), parts[0].skip)
    prior = float(row.get("noise_prior", 0.0)) or (1.0 if row.get("invert") else 0.0)
    if prior == 0.0:
        return None
    return noise_prior_start(bb, ref_video, seeds, steps=cfg.validation.steps, prior=prior,
                             invert=bool(row.get("invert")))
