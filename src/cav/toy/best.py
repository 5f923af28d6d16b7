"""The demo's second recipe: the product's best (``cav/configs/toy-best.yaml``), trained and scored exactly as the
paper's recipe is (``metrics.toy.score_videos``, which the demo uses too).

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


def best_config(full: str, spatial: str, base: str, overrides: dict | None = None) -> TrainConfig:
    return TrainConfig.from_dict({**load_recipe(BEST_RECIPE), **(overrides or {}), "base": base, "prompt": full,
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


def block(reference: tw.ToySpec, ref_video: np.ndarray, videos, specs, err_base: list[float], adapter: str) -> dict:
    """``metrics.json``'s ``best``: the paper block's keys, plus ``frame_leakage`` and which recipe and adapter."""
    errors, follows = tm.score_videos(ref_video, videos, specs)
    leak = [tm.frame_leakage(v, reference, s) for v, s in zip(videos, specs)]
    return {
        "recipe": str(recipe_path(BEST_RECIPE).name), "adapter": adapter,
        "motion_error_base": float(np.mean(err_base)),
        "motion_error_cav": float(np.mean(errors)),
        "motion_error_ratio": float(np.mean(errors) / max(np.mean(err_base), 1e-8)),
        "appearance_accuracy": float(np.mean(follows)),
        "frame_leakage": float(np.mean(leak)),
        "per_video": [{"prompt": tw.caption(s)[0], "motion_error_cav": e, "follows_prompt": bool(f), "frame_leakage": k}
                      for s, e, f, k in zip(specs, errors, follows, leak)],
    }

