"""The run folder protocol: what ``cav train`` writes, when, and how it is published (layout in README.md).

One rule for every folder a run publishes (checkpoints, ``absorbers/``, ``t_lora/``, ``samples/``): it is built
beside its final name and renamed into place with ``io_utils.publish_dir``, so a kill at any moment leaves the
previous version or the new one, never half of one. ``run.Run`` drives the stages; this module owns the files:
what each stage saves and loads, the T-LoRA checkpoints' validation samples (a hook of the plan), the run's end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import accel, generation, versioned
from . import backbone as backbone_mod
from . import resume as resume_mod
from .adapters import lora
from .config import TrainConfig, dump_yaml
from .errors import CavError
from .io_utils import atomic_path, content_hash, publish_dir, write_json, write_text
from .sampling import sample_with
from .stages import S_LORA, T_LORA, t_lora_config

HEADS = "temporal_heads.json"  # a temporal-heads run's measured heads (``write_heads``)
RUN_MARKERS = ("config.yaml", "log.jsonl", "t_lora", "checkpoints", "absorbers", "data.json", HEADS)
PUBLISHED = ("samples", "summary.json")  # written when a run finishes: stale once it is replaced


# ------------------------------------------------------------------------------------------ before any work
def check(out: Path, overwrite: bool, resume: bool) -> bool:
    """Refuse what would lose or mix up work, before anything is read or written; returns whether ``out`` holds
    a run."""
    out = Path(out)
    if overwrite and resume:
        raise CavError("--overwrite and --resume contradict each other: pass --resume to continue the run, "
                       "or --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CavError(f"--out '{out}' is a file: pass a folder path")
    holds = holds_run(out)
    if holds and not (overwrite or resume):
        raise CavError(f"'{out}' already holds a run: pass --resume to continue it, --overwrite to replace it, "
                       "or another --out")
    if resume and not holds:
        raise CavError(f"nothing to resume in '{out}': drop --resume to start a new run there")
    check_writable(out)
    return holds


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run: one of its files, not merely a folder (a leftover ``.cav.lock`` is no run)."""
    return Path(out).is_dir() and any((Path(out) / m).exists() for m in RUN_MARKERS)


def check_writable(path: Path, flag: str = "--out") -> None:
    """Prove that ``path`` (a folder, existing or not) can be created and written, by writing a probe file into
    its nearest existing ancestor (permission bits alone say nothing for root or on read-only mounts); ``flag``
    names the option that gave it."""
    path = Path(path).absolute()
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CavError(f"cannot write '{path}': '{ancestor}' is a file, not a folder: pass another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cav-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CavError(f"cannot write '{path}' ({exc.strerror or exc}): pass {flag} in a folder you can "
                       "write") from None


def prepare(out: Path, overwrite: bool) -> None:
    """Create ``out``; with ``overwrite`` remove the old run's files first (only cav's own, nothing else there)."""
    out = Path(out)
    if overwrite:
        for name in RUN_MARKERS + PUBLISHED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------- what the run trained on
def clip_record(video, selection: dict | None) -> dict:
    """The identity of the training data: the clip's path and content hash and the frame selection applied."""
    path = Path(video)
    return {"clip": str(path.absolute()), "sha256": content_hash(path),
            "selection": {k: v for k, v in (selection or {}).items() if v is not None}}


def data_record(records: list[dict], cfg: TrainConfig) -> dict:
    """``data.json``: the first clip's record (as one-clip runs always wrote it), every clip's under ``clips`` for a
    run on several, and the files ``--s-lora-from`` / ``--ti-from`` gave (path and hash) under ``absorbers_from``."""
    given = {key: {"path": str(Path(value).absolute()), "sha256": content_hash(value)}
             for key in ("s_lora_from", "ti_from") if (value := getattr(cfg.absorbers, key))}
    return {**records[0], **({"clips": records} if len(records) > 1 else {}),
            **({"absorbers_from": given} if given else {})}


def record_clip(out: Path, record: dict) -> None:
    versioned.write(Path(out) / "data.json", record)


