"""`cav select RUN`: score every checkpoint's validation samples against the run's reference clip (each of them, for a
run on several clips: the scores are means over the clips) and publish the best checkpoint's T-LoRA as
``RUN/selected/`` (``cav generate --adapter RUN/selected``).

Scores per checkpoint (means over its validation samples):

- ``motion_fidelity`` (higher is better): ``cav.metrics.motion`` tracklet similarity to the reference, any base;
- ``toy_motion_error`` (lower is better): the toy world's ground truth (centroid displacement track vs the
  reference's), only when the base is ``toy`` and every reference clip is a toy-world clip (a real clip on the toy
  base is ranked by motion fidelity: the toy tracker would follow some patch of the scene);
- ``text_alignment`` (higher is better): CLIPScore of the samples vs their validation prompts, only when CLIP weights
  are found locally (``clip``; nothing is downloaded).

Choice: each criterion ranks the checkpoints (1 = best; ties share the better rank); the checkpoint with the lowest
mean rank wins, a tie going to the later step (more training at equal quality). With the toy base the ground truth
replaces motion fidelity (which tracks the same thing, less reliably). A score that cannot be measured is None in
the table (its reason in the row's ``notes``) and prints as ``n/a (reason)``. ``selection.json`` holds the table, the
criteria that ranked (``ranked_by``) and the choice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from . import versioned
from .errors import CavError
from .io_utils import publish_dir, write_json
from .metrics import shown

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


def ranked_by(table: list[dict]) -> list[str]:
    """The criteria that rank ``table``: those with a score for some checkpoint (the toy ground truth, where it
    applies, instead of motion fidelity)."""
    used = [c for c in CRITERIA if c != "motion_fidelity" or "toy_motion_error" not in table[0]]
    return [c for c in used if any(row.get(c) is not None for row in table)]


def choose(table: list[dict], left_out: list[str] = ()) -> dict:
    """The row (``checkpoint``, ``step``, criterion scores) with the best mean rank; adds ``rank`` to every row."""
    used = ranked_by(table)
    if not used:
        why = dict.fromkeys([f"{c}: {n}" for row in table for c, n in row.get("notes", {}).items()] + list(left_out))
        raise CavError(f"no score to select on ({'; '.join(why) or 'the samples could not be scored'}): the run's own "
                       "T-LoRA (its last checkpoint) is what `cav generate --adapter RUN` uses")
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
    from .config import TrainConfig, load_recipe
    from .metrics import toy as tm

    run = Path(run)
    found = checkpoints(run)  # refuses a folder that is not a run before reading anything
    cfg = TrainConfig.from_dict(load_recipe(run / "config.yaml"))
    data = versioned.read(run / "data.json") if (run / "data.json").is_file() else {}
    references = [_reference(record, cfg) for record in (data.get("clips") or [data])]
    scorer, notes = _clip_scorer(clip)
    prompts = cfg.validation.prompts or [cfg.prompt.replace(cfg.absorbers.ti_token, cfg.absorbers.ti_init)]
    not_toy = _not_toy(cfg, references)
    ref_tracks = [tm.track(r) for r in references] if not_toy is None else None
    table = []
    for ckpt in found:
        samples = [np.load(p, allow_pickle=False) for p in sorted((ckpt / "samples").glob("sample-*.npy"))]
        fidelity, why = _fidelity(samples, references)
        row = {"checkpoint": ckpt.name, "step": int(ckpt.name[5:]), "motion_fidelity": fidelity,
               **({"notes": {"motion_fidelity": why}} if why else {})}
        if ref_tracks is not None:  # a run on several clips: the mean over its clips, each sample against each clip
            row["toy_motion_error"] = float(np.mean([tm.motion_error(tm.track(s), t, r.shape[1])
                                                     for s in samples for t, r in zip(ref_tracks, references)]))
        if scorer is not None:
            row["text_alignment"] = float(np.mean([scorer.score(s, p) for s, p in zip(samples, prompts)]))
        table.append(row)
    if not_toy:
        notes.append(f"toy_motion_error: {not_toy}")
    return table, notes


def _not_toy(cfg, references: list[np.ndarray]) -> str | None:
    """Why the toy world's ground truth does not score this run (None: it does)."""
    from .metrics import toy as tm

    if cfg.base != "toy":
        return "the base is not the toy world"
    return next((why for r in references if (why := tm.not_toy_world(r))), None)


def _reference(record: dict, cfg) -> np.ndarray:
    """One reference clip of the run, read as the run read it (its frame selection and fit)."""
    from .data.video import read_video

    source = record.get("clip")
    if not source or not Path(source).exists():
        raise CavError(f"the run's reference clip '{source}' is missing: put it back to score against it")
    return read_video(source, frames=cfg.data.frames, size=tuple(cfg.data.size), fit=cfg.data.fit,
                      **record.get("selection", {}))


def _fidelity(samples: list[np.ndarray], references: list[np.ndarray]) -> tuple[float | None, str | None]:
    """Mean motion fidelity of a checkpoint's samples against each reference clip (a run on several clips is scored
    against all of them), or None and why when one cannot be tracked (an early checkpoint's flat or noisy sample):
    that checkpoint then ranks last on it instead of stopping the selection."""
    from .metrics import Undefined, motion

    try:
        return float(np.mean([motion.motion_fidelity(s, r) for s in samples for r in references])), None
    except Undefined as exc:
        return None, str(exc)


def _clip_scorer(clip: str | None):
    from .metrics.clip_score import DEFAULT_CLIP, ClipScorer

    try:
        return ClipScorer(clip or DEFAULT_CLIP, local_only=True), []
    except CavError:
        return None, [f"text_alignment: no CLIP weights at '{clip or DEFAULT_CLIP}' (pass --clip PATH)"]


def select(run, clip: str | None = None) -> dict:
    """Score, choose, write ``RUN/selection.json`` and publish the chosen T-LoRA and samples as ``RUN/selected/``."""
    run = Path(run)
    table, notes = score_checkpoints(run, clip)
    best = choose(table, notes)
    result = {"chosen": best["checkpoint"], "adapter": str(run / "selected"), "criteria": CRITERIA,
              "ranked_by": ranked_by(table), "left_out": notes, "table": table}
    format_text(result)  # a result that cannot be shown must not be published half-way: shown first, then written
    with publish_dir(run / "selected") as tmp:
        for name in ("t_lora", "samples"):
            shutil.copytree(run / "checkpoints" / best["checkpoint"] / name, tmp / name)
    write_json(run / "selection.json", result)
    return result


def format_text(result: dict) -> str:
    """``select``'s result for a terminal: a line per checkpoint (``*``: chosen; an unmeasurable score reads
    ``n/a (reason)``), which scorer ranked them, what was left out and why, and how to use the choice."""
    lines = []
    for row in result["table"]:
        notes = row.get("notes", {})
        scores = "  ".join(f"{c} {shown(row[c], why=notes.get(c, 'not measurable'))}" for c in CRITERIA if c in row)
        mark = "*" if row["checkpoint"] == result["chosen"] else " "
        lines.append(f"{mark} {row['checkpoint']:<12} {scores}  rank {shown(row.get('rank'), 1)}")
    better = {c: "higher" if up else "lower" for c, up in CRITERIA.items()}
    lines.append("ranked by " + ", ".join(f"{c} ({better[c]} is better)" for c in result["ranked_by"])
                 + " (mean rank; a tie goes to the later step)")
    lines += [f"left out {n}" for n in result["left_out"]]
    lines.append(f"chosen {result['chosen']}: use `cav generate --adapter {result['adapter']}`")
    return "\n".join(lines)
