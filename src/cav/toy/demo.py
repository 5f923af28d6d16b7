"""`cav demo`: the whole method in the toy world, measured against ground truth, on a CPU in minutes.

1. a reference clip with a *held-out* motion (the base model never saw it) and one appearance;
2. the staged method with the shipped ``toy`` recipe (``cav/configs/toy.yaml``): appearance absorbers, then T-LoRA;
3. videos with *new* appearances (other shape, colour and background) with the T-LoRA, and the same prompts and
   seeds without it;
4. ``metrics.json``: motion error of both against the reference (centroid displacement tracks, normalised by
   frame size), their ratio, and whether the customized videos follow the prompt's appearance.

Both toy bases: the toy UNet's block is ``metrics.json``'s top level (with ``best``: the ``toy-best`` recipe), as
before; the toy Wan's (``run_wan``: the paper's port, ``cav/configs/toy-wan.yaml``, on base ``toy-wan``, with
``best``: the ``toy-wan-best`` recipe and its figures against issue 24's targets) is its ``toy-wan`` key, its videos,
sheet and runs in ``OUT/toy-wan/``. Each block has ``frame_leakage_base``: the base's own frame leakage on the same
prompts and seeds, and ``ceiling``: the prompts' ground-truth videos (the reference's motion in each new appearance)
through the base's VAE, scored the same way: the best any recipe can score on that base.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import recipe_path
from ..data import toyworld as tw
from ..io_utils import write_json
from ..metrics import toy as tm
from ..metrics.toy import score_videos  # the demo's scorer (scripts/demo_sweep.py imports it from here)
from . import best as best_mod

RECIPE = recipe_path("toy")
WAN_BASE, WAN_RECIPE = "toy-wan", "toy-wan"
DEFAULT_REFERENCE = tw.ToySpec("circle", "red", "navy", "spiral", scale=0.3)


class PaperRun(NamedTuple):
    """One base's paper-recipe part of the demo (``_paper_recipe``): what its block and the best recipe's reuse."""

    ref_video: np.ndarray
    ref_path: Path
    texts: list[str]  # a prompt per video (each new appearance × sampling seeds)
    seeds: list[int]
    specs: list[tw.ToySpec]  # the appearance each video asks for
    base_videos: np.ndarray
    cav_videos: np.ndarray
    err_base: list[float]
    err_cav: list[float]
    follows: list[bool]
    ceiling: dict  # the prompts' ground truth through the base's VAE, scored the same way (``ceiling``)


def _paper_recipe(out: Path, recipe, base: str, reference: tw.ToySpec, prompts: int, seeds: int,
                  overrides: dict | None, quiet: bool) -> PaperRun:
    """One base's paper-recipe block of the demo, into ``out``: the reference rendered, the run trained with
    ``recipe`` (+ ``overrides``), the new-appearance prompts sampled without and with its T-LoRA, each scored, and
    the ceiling: each prompt's ground-truth video (the reference's motion in the prompt's appearance) encoded and
    decoded by the base's VAE (``sampling.vae_round_trip``) and scored the same way, the best any adapter can do on
    this base and these prompts."""
    from .. import api, backbone
    from ..adapters import lora
    from ..data.video import write_video
    from ..sampling import sample_with, vae_round_trip

    full, spatial = tw.caption(reference)
    cfg = best_mod.demo_config(full, spatial, base, overrides, recipe=recipe)
    frames, size = cfg.data.frames, cfg.data.size[0]
    ref_video, _ = tw.render(reference, frames=frames, size=size)
    ref_path = write_video(out / "reference.mp4", ref_video)
    write_video(out / "reference.gif", ref_video)
    run = api.train(ref_path, cfg, out / "run", overwrite=True, quiet=quiet)
    specs = tw.new_appearances(reference, prompts, np.random.default_rng(cfg.seed))
    texts = [tw.caption(s)[0] for s in specs for _ in range(seeds)]
    seed_list = [cfg.validation.seed + k for _ in specs for k in range(seeds)]
    bb = backbone.load(cfg.base, cfg.system.device, cfg.system.dtype)
    base_videos = sample_with(bb, texts, cfg.validation, seed_list)
    truth = [vae_round_trip(bb, tw.render(s, frames=frames, size=size)[0]) for s in specs]
    api.load_adapters(bb, [(str(run), cfg.validation.lora_weight)])
    cav_videos = sample_with(bb, texts, cfg.validation, seed_list)
    lora.activate(bb.unet, [])
    spec_per_video = [s for s in specs for _ in range(seeds)]
    err_base, _ = score_videos(ref_video, base_videos, spec_per_video)
    err_cav, follows = score_videos(ref_video, cav_videos, spec_per_video)
    err_truth, truth_follows = score_videos(ref_video, truth, specs)
    ceiling = {"motion_error": float(np.mean(err_truth)),
               "motion_error_ratio": float(np.mean(err_truth) / max(np.mean(err_base), 1e-8)),
               "appearance_accuracy": float(np.mean(truth_follows)),
               "frame_leakage": _leakage(truth, reference, specs)}
    for i, (b, c) in enumerate(zip(base_videos, cav_videos)):
        for kind, video in (("base", b), ("cav", c)):
            write_video(out / f"{kind}-{i}.mp4", video)
            write_video(out / f"{kind}-{i}.gif", video)
    return PaperRun(ref_video, ref_path, texts, seed_list, spec_per_video, base_videos, cav_videos, err_base, err_cav,
                    follows, ceiling)


def run_demo(out: str | Path = "runs/demo", reference: tw.ToySpec = DEFAULT_REFERENCE, prompts: int = 4,
             seeds: int = 1, overrides: dict | None = None, quiet: bool = False, base: str = "toy",
             best: bool = False, wan: bool = False) -> dict:
    """The toy UNet's demo (``best``: and the toy-best recipe's) into ``out``; ``wan``: then the toy Wan's
    (``run_wan``) into ``out/toy-wan``, as ``metrics.json``'s ``toy-wan`` block (without it the block says why)."""
    from ..data.video import write_video

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full, _ = tw.caption(reference)
    paper = _paper_recipe(out, RECIPE, base, reference, prompts, seeds, overrides, quiet)
    (ref_video, ref_path, texts, seed_list, spec_per_video, base_videos, cav_videos, err_base, err_cav,
     follows, _) = paper
    columns = [list(base_videos), list(cav_videos)]
    best_block = None
    if best:  # the product's best recipe (toy/best.py), scored the same way
        best_videos, best_block = best_mod.train_and_score(out, best_mod.BEST_RECIPE, reference, ref_video, ref_path,
                                                           texts, seed_list, spec_per_video, err_base, base,
                                                           overrides, quiet)
        columns.append(list(best_videos))
    write_sheet(out / "contact_sheet.png", ref_video, full, texts, columns,
                [err_base, err_cav] + ([[v["motion_error_cav"] for v in best_block["per_video"]]] if best else []))
    write_side_by_side(out / "side_by_side.gif", ref_video, columns)
    metrics = {
        "reference": full,
        "prompts": texts,
        "motion_error_base": float(np.mean(err_base)),
        "motion_error_cav": float(np.mean(err_cav)),
        "motion_error_ratio": float(np.mean(err_cav) / max(np.mean(err_base), 1e-8)),
        "appearance_accuracy": float(np.mean(follows)),
        "frame_leakage": _leakage(cav_videos, reference, spec_per_video),
        "frame_leakage_base": _leakage(base_videos, reference, spec_per_video),
        "ceiling": paper.ceiling,
        "per_video": [{"prompt": t, "motion_error_base": eb, "motion_error_cav": ec, "follows_prompt": bool(f)}
                      for t, eb, ec, f in zip(texts, err_base, err_cav, follows)],
        "seconds": round(time.time() - t0, 1),
    }
    if best_block is not None:
        metrics["best"] = best_block
    write_json(out / "metrics.json", metrics)
    metrics["toy-wan"] = (run_wan(out / "toy-wan", reference, prompts, seeds, overrides, quiet, best=best) if wan else
                          {"base": WAN_BASE, "skipped": "not run (cav demo --no-wan)"})
    write_json(out / "metrics.json", metrics)
    return metrics