def resumed_selection(out: Path, records: list[dict], cfg: TrainConfig | None = None) -> dict:
    """Check that a resumed run trains on the clips it started with (same content, same order) and, with ``cfg``,
    from the same ``--s-lora-from`` / ``--ti-from`` files; returns the frame selection to use (the recorded one when
    none is given). Runs from before ``data.json`` existed are not checked."""
    path = Path(out) / "data.json"
    if not path.is_file():
        return records[0]["selection"]
    saved = versioned.read(path)
    _check_clips(out, records, saved.get("clips") or [saved])
    if cfg is not None:
        _check_given(out, data_record(records, cfg).get("absorbers_from", {}), saved.get("absorbers_from", {}))
    given = records[0]["selection"]
    if given and given != saved["selection"]:
        raise CavError(f"the frame selection {_flags(given)} differs from the run's {_flags(saved['selection'])}: "
                       "resume without selection flags to use the run's own")
    return saved["selection"]


def _check_clips(out: Path, records: list[dict], saved: list[dict]) -> None:
    if [r["sha256"] for r in records] == [c["sha256"] for c in saved]:
        return
    if len(records) == len(saved) == 1:
        raise CavError(f"'{records[0]['clip']}' is not the clip the run in '{out}' was trained on "
                       f"({saved[0]['clip']}): resume with that clip, or start a new run with another --out")
    names = " ".join(Path(c["clip"]).name for c in saved)
    raise CavError(f"the {len(records)} clip(s) given are not the {len(saved)} clip(s) the run in '{out}' was trained "
                   f"on ({names}, in that order): resume with those clips, or start a new run with another --out")


def _check_given(out: Path, given: dict, saved: dict) -> None:
    """The absorbers a run started from (``--s-lora-from`` / ``--ti-from``) must be the same files, unchanged."""
    for key in sorted(set(given) | set(saved)):
        flag = "--" + key.replace("_", "-")
        if key not in saved:
            raise CavError(f"the run in '{out}' did not start from {flag}: resume without it, or start a new run with "
                           "another --out")
        if key not in given or given[key]["sha256"] != saved[key]["sha256"]:
            raise CavError(f"{flag} is not the file the run in '{out}' started from ({saved[key]['path']}, as it was "
                           "then): resume with that file unchanged, or start a new run with another --out")


def _flags(selection: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in selection.items()) or "(none)"


def finished(out: Path, cfg: TrainConfig) -> bool:
    """Whether the run already ends where ``cfg`` would end it (a resume then has nothing to do)."""
    path = Path(out) / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return int(summary.get("final_checkpoint", "step-0")[5:]) == cfg.motion.steps and (Path(out) / "t_lora").is_dir()


# ----------------------------------------------------------------------------------------- during training
def start(out: Path, cfg: TrainConfig, point: resume_mod.ResumePoint | None) -> None:
    """Write the resolved recipe and cut the log back to the checkpoint the run continues from."""
    write_text(Path(out) / "config.yaml", dump_yaml(cfg))
    if point:
        resume_mod.truncate_log(Path(out) / "log.jsonl", point.stage, point.step, point.clip)
    else:
        write_text(Path(out) / "log.jsonl", "")


class Clock:
    """Training wall time across sessions: each checkpoint records the total so far, and a resumed run starts from
    its checkpoint's total (a finished run's ``summary.json`` then counts every session, not only the last)."""

    def __init__(self, point: resume_mod.ResumePoint | None):
        before = 0.0
        if point:
            before = float(versioned.read(point.folder / "state.json").get("elapsed_seconds", 0.0))
        self.t0 = time.time() - before

    def total(self) -> float:
        return round(time.time() - self.t0, 2)


def validation_prompts(cfg: TrainConfig) -> list[str]:
    if cfg.validation.prompts:
        return list(cfg.validation.prompts)
    return [cfg.prompt.replace(cfg.absorbers.ti_token, cfg.absorbers.ti_init)]


