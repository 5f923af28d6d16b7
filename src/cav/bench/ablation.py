"""`cav bench ablation`: the paper's ablations in the toy world, scored against ground truth.

Rows (the shipped ``ablation/toy`` recipe): the base model without an adapter; the staged method without absorbers, with an
S-LoRA, a textual inversion or both as appearance absorbers; and MotionDirector's LoRA placement (temporal attention
+ FFN) at T-LoRA rank 2 and 4. Each trained row is the ``toy`` recipe + the file's ``overrides`` + the row's keys.

For every reference (a held-out motion the base never saw, rendered with ``toyworld.render`` and saved as mp4) each
trained row runs ``api.train`` once, then samples every new-appearance prompt × seed in one batch on a freshly loaded
backbone that holds only that run's T-LoRA (the absorbers are discarded, as in the paper's inference). The base row
samples the same prompts and seeds with no adapter.

Per generated video: ``motion_error`` (centroid displacement track vs the reference's, / frame size; lower is better),
``appearance_leakage`` (its classified colour or shape is the reference's where the prompt asks for another),
``prompt_accuracy`` (classified colour and shape are the prompt's), ``motion_accuracy`` (``classify_motion`` of
its track names the reference's motion among all 12) and ``background_leakage`` (its classified background is the
reference's where the prompt asks for another). Per (row, reference, prompt): ``diversity`` (mean pairwise
LPIPS between the seeds' videos; only with LPIPS weights, else null) and ``track_diversity`` (mean pairwise
motion error between the seeds' tracks, a weights-free proxy). Per run: ``train_seconds``. Every metric is a mean
with a 95% percentile-bootstrap interval (seeded numpy, resampling videos, groups or runs). Trainable parameters come
from ``api.plan`` on the toy model and on the full ModelScope config (meta device, config files only).
``comparisons`` holds paired differences (same reference, prompt and seed) of every row against the base and No AA.

Outputs: ``out/runs/<row>/<reference>`` (training runs), ``out/samples/<row>/<reference>.npz`` (the scored videos;
``rescore`` scores a finished run again from them), ``out/references``, ``out/sheets`` (contact sheets),
``out/partial.json`` (after each reference) and, from ``write_outputs``, ``ablation.json|md|png``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import yaml

from ..config import TrainConfig, load_recipe, recipe_path as find_recipe
from ..data import toyworld as tw
from ..errors import CavError
from ..io_utils import write_json, write_text
from ..metrics import toy as tm

DEFAULT_RECIPE = find_recipe("ablation/toy")
VIDEO_METRICS = ("motion_error", "appearance_leakage", "prompt_accuracy", "motion_accuracy", "background_leakage")
GROUP_METRICS = ("diversity", "track_diversity")
RUN_METRICS = ("train_seconds",)
METRICS = VIDEO_METRICS + GROUP_METRICS + RUN_METRICS
CHART_METRICS = ("motion_error", "appearance_leakage", "background_leakage", "prompt_accuracy", "motion_accuracy",
                 "track_diversity", "train_seconds")
LABELS = {
    "motion_error": "motion error ↓",
    "appearance_leakage": "appearance leakage ↓",
    "prompt_accuracy": "prompt accuracy ↑",
    "motion_accuracy": "motion accuracy ↑",
    "background_leakage": "background leakage ↓",
    "diversity": "LPIPS diversity ↑",
    "track_diversity": "track diversity",
    "train_seconds": "train seconds",
}
CHART_LABELS = {  # the bundled PIL font has no arrows
    "motion_error": "motion error (lower is better)",
    "appearance_leakage": "appearance leakage (lower is better)",
    "prompt_accuracy": "prompt accuracy (higher is better)",
    "motion_accuracy": "motion accuracy (higher is better)",
    "background_leakage": "background leakage (lower is better)",
    "diversity": "LPIPS diversity (higher is better)",
    "track_diversity": "track diversity (between seeds)",
    "train_seconds": "training seconds per run",
}
FRACTIONS = ("appearance_leakage", "prompt_accuracy", "motion_accuracy", "background_leakage")
_ROW_KEYS = ("name", "key", "train")
_SETTING_KEYS = ("recipe", "overrides", "references", "prompts", "seeds", "threads", "bootstrap", "rows", "quick")


# ------------------------------------------------------------------------------------------------- settings
def load_settings(path: str | Path = DEFAULT_RECIPE, quick: bool = False) -> dict:
    """Read and check an ablation file; with ``quick`` its ``quick:`` section replaces the keys it names (its
    ``overrides`` are merged over the file's, its ``references: N`` keeps the first N)."""
    path = find_recipe(path)  # a file, or a shipped name such as ablation/toy
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise CavError(f"ablation recipe '{path}' is not valid YAML ({first}): fix the file") from None
    if not isinstance(data, dict):
        raise CavError(f"ablation recipe '{path}' must be a mapping: see the shipped ablation/toy")
    unknown = sorted(set(data) - set(_SETTING_KEYS))
    if unknown:
        raise CavError(f"unknown key(s) {', '.join(unknown)} in '{path}': use {', '.join(_SETTING_KEYS)}")
    if quick:
        q = dict(data.get("quick") or {})
        n_refs = q.pop("references", None)
        q["overrides"] = {**(data.get("overrides") or {}), **(q.get("overrides") or {})}
        data = {**data, **q}
        if n_refs is not None:
            data["references"] = list(data.get("references") or [])[: int(n_refs)]
    recipe_path = Path(data.get("recipe") or "toy.yaml")
    if not recipe_path.is_absolute() and (path.parent / recipe_path).is_file():
        recipe_path = path.parent / recipe_path
    recipe = load_recipe(recipe_path)
    overrides = dict(data.get("overrides") or {})
    refs = [tw.ToySpec(**r) for r in data.get("references") or []]
    if not refs:
        raise CavError(f"'{path}' lists no references: add toy specs under references")
    rows = list(data.get("rows") or [])
    if not rows:
        raise CavError(f"'{path}' lists no rows: add rows (name, key, TrainConfig keys)")
    keys = set()
    for row in rows:
        if not isinstance(row, dict) or not row.get("name") or not row.get("key"):
            raise CavError(f"row {row!r} in '{path}' needs a name and a key")
        if row["key"] in keys:
            raise CavError(f"row key '{row['key']}' appears twice in '{path}': keys name folders, make them unique")
        keys.add(row["key"])
        extra = {k: v for k, v in row.items() if k not in _ROW_KEYS}
        TrainConfig.from_dict({**recipe, **overrides, **extra, "prompt": "x"})  # validate early
    prompts, seeds = int(data.get("prompts", 4)), int(data.get("seeds", 2))
    if prompts < 1 or seeds < 1:
        raise CavError(f"prompts ({prompts}) and seeds ({seeds}) must be ≥ 1")
    boot = {"resamples": 1000, "seed": 0, **(data.get("bootstrap") or {})}
    return {"file": str(path), "recipe_file": str(recipe_path), "recipe": recipe, "overrides": overrides,
            "references": refs, "prompts": prompts, "seeds": seeds, "threads": data.get("threads"),
            "bootstrap": {"resamples": int(boot["resamples"]), "seed": int(boot["seed"])}, "rows": rows,
            "quick": bool(quick)}


def _row_config(settings: dict, row: dict, prompt: str = "x", spatial: str = "") -> TrainConfig:
    extra = {k: v for k, v in row.items() if k not in _ROW_KEYS}
    return TrainConfig.from_dict({**settings["recipe"], **settings["overrides"], **extra, "prompt": prompt,
                                  "spatial_prompt": spatial})


def _ref_name(i: int, spec: tw.ToySpec) -> str:
    return f"ref{i}-{spec.motion}-{spec.colour}-{spec.shape}"


# ------------------------------------------------------------------------------------------------- statistics
def bootstrap(values, resamples: int = 1000, seed=0) -> dict | None:
    """Mean and 95% percentile-bootstrap interval of the mean; None for no values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "n": int(v.size)}


def _pairwise(items, fn) -> float | None:
    pairs = list(combinations(items, 2))
    return float(np.mean([fn(a, b) for a, b in pairs])) if pairs else None


# ------------------------------------------------------------------------------------------------- parameters
def _modelscope_config_folder(root: Path) -> Path:
    """A ModelScope-layout folder with config files only (no weights): enough for ``api.plan``."""
    from .. import api

    folder = root / "text-to-video-ms-1.7b"
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / comp).mkdir(parents=True, exist_ok=True)
    shutil.copy(api.ASSETS / "modelscope_unet_config.json", folder / "unet" / "config.json")
    shutil.copy(api.ASSETS / "modelscope_text_encoder_config.json", folder / "text_encoder" / "config.json")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline",
                                                         "unet": ["diffusers", "UNet3DConditionModel"]}))
    return folder


def _params(cfg: TrainConfig | None, base: str) -> dict:
    from dataclasses import replace

    from .. import api

    if cfg is None:
        return {"temporal": 0, "spatial": 0, "total": 0, "stages": {}}
    stages = {s["name"]: s["trainable_params"] for s in api.plan(replace(cfg, base=base))["stages"]}
    temporal = stages.get("t_lora", 0)
    spatial = sum(v for k, v in stages.items() if k != "t_lora")
    return {"temporal": temporal, "spatial": spatial, "total": temporal + spatial, "stages": stages}


# ------------------------------------------------------------------------------------------------- scoring
def _score(video: np.ndarray, ref: tw.ToySpec, ref_track: np.ndarray, target: tw.ToySpec) -> dict:
    frames, size = video.shape[0], video.shape[1]
    tr = tm.track(video)
    area = tm.object_mask(video).sum(axis=(1, 2))
    colour, shape = tm.classify_colour(video), tm.classify_shape(video)
    background = tm.classify_background(video)
    leak = (ref.colour != target.colour and colour == ref.colour) or (ref.shape != target.shape and shape == ref.shape)
    return {
        "motion_error": tm.motion_error(tr, ref_track, size),
        "appearance_leakage": float(leak),
        "prompt_accuracy": float(colour == target.colour and shape == target.shape),
        "motion_accuracy": float(tm.classify_motion(tr, frames, size, area=area) == ref.motion),
        "background_leakage": float(ref.background != target.background and background == ref.background),
        "colour": colour,
        "background": background,
        "shape": shape,
        "track": tr,
    }


def _score_batch(videos, row: str, name: str, ref: tw.ToySpec, ref_track, targets, texts, seeds, n_seeds: int, lp):
    """Score one (row, reference) batch (prompt-major, seeds inner): per-video records and per-prompt groups."""
    records, groups = [], []
    size = videos.shape[2]
    for p, target in enumerate(targets):
        scored = []
        for k in range(n_seeds):
            j = p * n_seeds + k
            s = _score(videos[j], ref, ref_track, target)
            scored.append(s)
            records.append({"row": row, "reference": name, "prompt": texts[j], "seed": int(seeds[j]),
                            "colour": s["colour"], "shape": s["shape"], "background": s["background"],
                            **{m: s[m] for m in VIDEO_METRICS}})
        clips = [videos[p * n_seeds + k] for k in range(n_seeds)]
        groups.append({
            "row": row, "reference": name, "prompt": tw.caption(target)[0],
            "diversity": None if lp is None or n_seeds < 2 else lp.diversity(clips),
            "track_diversity": _pairwise([s["track"] for s in scored], lambda a, b: tm.motion_error(a, b, size)),
        })
    return records, groups


def rescore(result: dict) -> dict:
    """Score a finished run again from its saved samples (``out/samples/<row>/<reference>.npz``) with this module's
    metrics, keeping its timings: the same numbers ``run_ablation`` gives now, without training or sampling again."""
    s = result["settings"]
    settings = load_settings(s["file"], s["quick"])
    lp, lpips_path, lpips_error = _lpips()
    refs = {r["name"]: r for r in s["references"]}
    records, groups = [], []
    for run in result["runs"]:
        info = refs[run["reference"]]
        ref = tw.ToySpec(**info["spec"])
        cfg = _row_config(settings, next(r for r in settings["rows"] if r["key"] == run["row"]))
        ref_video, _ = tw.render(ref, frames=cfg.frames, size=cfg.size[0])
        data = np.load(run["samples"], allow_pickle=False)
        i = list(refs).index(run["reference"])
        targets = tw.new_appearances(ref, settings["prompts"], np.random.default_rng(cfg.seed + i))
        texts = [str(t) for t in data["prompts"]]
        if texts != [tw.caption(t)[0] for t in targets for _ in range(settings["seeds"])]:
            raise CavError(f"samples '{run['samples']}' do not match the ablation file's prompts: rerun the ablation")
        r, g = _score_batch(data["videos"], run["row"], run["reference"], ref, tm.track(ref_video), targets, texts,
                            data["seeds"], settings["seeds"], lp)
        records += r
        groups += g
    return _aggregate(settings, row_params(settings), records, groups, result["runs"], s["references"],
                      result["command"], result["wall_seconds"], lpips_path, lpips_error,
                      complete=result.get("complete", True))


def _lpips():
    from ..evaluate import default_lpips_path
    from ..metrics.lpips import LPIPS

    path = default_lpips_path()
    try:
        return LPIPS(path), str(path), None
    except CavError as exc:
        return None, str(path), str(exc)


# ------------------------------------------------------------------------------------------------- run
def run_ablation(recipe_path: str | Path = DEFAULT_RECIPE, quick: bool = False, out: str | Path = "runs/ablation",
                 *, command: str | None = None, log=None) -> dict:
    """Train and score every row × reference; returns the JSON-ready result (see the module doc).

    ``log``: a callable taking one line of progress (default: print to stderr). After each reference the result so
    far is written to ``out/partial.json``.
    """
    import torch

    from .. import api, backbone
    from ..data.video import write_contact_sheet, write_video
    from ..sampling import sample_videos

    t0 = time.perf_counter()
    log = log or (lambda line: print(f"cav bench ablation: {line}", file=sys.stderr, flush=True))
    settings = load_settings(recipe_path, quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = f"cav bench ablation --recipe {recipe_path}{' --quick' if quick else ''} --out {out}"
    threads_before = torch.get_num_threads()
    if settings["threads"]:
        torch.set_num_threads(int(settings["threads"]))
    lp, lpips_path, lpips_error = _lpips()
    params = row_params(settings)
    rows = settings["rows"]
    n_seeds = settings["seeds"]
    records: list[dict] = []  # one per generated video
    groups: list[dict] = []  # one per (row, reference, prompt)
    runs: list[dict] = []  # one per (row, reference)
    ref_info: list[dict] = []
    try:
        for i, ref in enumerate(settings["references"]):
            name = _ref_name(i, ref)
            full, spatial = tw.caption(ref)
            probe = _row_config(settings, rows[0], full, spatial)
            ref_video, _ = tw.render(ref, frames=probe.frames, size=probe.size[0])
            ref_path = write_video(out / "references" / f"{name}.mp4", ref_video)
            ref_track = tm.track(ref_video)
            targets = tw.new_appearances(ref, settings["prompts"], np.random.default_rng(probe.seed + i))
            texts = [tw.caption(s)[0] for s in targets for _ in range(n_seeds)]
            seeds = [probe.validation_seed + k for _ in targets for k in range(n_seeds)]
            ref_info.append({"name": name, "spec": _spec_dict(ref), "prompt": full, "spatial_prompt": spatial,
                             "video": str(ref_path), "prompts": [tw.caption(s)[0] for s in targets]})
            sheet_rows, sheet_labels = [[ref_video]], ["reference"]
            for row in rows:
                cfg = _row_config(settings, row, full, spatial)
                trained = row.get("train", True)
                seconds = None
                run_dir = None
                if trained:
                    run_dir = out / "runs" / row["key"] / name
                    t = time.perf_counter()
                    api.train(ref_path, cfg, run_dir, overwrite=True, quiet=True)
                    seconds = time.perf_counter() - t
                t = time.perf_counter()
                bb = backbone.load(cfg.base, cfg.device, cfg.dtype)  # fresh: nothing leaks between rows
                if trained:
                    api.load_adapters(bb, [(str(run_dir), cfg.lora_weight)])  # the T-LoRA only
                videos = sample_videos(bb, texts, frames=cfg.frames, size=tuple(cfg.size), steps=cfg.sample_steps,
                                       guidance=cfg.guidance, seeds=seeds)
                del bb
                sample_seconds = time.perf_counter() - t
                samples = out / "samples" / row["key"] / f"{name}.npz"
                samples.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(samples, videos=videos, prompts=np.array(texts), seeds=np.array(seeds))
                runs.append({"row": row["key"], "reference": name, "train_seconds": seconds,
                             "sample_seconds": sample_seconds, "run": None if run_dir is None else str(run_dir),
                             "samples": str(samples)})
                batch_records, batch_groups = _score_batch(videos, row["key"], name, ref, ref_track, targets, texts,
                                                           seeds, n_seeds, lp)
                records += batch_records
                groups += batch_groups
                sheet_rows.append([videos[p * n_seeds] for p in range(len(targets))])  # first seed of each prompt
                sheet_labels.append(row["name"])
                last = records[-len(texts):]
                log(f"{name} · {row['name']}: "
                    + (f"trained {seconds:.0f} s, " if seconds is not None else "")
                    + f"sampled {len(texts)} in {sample_seconds:.0f} s, motion error "
                    f"{np.mean([r['motion_error'] for r in last]):.3f}, leakage "
                    f"{np.mean([r['appearance_leakage'] for r in last]):.2f}")
            write_contact_sheet(out / "sheets" / f"{name}.png", sheet_rows, labels=sheet_labels, scale=2)
            partial = _aggregate(settings, params, records, groups, runs, ref_info, command, time.perf_counter() - t0,
                                 lpips_path, lpips_error, complete=False)
            write_json(out / "partial.json", partial)
    finally:
        torch.set_num_threads(threads_before)
    return _aggregate(settings, params, records, groups, runs, ref_info, command, time.perf_counter() - t0,
                      lpips_path, lpips_error, complete=True)


def _spec_dict(spec: tw.ToySpec) -> dict:
    return {"shape": spec.shape, "colour": spec.colour, "background": spec.background, "motion": spec.motion,
            "scale": spec.scale, "phase": spec.phase}


def row_params(settings: dict) -> list[dict]:
    """Trainable parameters per row on the toy model and on the full ModelScope config (zeros for the base)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        ms = str(_modelscope_config_folder(Path(tmp)))
        for row in settings["rows"]:
            cfg = _row_config(settings, row) if row.get("train", True) else None
            out.append({"toy": _params(cfg, None if cfg is None else cfg.base), "modelscope": _params(cfg, ms)})
    return out


def _aggregate(settings, params, records, groups, runs, ref_info, command, wall, lpips_path, lpips_error,
               complete) -> dict:
    boot = settings["bootstrap"]
    rows_out = []
    for r, row in enumerate(settings["rows"]):
        key = row["key"]
        trained = row.get("train", True)
        cfg = _row_config(settings, row) if trained else None
        mine = [x for x in records if x["row"] == key]
        my_groups = [g for g in groups if g["row"] == key]
        my_runs = [x for x in runs if x["row"] == key]
        entry = {"name": row["name"], "key": key, "trained": trained,
                 "config": None if cfg is None else {"absorbers": cfg.absorbers, "placement": cfg.placement,
                                                     "t_lora_rank": cfg.t_lora_rank, "steps": cfg.steps,
                                                     "absorber_steps": cfg.absorber_steps}}
        for m, metric in enumerate(METRICS):
            source = {**dict.fromkeys(VIDEO_METRICS, mine), **dict.fromkeys(GROUP_METRICS, my_groups),
                      **dict.fromkeys(RUN_METRICS, my_runs)}[metric]
            entry[metric] = bootstrap([x[metric] for x in source], boot["resamples"], [boot["seed"], r, m])
        entry["sample_seconds"] = bootstrap([x["sample_seconds"] for x in my_runs], boot["resamples"],
                                            [boot["seed"], r, len(METRICS)])
        entry["n_videos"], entry["n_groups"], entry["n_runs"] = len(mine), len(my_groups), len(my_runs)
        entry["params"] = params[r]
        rows_out.append(entry)
    notes = {
        "ci95": f"95% percentile bootstrap of the mean, {boot['resamples']} resamples (numpy seed {boot['seed']}): "
                "over videos (motion error, leakage, prompt and motion accuracy), over (reference, prompt) groups "
                "(diversities) and over training runs (train seconds)",
        "motion_error": "mean distance between centroid displacement tracks of the video and the reference, as a "
                        "fraction of the frame side (metrics.toy.motion_error)",
        "appearance_leakage": "fraction of videos whose classified colour or shape is the reference's where the "
                              "prompt asks for another",
        "prompt_accuracy": "fraction of videos whose classified colour and shape are the prompt's",
        "motion_accuracy": "fraction of videos whose track is classified (among all 12 toy motions) as the "
                           "reference's motion",
        "background_leakage": "fraction of videos whose classified background is the reference's where the prompt "
                              "asks for another (not part of appearance_leakage)",
        "track_diversity": "mean pairwise motion error between the seeds' videos of one prompt (weights-free "
                           "diversity proxy)",
        "params": "trainable parameters from api.plan: temporal = T-LoRA, spatial = S-LoRA + textual inversion "
                  "(absorbers, discarded at inference); toy model and full ModelScope config (meta device)",
    }
    if lpips_error is not None:
        notes["diversity"] = (f"null: LPIPS weights are not available ({lpips_error}); track_diversity is reported "
                              "instead")
    elif settings["seeds"] < 2:
        notes["diversity"] = "null: diversity needs 2 or more seeds per prompt"
    else:
        notes["diversity"] = f"mean pairwise LPIPS between the seeds' videos of one prompt (weights: {lpips_path})"
    result = {
        "rows": rows_out,
        "command": command,
        "wall_seconds": round(wall, 1),
        "complete": complete,
        "settings": {
            "file": settings["file"], "recipe_file": settings["recipe_file"], "quick": settings["quick"],
            "recipe": settings["recipe"], "overrides": settings["overrides"],
            "n_references": len(settings["references"]), "completed_references": len(ref_info),
            "prompts_per_reference": settings["prompts"], "seeds": settings["seeds"],
            "threads": settings["threads"], "bootstrap": boot, "lpips": lpips_path if lpips_error is None else None,
            "references": ref_info,
        },
        "notes": notes,
        "runs": runs,
        "videos": records,
    }
    result["comparisons"] = paired_differences(result)
    return _jsonable(result)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def paired_differences(result: dict, vs=("base", "no-aa"), metrics=VIDEO_METRICS) -> list[dict]:
    """Per row, the mean difference ``row - vs`` of each video metric over matched videos (same reference, prompt and
    seed), with a 95% bootstrap interval over those pairs: tighter than comparing two rows' intervals."""
    vs = tuple(vs)
    boot = result["settings"]["bootstrap"]
    index = {(v["row"], v["reference"], v["prompt"], v["seed"]): v for v in result["videos"]}
    keys = [r["key"] for r in result["rows"]]
    out = []
    for b, base in enumerate(vs):
        if base not in keys:
            continue
        for r, row in enumerate(keys):
            if row == base or row in vs[:b]:  # base vs an earlier reference row is the negation of a listed pair
                continue
            entry = {"row": row, "vs": base}
            for m, metric in enumerate(metrics):
                diffs = [v[metric] - index[(base, *k[1:])][metric] for k, v in index.items()
                         if k[0] == row and (base, *k[1:]) in index]
                entry[metric] = bootstrap(diffs, boot["resamples"], [boot["seed"], 1000 + b, r, m])
            out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------- outputs
def _fmt(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _fmt_params(p: dict) -> str:
    if not p["total"]:
        return "0"
    return f"{_k(p['temporal'])} + {_k(p['spatial'])}"


def _k(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1000 else str(n)


def format_markdown(result: dict) -> str:
    """A markdown table (mean [95% CI] per metric, parameters) with the command, time and notes."""
    cols = ["motion_error", "appearance_leakage", "background_leakage", "prompt_accuracy", "motion_accuracy",
            "track_diversity", "diversity", "train_seconds"]
    head = ["row"] + [LABELS[c] for c in cols] + ["params toy (T + S)", "params ModelScope (T + S)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in result["rows"]:
        cells = [row["name"]]
        for c in cols:
            cells.append(_fmt(row.get(c), 1 if c == "train_seconds" else 3))
        cells += [_fmt_params(row["params"]["toy"]), _fmt_params(row["params"]["modelscope"])]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["settings"]
    status = "" if result.get("complete", True) else (
        f" — PARTIAL: {s['completed_references']} of {s['n_references']} references completed")
    per = [f"{s['completed_references']} references × {s['prompts_per_reference']} prompts × {s['seeds']} seeds"]
    if s.get("overrides"):
        per.append("overrides " + ", ".join(f"{k}={v}" for k, v in s["overrides"].items()))
    out = [f"`{result['command']}` — {result['wall_seconds']:.0f} s{status}", "", "; ".join(per) + ".", ""]
    out += lines + [""]
    comps = result.get("comparisons")
    if comps is None and result.get("videos"):
        comps = paired_differences(result)
    names = {r["key"]: r["name"] for r in result["rows"]}
    for vs in dict.fromkeys(c["vs"] for c in comps or []):
        out += [f"Paired difference vs **{names.get(vs, vs)}** (same reference, prompt and seed; mean [95% CI]; "
                "an interval that excludes 0 is a measured difference):", ""]
        head2 = ["row"] + [LABELS[m] for m in VIDEO_METRICS]
        out += ["| " + " | ".join(head2) + " |", "|" + "|".join(["---"] + ["---:"] * len(VIDEO_METRICS)) + "|"]
        for c in comps:
            if c["vs"] == vs:
                out.append("| " + " | ".join([names.get(c["row"], c["row"])]
                                             + [_fmt_signed(c.get(m)) for m in VIDEO_METRICS]) + " |")
        out.append("")
    out += [f"- **{k}**: {v}" for k, v in result.get("notes", {}).items()]
    return "\n".join(out)


def _fmt_signed(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


_PALETTE = [(120, 120, 120), (214, 96, 77), (244, 165, 130), (146, 197, 222), (67, 147, 195), (153, 112, 171),
            (90, 60, 130), (77, 175, 74), (255, 127, 0)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def write_chart(result: dict, path: str | Path, metrics=CHART_METRICS) -> Path:
    """PNG bar chart, one panel per metric: each row's mean with its 95% CI as a whisker."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    metrics = [m for m in metrics if any(r.get(m) for r in rows)]
    cols = 3
    n_panels = max(1, len(metrics))
    nrows = math.ceil(n_panels / cols)
    pw, ph = 340, 260
    legend_h = 24 * math.ceil(len(rows) / 3) + 16
    title_h = 34
    img = Image.new("RGB", (pw * cols, title_h + ph * nrows + legend_h), "white")
    d = ImageDraw.Draw(img)
    f_title, f_small, f_big = _font(14), _font(11), _font(16)
    s = result["settings"]
    title = (f"cav bench ablation: {s['completed_references']} references x {s['prompts_per_reference']} prompts x "
             f"{s['seeds']} seeds; bars = mean, whiskers = 95% bootstrap CI")
    if not result.get("complete", True):
        title += f" (PARTIAL: {s['completed_references']} of {s['n_references']} references)"
    d.text((10, 9), title, fill="black", font=f_big)
    for k, metric in enumerate(metrics):
        x0, y0 = (k % cols) * pw, title_h + (k // cols) * ph
        left, right, top, bottom = x0 + 52, x0 + pw - 14, y0 + 42, y0 + ph - 22
        d.text((x0 + pw // 2, y0 + 6), CHART_LABELS[metric], fill="black", font=f_title, anchor="mt")
        stats = [r.get(metric) for r in rows]
        hi_val = max([st["ci95"][1] for st in stats if st] + [st["mean"] for st in stats if st] + [1e-9])
        top_val = 1.0 if metric in FRACTIONS and hi_val <= 1.0 else _nice_ceiling(hi_val * 1.12)

        def y_of(v, top_val=top_val, top=top, bottom=bottom):
            return bottom - (bottom - top) * (max(v, 0.0) / top_val)

        for t in range(5):
            v = top_val * t / 4
            y = y_of(v)
            d.line([(left, y), (right, y)], fill=(230, 230, 230))
            d.text((left - 5, y), f"{v:.3g}", fill=(80, 80, 80), font=f_small, anchor="rm")
        d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        slot = (right - left) / len(rows)
        for i, (row, st) in enumerate(zip(rows, stats)):
            cx = left + slot * (i + 0.5)
            bw = slot * 0.62
            colour = _PALETTE[i % len(_PALETTE)]
            if st is None:
                d.text((cx, bottom - 8), "n/a", fill=(120, 120, 120), font=f_small, anchor="mb")
                continue
            d.rectangle([cx - bw / 2, y_of(st["mean"]), cx + bw / 2, bottom], fill=colour, outline=(40, 40, 40))
            lo, hi = st["ci95"]
            d.line([(cx, y_of(lo)), (cx, y_of(hi))], fill="black", width=2)
            for v in (lo, hi):
                d.line([(cx - bw / 4, y_of(v)), (cx + bw / 4, y_of(v))], fill="black", width=2)
            d.text((cx, bottom + 4), str(i + 1), fill="black", font=f_small, anchor="mt")
            d.text((cx, y_of(hi) - 2), f"{st['mean']:.2f}" if st["mean"] < 10 else f"{st['mean']:.0f}",
                   fill=(30, 30, 30), font=f_small, anchor="mb")
    ly = title_h + ph * nrows + 8
    for i, row in enumerate(rows):
        lx = 14 + (i % 3) * pw
        yy = ly + 24 * (i // 3)
        d.rectangle([lx, yy + 3, lx + 14, yy + 17], fill=_PALETTE[i % len(_PALETTE)], outline=(40, 40, 40))
        d.text((lx + 20, yy + 10), f"{i + 1}  {row['name']}", fill="black", font=f_title, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def _nice_ceiling(v: float) -> float:
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v * 1.0001:
            return m * exp
    return 10 * exp


def write_outputs(result: dict, out_dir: str | Path) -> dict:
    """Write ``ablation.json``, ``ablation.md`` (table + chart link) and ``ablation.png``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "ablation.json", "markdown": out_dir / "ablation.md", "chart": out_dir / "ablation.png"}
    write_text(paths["json"], json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    write_chart(result, paths["chart"])
    write_text(paths["markdown"], format_markdown(result) + "\n\n![ablation chart](ablation.png)\n")
    return paths


__all__ = ["run_ablation", "format_markdown", "write_outputs", "write_chart", "load_settings", "bootstrap",
           "paired_differences", "rescore"]
