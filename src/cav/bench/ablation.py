"""`cav bench ablation`: the paper's ablations in the toy world, scored against ground truth.

Rows (the shipped ``ablation/toy`` recipe): the base model without an adapter; the staged method without absorbers, with an
S-LoRA, a textual inversion or both as appearance absorbers; and MotionDirector's LoRA placement (temporal attention
+ FFN) at T-LoRA rank 2 and 4. Each trained row is the ``toy`` recipe + the file's ``overrides`` + the row's keys.

For every reference (a held-out motion the base never saw, rendered with ``toyworld.render`` and saved as mp4) each
trained row runs ``api.train`` once, then samples every new-appearance prompt × seed in one batch on a freshly loaded
backbone that holds only that run's T-LoRA (the absorbers are discarded, as in the paper's inference). The base row
samples the same prompts and seeds with no adapter.

The metrics (per video, per (row, reference, prompt) group, per run) are ``bench.metrics.TABLE``, each with its note.
Every metric is a mean with a 95% percentile-bootstrap interval (seeded numpy, resampling videos, groups or runs).
Trainable parameters come from ``api.plan`` on the toy model and on the full-size model of its family (config files
only: ModelScope for the toy UNet, Wan 2.1 T2V 1.3B for the toy Wan, ``FULL_MODELS``).
``comparisons`` holds paired differences (same reference, prompt and seed) of every row against the file's
``compare`` rows (default: the base and No AA).

Outputs: ``out/runs/<row>/<reference>`` (training runs), ``out/samples/<row>/<reference>.npz`` (the scored videos;
``rescore`` scores a finished run again from them), ``out/references``, ``out/sheets`` (contact sheets),
``out/partial.json`` (after each reference) and, from ``write_outputs``, ``ablation.json|md``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from ..config import TrainConfig, load_recipe, recipe_path as find_recipe
from ..data import toyworld as tw
from ..errors import CavError
from ..io_utils import write_json
from ..metrics import toy as tm
from . import rows as row_options
from .metrics import GROUP_METRICS, METRICS, RUN_METRICS, TABLE, VIDEO_METRICS, Scored, score_group, score_video
from . import report
from .report import format_markdown, write_outputs
from .stats import bootstrap, jsonable, paired_differences

DEFAULT_RECIPE = find_recipe("ablation/toy")
MODELSCOPE = "damo-vilab/text-to-video-ms-1.7b"  # parameter counts at full size, from its shipped config files
WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
# per family of the ablation's base: (the full-size model whose trainable parameters the table also counts, a size its
# shape check takes, the key of ``params`` that holds them, its label in the markdown table)
FULL_MODELS = {"unet3d": (MODELSCOPE, [256, 256], "modelscope", report.FULL_LABELS["modelscope"]),
               "wan": (WAN_1_3B, [480, 832], "wan2.1-t2v-1.3b", report.FULL_LABELS["wan2.1-t2v-1.3b"])}
_ROW_KEYS = ("name", "key", "train") + row_options.KEYS
_SETTING_KEYS = ("recipe", "overrides", "references", "prompts", "seeds", "threads", "bootstrap", "rows", "quick",
                 "compare")


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
    row_options.check(rows, path)
    prompts, seeds = int(data.get("prompts", 4)), int(data.get("seeds", 2))
    if prompts < 1 or seeds < 1:
        raise CavError(f"prompts ({prompts}) and seeds ({seeds}) must be ≥ 1")
    boot = {"resamples": 1000, "seed": 0, **(data.get("bootstrap") or {})}
    return {"file": str(path), "recipe_file": str(recipe_path), "recipe": recipe, "overrides": overrides,
            "references": refs, "prompts": prompts, "seeds": seeds, "threads": data.get("threads"),
            "bootstrap": {"resamples": int(boot["resamples"]), "seed": int(boot["seed"])}, "rows": rows,
            "quick": bool(quick), "compare": list(data.get("compare") or ["base", "no-aa"])}


def _row_config(settings: dict, row: dict, prompt: str = "x", spatial: str | list[str] = "") -> TrainConfig:
    extra = {k: v for k, v in row.items() if k not in _ROW_KEYS}
    return TrainConfig.from_dict({**settings["recipe"], **settings["overrides"], **extra, "prompt": prompt,
                                  "spatial_prompt": spatial})


def _ref_name(i: int, spec: tw.ToySpec) -> str:
    return f"ref{i}-{spec.motion}-{spec.colour}-{spec.shape}"


def _params(cfg: TrainConfig | None, base: str, clips: int = 1, size: list[int] = (256, 256)) -> dict:
    from dataclasses import replace

    from .. import api

    if cfg is None:
        return {"temporal": 0, "spatial": 0, "total": 0, "stages": {}}
    # counts do not depend on the size; 256 passes the shape check of the toy and the ModelScope bases alike (Wan's:
    # FULL_MODELS' size)
    stages = {s["name"]: s["trainable_params"]
              for s in api.plan(replace(cfg, base=base, data=replace(cfg.data, size=list(size))), clips=clips)["stages"]}
    temporal = stages.get("t_lora", 0)
    spatial = sum(v for k, v in stages.items() if k != "t_lora")
    return {"temporal": temporal, "spatial": spatial, "total": temporal + spatial, "stages": stages}


# ------------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass
class _Tally:
    """A run's scores so far and what its result names: a record per video, a group per (row, reference, prompt), a
    run per (row, reference), an entry per reference; the trainable parameters per row (``row_params``)."""

    settings: dict
    command: str
    lpips: tuple  # (the LPIPS model or None, its weights' path, why it is missing or None)
    runs: list = dataclasses.field(default_factory=list)
    refs: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.records, self.groups, self.params = [], [], row_params(self.settings)

    def score(self, videos, row: str, name: str, ref: tw.ToySpec, ref_track, targets, texts, seeds) -> list[dict]:
        """Score one (row, reference) batch (prompt-major, seeds inner); returns its records."""
        n, first = self.settings["seeds"], len(self.records)
        for p, target in enumerate(targets):
            clips = [videos[p * n + k] for k in range(n)]
            scored = [Scored(v, ref, ref_track, target) for v in clips]
            for k, s in enumerate(scored):
                j = p * n + k
                self.records.append({"row": row, "reference": name, "prompt": texts[j], "seed": int(seeds[j]),
                                     "colour": s.colour, "shape": s.shape, "background": s.background,
                                     **score_video(s)})
            self.groups.append({"row": row, "reference": name, "prompt": tw.caption(target)[0],
                                **score_group(clips, scored, self.lpips[0])})
        return self.records[first:]


def rescore(result: dict) -> dict:
    """Score a finished run again from its saved samples (``out/samples/<row>/<reference>.npz``) with this module's
    metrics, keeping its timings: the same numbers ``run_ablation`` gives now, without training or sampling again."""
    s = result["settings"]
    settings = load_settings(s["file"], s["quick"])
    tally = _Tally(settings, result["command"], _lpips(), runs=result["runs"], refs=s["references"])
    refs = {r["name"]: r for r in s["references"]}
    for run in result["runs"]:
        info = refs[run["reference"]]
        ref = tw.ToySpec(**info["spec"])
        cfg = _row_config(settings, next(r for r in settings["rows"] if r["key"] == run["row"]))
        ref_video, _ = tw.render(ref, frames=cfg.data.frames, size=cfg.data.size[0])
        data = np.load(run["samples"], allow_pickle=False)
        i = list(refs).index(run["reference"])
        targets = tw.new_appearances(ref, settings["prompts"], np.random.default_rng(cfg.seed + i))
        texts = [str(t) for t in data["prompts"]]
        if texts != [tw.caption(t)[0] for t in targets for _ in range(settings["seeds"])]:
            raise CavError(f"samples '{run['samples']}' do not match the ablation file's prompts: rerun the ablation")
        tally.score(data["videos"], run["row"], run["reference"], ref, tm.track(ref_video), targets, texts,
                    data["seeds"])
    return _aggregate(tally, result["wall_seconds"], complete=result.get("complete", True))


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
    from ..sampling import sample_with

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
    tally = _Tally(settings, command, _lpips())
    rows, n_seeds = settings["rows"], settings["seeds"]
    try:
        for i, ref in enumerate(settings["references"]):
            name = _ref_name(i, ref)
            full, spatial = tw.caption(ref)
            probe = _row_config(settings, rows[0], full, spatial)
            ref_video, _ = tw.render(ref, frames=probe.data.frames, size=probe.data.size[0])
            ref_path = write_video(out / "references" / f"{name}.mp4", ref_video)
            ref_track = tm.track(ref_video)
            targets = tw.new_appearances(ref, settings["prompts"], np.random.default_rng(probe.seed + i))
            texts = [tw.caption(s)[0] for s in targets for _ in range(n_seeds)]
            seeds = [probe.validation.seed + k for _ in targets for k in range(n_seeds)]
            tally.refs.append({"name": name, "spec": dataclasses.asdict(ref), "prompt": full,
                               "spatial_prompt": spatial, "video": str(ref_path),
                               "prompts": [tw.caption(s)[0] for s in targets]})
            sheet_rows, sheet_labels = [[ref_video]], ["reference"]
            for row in rows:
                cfg = _row_config(settings, row, full, spatial)
                trained = row.get("train", True)
                seconds = None
                run_dir = None
                if row.get("reuse"):  # an inference-time row: an earlier row's run, sampled its own way
                    run_dir = out / "runs" / row["reuse"] / name
                elif trained:
                    run_dir = out / "runs" / row["key"] / name
                    videos_in, spatial_in = row_options.train_inputs(row, ref, ref_path, targets, cfg,
                                                                     out / "references", probe.seed + i)
                    if spatial_in:
                        cfg = _row_config(settings, row, full, spatial_in)
                    t = time.perf_counter()
                    api.train(videos_in, cfg, run_dir, overwrite=True, quiet=True)
                    seconds = time.perf_counter() - t
                t = time.perf_counter()
                bb = backbone.load(cfg.base, cfg.system.device, cfg.system.dtype)  # fresh: nothing leaks between rows
                if run_dir is not None:
                    adapter = row_options.adapter_dir(row, run_dir)
                    api.load_adapters(bb, [(str(adapter), cfg.validation.lora_weight)])  # the T-LoRA only
                videos = sample_with(bb, texts, cfg.validation, seeds,
                                     start=row_options.start(bb, row, cfg, ref_video, targets, seeds, n_seeds))
                del bb
                sample_seconds = time.perf_counter() - t
                samples = out / "samples" / row["key"] / f"{name}.npz"
                samples.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(samples, videos=videos, prompts=np.array(texts), seeds=np.array(seeds))
                tally.runs.append({"row": row["key"], "reference": name, "train_seconds": seconds,
                                   "sample_seconds": sample_seconds, "run": None if run_dir is None else str(run_dir),
                                   "samples": str(samples)})
                last = tally.score(videos, row["key"], name, ref, ref_track, targets, texts, seeds)
                sheet_rows.append([videos[p * n_seeds] for p in range(len(targets))])  # first seed of each prompt
                sheet_labels.append(row["name"])
                log(f"{name} · {row['name']}: "
                    + (f"trained {seconds:.0f} s, " if seconds is not None else "")
                    + f"sampled {len(texts)} in {sample_seconds:.0f} s, motion error "
                    f"{np.mean([r['motion_error'] for r in last]):.3f}, leakage "
                    f"{np.mean([r['appearance_leakage'] for r in last]):.2f}")
                # after every row: a stopped run keeps every finished row
                write_json(out / "partial.json", _aggregate(tally, time.perf_counter() - t0, complete=False))
            write_contact_sheet(out / "sheets" / f"{name}.png", sheet_rows, labels=sheet_labels, scale=2)
    finally:
        torch.set_num_threads(threads_before)
    return _aggregate(tally, time.perf_counter() - t0, complete=True)


def full_model(settings: dict) -> tuple[str, list[int], str, str]:
    """``FULL_MODELS``' entry for the family of the ablation's base (the toy UNet: ModelScope; the toy Wan: Wan 1.3B)."""
    from ..backbone import family_of

    return FULL_MODELS[family_of(_row_config(settings, {}).base).name]


def row_params(settings: dict) -> list[dict]:
    """Trainable parameters per row on the toy model and on the full-size model of its family (``full_model``; zeros
    for the base): the hub id's config files ship with cav (``backbone.SHIPPED_CONFIGS``), so this reads no weights
    and no network."""
    full, size, key, _ = full_model(settings)
    out = []
    for row in settings["rows"]:
        cfg = _row_config(settings, row) if row.get("train", True) else None
        clips = int(row.get("clips", 1))
        out.append({"toy": _params(cfg, None if cfg is None else cfg.base, clips),
                    key: _params(cfg, full, clips, size)})
    return out


def _aggregate(tally: _Tally, wall: float, complete: bool) -> dict:
    settings, params, records, groups, runs = tally.settings, tally.params, tally.records, tally.groups, tally.runs
    (_, lpips_path, lpips_error), boot = tally.lpips, settings["bootstrap"]
    _, _, full_key, full_label = full_model(settings)
    rows_out = []
    for r, row in enumerate(settings["rows"]):
        key = row["key"]
        trained = row.get("train", True)
        cfg = _row_config(settings, row) if trained else None
        mine = [x for x in records if x["row"] == key]
        my_groups = [g for g in groups if g["row"] == key]
        my_runs = [x for x in runs if x["row"] == key]
        entry = {"name": row["name"], "key": key, "trained": trained,
                 "config": None if cfg is None else {"absorbers": cfg.absorbers.kind, "placement": cfg.motion.placement,
                                                     "t_lora_rank": cfg.motion.rank, "steps": cfg.motion.steps,
                                                     "absorber_steps": cfg.absorbers.steps}}
        if cfg is not None:  # the row's other keys (absorber_mode, frame_diff_loss, clips …), as the row gives them
            entry["config"].update({k: v for k, v in row.items() if k not in ("name", "key", "train")
                                    and k not in entry["config"]})
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
        **{m.key: m.note for m in TABLE if m.key != "diversity"},
        "params": "trainable parameters from api.plan: temporal = T-LoRA, spatial = S-LoRA + textual inversion "
                  "(absorbers, discarded at inference); toy model and full "
                  + full_label + " config (meta device)",
    }
    if lpips_error is not None:
        notes["diversity"] = (f"null: LPIPS weights are not available ({lpips_error}); track_diversity is reported "
                              "instead")
    elif settings["seeds"] < 2:
        notes["diversity"] = "null: diversity needs 2 or more seeds per prompt"
    else:
        notes["diversity"] = f"{next(m.note for m in TABLE if m.key == 'diversity')} (weights: {lpips_path})"
    result = {
        "rows": rows_out,
        "command": tally.command,
        "wall_seconds": round(wall, 1),
        "complete": complete,
        "settings": {
            "file": settings["file"], "recipe_file": settings["recipe_file"], "quick": settings["quick"],
            "recipe": settings["recipe"], "overrides": settings["overrides"],
            "n_references": len(settings["references"]), "completed_references": len(tally.refs),
            "prompts_per_reference": settings["prompts"], "seeds": settings["seeds"],
            "threads": settings["threads"], "bootstrap": boot, "lpips": lpips_path if lpips_error is None else None,
            "references": tally.refs,
        },
        "notes": notes,
        "runs": runs,
        "videos": records,
    }
    result["comparisons"] = paired_differences(result, VIDEO_METRICS, vs=settings.get("compare", ("base", "no-aa")))
    return jsonable(result)


__all__ = ["run_ablation", "format_markdown", "write_outputs", "load_settings", "bootstrap",
           "paired_differences", "rescore"]