def base_meta(bb) -> dict:
    """What an adapter records about its base (family, motion adapter, the expert it trained on), so `cav generate`
    rebuilds the same model and adapters of another family are refused by name."""
    return {"family": bb.family.name, **({"motion_adapter": bb.motion_adapter} if bb.motion_adapter else {}),
            **({"experts": bb.expert, "expert_parts": list(backbone_mod.expert_parts(bb.family, bb.expert))}
               if bb.expert else {})}


def t_lora_meta(bb, cfg: TrainConfig, step: int, heads: dict | None = None) -> dict:
    """The T-LoRA's ``cav.json``; ``heads``: the measured heads it is cut to (``temporal_heads``, block → heads)."""
    return {**base_meta(bb), "kind": "temporal", "base": cfg.base, "placement": cfg.motion.placement, "rank": cfg.motion.rank,
            "alpha": cfg.motion.alpha, "prompt": cfg.prompt, "spatial_prompt": _recorded_spatial(cfg),
            "absorbers": cfg.absorbers.kind, "step": step,
            **({"temporal_heads": {str(b): hs for b, hs in heads.items()}} if heads is not None else {}),
            **({"frame_diff_loss": cfg.motion.frame_diff_loss} if cfg.motion.frame_diff_loss else {}),
            "validation": {"prompts": validation_prompts(cfg), **cfg.validation.sample_config().to_validation()}}


def _recorded_spatial(cfg: TrainConfig):
    """The spatial prompt as runs record it: one text for one clip ("" when none), the list for several."""
    given = [p for p in cfg.spatial_prompt if p.strip()]
    return given if len(given) > 1 else (given[0] if given else "")


def write_absorbers(bb, cfg: TrainConfig, folder: Path, ti, s_lora: str = S_LORA, prompt: str | None = None) -> None:
    """One clip's absorbers into ``folder``: its S-LoRA (adapter ``s_lora``, trained under the spatial ``prompt``;
    None: the first clip's) and its TI rows."""
    if cfg.absorbers.uses_s_lora:  # a given image LoRA (--s-lora-from) keeps its own config (targets, rank, alpha)
        config = bb.unet.peft_config[s_lora] if cfg.absorbers.s_lora_from else cfg.lora_config("spatial", bb.family)
        meta = {**base_meta(bb), "kind": "spatial", "base": cfg.base, "placement": cfg.motion.placement, "rank": config.r,
                "alpha": config.lora_alpha, "prompt": cfg.spatial_prompt_of(0) if prompt is None else prompt,
                **({"from": cfg.absorbers.s_lora_from} if cfg.absorbers.s_lora_from else {})}
        lora.save_lora(bb.unet, s_lora, config, folder / "s_lora", meta)
    if ti is not None:
        ti.save(folder / ti.FILE)


def load_absorbers(bb, cfg: TrainConfig, folder: Path, ti, s_lora: str = S_LORA) -> None:
    """Saved absorbers (``write_absorbers``' folder) into adapter ``s_lora`` and ``ti``'s rows."""
    if cfg.absorbers.uses_s_lora:
        lora.load_lora_weights(bb.unet, folder / "s_lora", s_lora)
    if ti is not None:
        ti.load_rows(folder / ti.FILE)


def absorber_dir(out: Path, index: int) -> Path:
    """Where the absorbers of the run's clip number ``index`` (from 0) are published: ``absorbers/`` for the first,
    ``absorbers/clip-K/`` after."""
    return Path(out) / "absorbers" / (f"clip-{index}" if index else "")


def write_t_lora(bb, cfg: TrainConfig, folder: Path, step: int, heads: dict | None = None) -> None:
    """The T-LoRA after ``step`` steps into ``folder/t_lora`` (what ``cav generate --adapter`` loads); ``heads``: the
    measured heads it is cut to (its config then names their blocks only, its ``cav.json`` the heads)."""
    lora.save_lora(bb.unet, T_LORA, t_lora_config(bb, cfg, heads), folder / "t_lora",
                   t_lora_meta(bb, cfg, step, heads))