def _leakage(videos, reference: tw.ToySpec, specs) -> float:
    return float(np.mean([tm.frame_leakage(v, reference, s) for v, s in zip(videos, specs)]))


def run_wan(out: str | Path, reference: tw.ToySpec = DEFAULT_REFERENCE, prompts: int = 4, seeds: int = 1,
            overrides: dict | None = None, quiet: bool = False, base: str = WAN_BASE, best: bool = True) -> dict:
    """The demo on the toy Wan: the paper's port (``toy-wan`` recipe: image-mode S-LoRA, then the T-LoRA on every
    block's self-attention) on the same reference and prompts (at the Wan's 9 frames), the base without it and
    (``best``) the ``toy-wan-best`` recipe, scored as the toy UNet's block is; videos, ``contact_sheet.png``,
    ``side_by_side.gif``, ``run/`` and ``best-run/`` in ``out``. Returns ``metrics.json``'s ``toy-wan`` block (its
    ``best`` null with ``--no-best``; ``skipped`` with the reason when the base is not on this machine: a ``base``
    folder that is not there)."""
    from .. import backbone
    from ..errors import CavError

    t0 = time.time()
    try:
        backbone.resolve_base(base)
    except CavError as exc:
        return {"base": base, "skipped": str(exc)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full, _ = tw.caption(reference)
    paper = _paper_recipe(out, WAN_RECIPE, base, reference, prompts, seeds, overrides, quiet)
    (ref_video, ref_path, texts, seed_list, spec_per_video, base_videos, cav_videos, err_base, err_cav,
     follows, _) = paper
    columns, errors, best_block = [list(base_videos), list(cav_videos)], [err_base, err_cav], None
    if best:
        best_videos, best_block = best_mod.train_and_score(out, best_mod.WAN_BEST_RECIPE, reference, ref_video,
                                                           ref_path, texts, seed_list, spec_per_video, err_base, base,
                                                           overrides, quiet, targets=best_mod.WAN_TARGETS)
        columns.append(list(best_videos))
        errors.append([v["motion_error_cav"] for v in best_block["per_video"]])
    write_sheet(out / "contact_sheet.png", ref_video, full, texts, columns, errors,
                title=f"toy Wan ({base}) · reference: {full}",
                names=(*SHEET_COLUMNS[:2], f"best recipe ({best_mod.WAN_BEST_RECIPE})"))
    write_side_by_side(out / "side_by_side.gif", ref_video, columns)
    leak = [tm.frame_leakage(v, reference, s) for v, s in zip(cav_videos, spec_per_video)]
    return {
        "base": base, "recipe": str(recipe_path(WAN_RECIPE).name), "folder": str(out),
        "reference": full, "prompts": texts,
        "motion_error_base": float(np.mean(err_base)),
        "motion_error_cav": float(np.mean(err_cav)),
        "motion_error_ratio": float(np.mean(err_cav) / max(np.mean(err_base), 1e-8)),
        "appearance_accuracy": float(np.mean(follows)),
        "frame_leakage": float(np.mean(leak)),
        "frame_leakage_base": _leakage(base_videos, reference, spec_per_video),
        "ceiling": paper.ceiling,
        "per_video": [{"prompt": t, "motion_error_base": eb, "motion_error_cav": ec, "follows_prompt": bool(f),
                       "frame_leakage": k} for t, eb, ec, f, k in zip(texts, err_base, err_cav, follows, leak)],
        "best": best_block,
        "seconds": round(time.time() - t0, 1),
    }


SHEET_COLUMNS = ("base model", "with the T-LoRA (paper recipe)", "best recipe (toy-best)")
SHEET_SHORT = ("base", "T-LoRA", "best")


def write_sheet(path: Path, reference: np.ndarray, reference_prompt: str, prompts: list[str], columns: list[list],
                errors: list[list[float]], title: str | None = None, names: tuple[str, ...] = SHEET_COLUMNS) -> Path:
    """One row per prompt: the reference, then the base model, the paper recipe's T-LoRA and (when the demo ran it)
    the best recipe side by side, captioned with the prompt and each one's motion error (the reference repeats in
    every row so each row compares motion at a glance)."""
    from ..data.sheet import write_comparison_sheet

    rows = [[reference, *videos] for videos in zip(*columns)]
    captions = [f"{t}   (motion error vs reference: "
                + ", ".join(f"{name} {e[k]:.3f}" for name, e in zip(SHEET_SHORT, errors)) + ")"
                for k, t in enumerate(prompts)]
    return write_comparison_sheet(path, rows, columns=["reference (its motion)", *names[:len(columns)]],
                                  captions=captions, title=title or f"reference: {reference_prompt}", tile=64)


def write_side_by_side(path: Path, ref_video: np.ndarray, columns: list[list[np.ndarray]]) -> Path:
    """An animated GIF: one row per prompt, [reference | each column's video] side by side, 2 px dark gaps."""
    from ..data.video import write_video

    gap = lambda v: np.full((v.shape[0], v.shape[1], 2, 3), 24, dtype=np.uint8)  # noqa: E731
    rows = []
    for i in range(len(columns[0])):
        tiles = [ref_video] + [col[i] for col in columns]
        row = np.concatenate([t for v in tiles for t in (v, gap(v))][:-1], axis=2)
        rows += [row, np.full((row.shape[0], 2, row.shape[2], 3), 24, dtype=np.uint8)]
    return write_video(path, np.concatenate(rows[:-1], axis=1))


def summary(metrics: dict, out: Path) -> str:
    return "\n".join([
        f"reference: {metrics['reference']}",
        f"motion error vs reference: base {metrics['motion_error_base']:.3f}  →  with T-LoRA {metrics['motion_error_cav']:.3f}"
        f"  (ratio {metrics['motion_error_ratio']:.2f}; lower is better)",
        f"customized videos that follow the new prompt's colour, shape and background: "
        f"{metrics['appearance_accuracy']:.0%}; frames showing the reference's appearance: "
        f"{metrics['frame_leakage']:.0%} (the base's own: {metrics['frame_leakage_base']:.0%})",
        *([f"best recipe ({metrics['best']['recipe']}): motion error {metrics['best']['motion_error_cav']:.3f} (ratio "
           f"{metrics['best']['motion_error_ratio']:.2f}), appearance {metrics['best']['appearance_accuracy']:.0%}, "
           f"frame leakage {metrics['best']['frame_leakage']:.0%}"] if "best" in metrics else []),
        f"took {metrics['seconds']:.0f} s.  Look at {out / 'contact_sheet.png'} (a row per prompt: reference, base, "
        f"T-LoRA{', best' if 'best' in metrics else ''}) and {out / 'side_by_side.gif'},",
        f"the videos in {out}/, and the run (adapters, checkpoints, log) in {out / 'run'}/",
        *_wan_summary(metrics.get("toy-wan"), out),
    ])


def _wan_summary(block: dict | None, out: Path) -> list[str]:
    if block is None:
        return []
    if "skipped" in block:
        return [f"toy Wan: skipped ({block['skipped']})"]
    best = block["best"]
    return [
        f"toy Wan ({block['recipe']}, the paper's port): motion error base {block['motion_error_base']:.3f}  →  with "
        f"T-LoRA {block['motion_error_cav']:.3f} (ratio {block['motion_error_ratio']:.2f}), appearance "
        f"{block['appearance_accuracy']:.0%}, frame leakage {block['frame_leakage']:.0%} (the base's own: "
        f"{block['frame_leakage_base']:.0%}); took {block['seconds']:.0f} s.",
        f"toy Wan ceiling (the prompts' ground truth through its VAE): ratio "
        f"{block['ceiling']['motion_error_ratio']:.2f}, appearance {block['ceiling']['appearance_accuracy']:.0%}, "
        f"frame leakage {block['ceiling']['frame_leakage']:.0%}",
        *([f"toy Wan best recipe ({best['recipe']}): motion error {best['motion_error_cav']:.3f} (ratio "
           f"{best['motion_error_ratio']:.2f}), appearance {best['appearance_accuracy']:.0%}, frame leakage "
           f"{best['frame_leakage']:.0%}; targets met: "
           + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in best["meets_targets"].items())] if best else []),
        f"Look at {Path(block['folder']) / 'contact_sheet.png'} and {Path(block['folder']) / 'side_by_side.gif'}",
    ]
