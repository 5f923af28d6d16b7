"""The demo's second recipe per toy base: the product's best (``cav/configs/toy-best.yaml`` on the toy UNet,
``cav/configs/toy-wan-best.yaml`` on the toy Wan), trained and scored exactly as the paper's recipe is
(``metrics.toy.score_videos``, which the demo uses too).

With ``checkpoint_every`` > 0 in the recipe the sampled T-LoRA is the checkpoint ``cav select`` picks (toy ground
truth against the reference), not the last one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import TrainConfig, load_recipe, recipe_path
from ..data import toyworld as tw
from ..metrics import toy as tm

BEST_RECIPE = "toy-best"
WAN_BEST_RECIPE = "toy-wan-best"
# issue 24's targets for the toy Wan's best recipe, each the mean over 5 training seeds (docs/DEMO-TUNING.md, "Issue
# 24"): motion error at most 0.3 of the base's, appearance accuracy at least 0.9, frame leakage at most 0.05
WAN_TARGETS = {"motion_error_ratio": ("<=", 0.3), "appearance_accuracy": (">=", 0.9), "frame_leakage": ("<=", 0.05)}


def demo_config(full: str, spatial: str, base: str, overrides: dict | None = None,
                recipe: str | Path = BEST_RECIPE) -> TrainConfig:
    """A demo recipe (a shipped name or file) with the demo's overrides, on ``base``, for the reference's prompts."""
    return TrainConfig.from_dict({**load_recipe(recipe), **(overrides or {}), "base": base, "prompt": full,
                                  "spatial_prompt": spatial})


def run_best(ref_path: Path, cfg: TrainConfig, out: Path, texts: list[str], seeds: list[int],
             quiet: bool = False) -> tuple[np.ndarray, str]:
    """Train the best recipe on the reference, pick its checkpoint, sample the demo's prompts and seeds; returns the
    videos and the adapter sampled (a folder)."""
    from .. import api, backbone
    from ..sampling import sample_with
    from ..selection import select

    run = api.train(ref_path, cfg, out / "best-run", overwrite=True, quiet=quiet)
    adapter = Path(select(run)["adapter"]) if cfg.checkpoint_every else run
    bb = backbone.load(cfg.base, cfg.system.device, cfg.system.dtype)
    api.load_adapters(bb, [(str(adapter), cfg.validation.lora_weight)])
    videos = sample_with(bb, texts, cfg.validation, seeds)
    return videos, str(adapter)


def train_and_score(out: Path, recipe: str, reference: tw.ToySpec, ref_video: np.ndarray, ref_path: Path,
                    texts: list[str], seeds: list[int], specs, err_base: list[float], base: str,
                    overrides: dict | None = None, quiet: bool = False,
                    targets: dict | None = None) -> tuple[np.ndarray, dict]:
    """The demo's best-recipe column of one base: ``recipe`` trained on the reference into ``out/best-run``, the
    demo's prompts and seeds sampled with it (``out/best-K.mp4`` / ``.gif``) and scored; returns (videos, block)."""
    from ..data.video import write_video

    full, spatial = tw.caption(reference)
    cfg = demo_config(full, spatial, base, overrides, recipe=recipe)
    videos, adapter = run_best(ref_path, cfg, out, texts, seeds, quiet)
    for i, video in enumerate(videos):
        write_video(out / f"best-{i}.mp4", video)
        write_video(out / f"best-{i}.gif", video)
    return videos, block(reference, ref_video, videos, specs, err_base, adapter, recipe=recipe, targets=targets)


def block(reference: tw.ToySpec, ref_video: np.ndarray, videos, specs, err_base: list[float], adapter: str,
          recipe: str = BEST_RECIPE, targets: dict | None = None) -> dict:
    """``metrics.json``'s ``best``: the paper block's keys, plus ``frame_leakage`` and which recipe and adapter; with
    ``targets`` ({metric: (">=" or "<=", value)}) also ``targets`` and ``meets_targets`` (this one run's figures
    against them: the targets themselves are means over 5 training seeds)."""
    errors, follows = tm.score_videos(ref_video, videos, specs)
    leak = [tm.frame_leakage(v, reference, s) for v, s in zip(videos, specs)]
    out = {
        "recipe": str(recipe_path(recipe).name), "adapter": adapter,
        "motion_error_base": float(np.mean(err_base)),
        "motion_error_cav": float(np.mean(errors)),
        "motion_error_ratio": float(np.mean(errors) / max(np.mean(err_base), 1e-8)),
        "appearance_accuracy": float(np.mean(follows)),
        "frame_leakage": float(np.mean(leak)),
        "per_video": [{"prompt": tw.caption(s)[0], "motion_error_cav": e, "follows_prompt": bool(f), "frame_leakage": k}
                      for s, e, f, k in zip(specs, errors, follows, leak)],
    }
    if targets:
        out["targets"] = {k: f"{op} {v}" for k, (op, v) in targets.items()}
        out["meets_targets"] = {k: bool(out[k] <= v if op == "<=" else out[k] >= v) for k, (op, v) in targets.items()}
    return out