def read_heads(out: Path) -> dict | None:
    """The temporal heads a run measured (``HEADS``: block → heads), or None before they are measured."""
    path = Path(out) / HEADS
    if not path.is_file():
        return None
    return {int(b): [int(h) for h in hs] for b, hs in json.loads(path.read_text())["heads"].items()}


def write_heads(out: Path, placement: str, heads: dict, mass: list) -> None:
    """Record the temporal heads a run measured, once, so a resumed run trains (and its T-LoRA names) the same
    ones: ``HEADS`` holds the placement, block → heads and the measured shares (blocks × heads)."""
    write_json(Path(out) / HEADS, {"placement": placement, "heads": {str(b): hs for b, hs in heads.items()},
                                        "mass_across_frames": [[round(float(v), 6) for v in row] for row in mass]})


def load_t_lora(bb, folder: Path) -> None:
    lora.load_lora_weights(bb.unet, folder / "t_lora", T_LORA)


def validation_samples(bb, cfg: TrainConfig, out: Path, starts: generation.StartInputs | None, active: list[str]):
    """The T-LoRA checkpoints' hook ``hook(folder, step)``: validation samples made exactly as ``cav generate`` makes
    them, with the T-LoRA alone on, from the start ``cfg``'s validation start options name (``starts``: its reference
    frames / image), each with its generation recipe beside it (``sample-K.json``); ``active`` (the adapters the
    stage trains with) is back on afterwards."""
    from .data.video import write_video

    def hook(ckpt: Path, step: int) -> None:
        lora.activate(bb.unet, [T_LORA], [cfg.validation.lora_weight])  # only the T-LoRA, as at inference
        s = cfg.validation.sample_config(run=Path(out).absolute())  # what `cav generate --adapter RUN` starts from
        prompts = validation_prompts(cfg)
        try:
            with accel.on_device(bb.device, bb.vae, *bb.text_encoders):
                start = generation.start_for(bb, s, starts, s.seed) if starts else None  # adapter on, as generate
                videos = [sample_with(bb, [prompt], s, [s.seed], start=start)[0] for prompt in prompts]
        finally:
            lora.activate(bb.unet, active, trainable=T_LORA)
        adapter = [(Path(out).absolute() / "checkpoints" / resume_mod.checkpoint_name("t_lora", step), None)]
        for i, (prompt, video) in enumerate(zip(prompts, videos)):
            for ext in (".mp4", ".gif"):
                write_video(ckpt / "samples" / f"sample-{i}{ext}", video)
            write_json(ckpt / "samples" / f"sample-{i}.json",
                       generation.record(prompt, adapter, s, None, s.seed, [cfg.validation.lora_weight]))
            with atomic_path(ckpt / "samples" / f"sample-{i}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, video, allow_pickle=False)
    return hook


# ------------------------------------------------------------------------------------------------ at the end
def finalize(out: Path, reference: np.ndarray, clock: Clock, extra: dict | None = None) -> None:
    """Publish the last checkpoint as the run's T-LoRA and samples, plus a contact sheet and ``summary.json``
    (with ``extra``'s fields: a block-swapped run's ``block_swap`` ledger of this session, a Wan run's ``text_encoder``
    record (``textcache.TextCache.record``), ``run.Run.train``)."""
    from .data.video import write_contact_sheet

    out = Path(out)
    ckpts = sorted(d for d in (out / "checkpoints").glob("step-*") if (d / "samples").is_dir())
    if not ckpts:
        return
    last = ckpts[-1]
    for name in ("t_lora", "samples"):
        with publish_dir(out / name) as tmp:
            shutil.copytree(last / name, tmp, dirs_exist_ok=True)
    samples = [np.load(p, allow_pickle=False) for p in sorted((out / "samples").glob("sample-*.npy"))]
    write_contact_sheet(out / "samples" / "contact_sheet.png", [[reference], samples],
                        labels=["reference", f"T-LoRA step {int(last.name[5:])}"])
    write_json(out / "summary.json", {"seconds": clock.total(), "final_checkpoint": last.name, **(extra or {})})
