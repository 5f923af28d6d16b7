"""`cav select RUN`: score every checkpoint's validation samples against the run's reference clip (each of them, for a
run on several clips: the scores are means over the clips) and publish the best checkpoint's T-LoRA as
``RUN/selected/`` (``cav generate --adapter RUN/selected``).

Scores per checkpoint (means over its validation samples):

- ``motion_fidelity`` (higher is better): ``cav.metrics.motion`` tracklet similarity to the reference, any base;
- ``toy_motion_error`` (lower is better): the toy world's ground truth (centroid displacement track vs the
  reference's), only when the base is ``toy``;
- ``text_alignment`` (higher is better): CLIPScore of the samples vs their validation prompts, only when CLIP weights
  are found locally (``clip``; nothing is downloaded).

Choice: each criterion ranks the checkpoints (1 = best; ties share the better rank); the checkpoint with the lowest
mean rank wins, a tie going to the later step (more training at equal quality). With the toy base the ground truth
replaces motion fidelity (which tracks the same thing, less reliably). ``selection.json`` holds the table and the choice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import CavError
from .io_utils import publish_dir, write_json

# criterion -> True when higher is better
CRITERIA = {"toy_motion_error": False, "motion_fidelity": True, "text_alignment": True}


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints that have validation samples, in step order."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise CavError(f"'{run}' is not a run folder (no config.yaml): pass the --out folder of `cav train`")
    found = sorted((d for d in (run / "checkpoints").glob("step-*") if list((d / "samples").glob("sample-*.npy"))),
                   key=lambda d: int(d.name[5:]))
    if not found:
        raise CavError(f"run '{run}' has no checkpoint with validation samples: train with --checkpoint-every N "
                       "(and let it reach a checkpoint) before selecting")
    return found


def choose(table: list[dict]) -> dict:
    """The row (``checkpoint``, ``step``, criterion scores) with the best mean rank; adds ``rank`` to every row."""
    used = [c for c in CRITERIA if c != "motion_fidelity" or "toy_motion_error" not in table[0]]
    used = [c for c in used if any(row.get(c) is not None for row in table)]
    if not used:
        raise CavError("no score to select on: the checkpoints' samples could not be scored")
    for row in table:
        ranks = []
        for c in used:  # a checkpoint without a score (None: its samples could not be scored) ranks last on it
            better = [r for r in table if r.get(c) is not None and (
                row.get(c) is None or (r[c] > row[c] if CRITERIA[c] else r[c] < row[c]))]
            ranks.append(1 + len(better))
        row["rank"] = float(np.mean(ranks))
    return min(table, key=lambda r: (r["rank"], -r["step"]))


def score_checkpoints(run: Path, clip: str | None = None) -> tuple[list[dict], list[str]]:
    """One row of scores per checkpoint, and the criteria left out (with why)."""
    from .config import TrainConfig
    from .metrics import toy as tm

    run = Path(run)
    found = checkpoints(run)  # refuses a folder that is not a run before reading anything
    cfg = TrainConfig.from_dict(_yaml(run / "config.yaml"))
    data = json.loads((run / "data.json").read_text()) if (run / "data.json").is_file() else {}
    references = [_reference(record, cfg) for record in (data.get("clips") or [data])]
    scorer, notes = _clip_scorer(clip)
    prompts = cfg.validation_prompts or [cfg.prompt.replace(cfg.ti_token, cfg.ti_init)]
    ref_tracks = [tm.track(r) for r in references] if cfg.base == "toy" else None
    table = []
    for ckpt in found:
        samples = [np.load(p, allow_pickle=False) for p in sorted((ckpt / "samples").glob("sample-*.npy"))]
        row = {"checkpoint": ckpt.name, "step": int(ckpt.name[5:]), "motion_fidelity": _fidelity(samples, references)}
        if ref_tracks is not None:  # a run on several clips: the mean over its clips, each sample against each clip
            row["toy_motion_error"] = float(np.mean([tm.motion_error(tm.track(s), t, r.shape[1])
                                                     for s in samples for t, r in zip(ref_tracks, references)]))
        if scorer is not None:
            row["text_alignment"] = float(np.mean([scorer.score(s, p) for s, p in zip(samples, prompts)]))
        table.append(row)
    if ref_tracks is None:
        notes.append("toy_motion_error: the base is not the toy world")
    return table, notes


def _reference(record: dict, cfg) -> np.ndarray:
    """One reference clip of the run, read as the run read it (its frame selection and fit)."""
    from .data.video import read_video

    source = record.get("clip")
    if not source or not Path(source).exists():
        raise CavError(f"the run's reference clip '{source}' is missing: put it back to score against it")
    return read_video(source, frames=cfg.frames, size=tuple(cfg.size), fit=cfg.fit, **record.get("selection", {}))


def _fidelity(samples: list[np.ndarray], references: list[np.ndarray]) -> float | None:
    """Mean motion fidelity of a checkpoint's samples against each reference clip (a run on several clips is scored
    against all of them); None when one cannot be tracked (an early checkpoint's flat or noisy sample): that
    checkpoint then ranks last on it instead of stopping the selection."""
    from .metrics import Undefined, motion

    try:
        return float(np.mean([motion.motion_fidelity(s, r) for s in samples for r in references]))
    except Undefined:
        return None


def _clip_scorer(clip: str | None):
    from .metrics.clip_score import DEFAULT_CLIP, ClipScorer

    try:
        return ClipScorer(clip or DEFAULT_CLIP, local_only=True), []
    except CavError:
        return None, [f"text_alignment: no CLIP weights at '{clip or DEFAULT_CLIP}' (pass --clip PATH)"]


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def select(run, clip: str | None = None) -> dict:
    """Score, choose, write ``RUN/selection.json`` and publish the chosen T-LoRA and samples as ``RUN/selected/``."""
    run = Path(run)
    table, notes = score_checkpoints(run, clip)
    best = choose(table)
    with publish_dir(run / "selected") as tmp:
        for name in ("t_lora", "samples"):
            shutil.copytree(run / "checkpoints" / best["checkpoint"] / name, tmp / name)
    result = {"chosen": best["checkpoint"], "adapter": str(run / "selected"), "criteria": CRITERIA,
              "left_out": notes, "table": table}
    write_json(run / "selection.json", result)
    return result
