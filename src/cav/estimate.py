"""What a training run will do and about how long it will take here: the statement `cav train` prints with --dry-run
and at the start of a run (resolved size and frames, steps per stage, device and dtype, an estimated wall time).

The estimate is measured, not modelled: the base is loaded and each stage is built by the run's own builders
(``stages.absorber_stage``, ``stages.t_lora_stage``) on a random clip of the run's size and frames; one step of each
is run to warm up and one is timed with ``trainer.train_step``, as the run steps; one validation video is sampled
with 1 and with 3 denoising steps (the difference is the cost of a step, the rest the fixed cost of a video). A
stage's estimate is its steps times its timed step; loading the base, reading the clip and writing checkpoints are
left out. On the toy base the whole measurement takes a few seconds. It is skipped, with the reason, where it cannot
run or would take long itself: weights that are not on this machine (a hub id not in the cache, a folder of configs
only), a step on a CPU whose work (``step_work``) is above ``CPU_WORK_LIMIT`` (the toy base at 256x256 and 16 frames
took minutes to time there; the ModelScope UNet more), or a measurement that fails (e.g. out of memory).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from . import backbone, native
from .config import TrainConfig
from .errors import CavError

# a CPU is not asked to time a step larger than this: UNet parameters x latent positions of the step's batch (a
# proxy of its work): the toy recipe's largest, its T-LoRA step, is 9.4 M x 4 copies x 8 frames x 8 x 8 = 1.9e10;
# ModelScope's paper setting has 1.4 B x 2 x 16 x 32 x 32 = 4.6e13 in sampling
CPU_WORK_LIMIT = 5e10
SAMPLE_PROMPT = "a video"  # the cost of a sample does not depend on the words (prompts are padded to full length)


# ----------------------------------------------------------------------------------------------- the schedule
def schedule(cfg: TrainConfig, clips: int = 1) -> list[dict]:
    """The stages a run will go through, with their steps: absorbers (per clip, unless given or off), T-LoRA, and
    the validation samples made at each checkpoint (one video per validation prompt)."""
    from .runfolder import validation_prompts

    rows = []
    if not cfg.absorbers.given and cfg.absorbers.kind != "none":
        rows.append({"stage": "absorbers", "steps": cfg.absorbers.steps * clips, "clips": clips})
    rows.append({"stage": "t_lora", "steps": cfg.motion.steps})
    every = cfg.checkpoint_every
    checkpoints = 0 if cfg.motion.steps == 0 else (cfg.motion.steps // every + (cfg.motion.steps % every > 0) if every else 1)
    rows.append({"stage": "samples", "videos": checkpoints * len(validation_prompts(cfg)),
                 "steps": cfg.validation.steps})
    return rows


def statement(cfg: TrainConfig, clips: int = 1, measure: bool = True, unet_params: int | None = None) -> dict:
    """What the run will do (see module doc); ``measure`` False: no estimate (``estimate.skipped`` says so)."""
    dev = backbone.resolve_device(cfg.system.device)
    dtype = backbone.resolve_dtype(cfg.system.dtype, dev)
    nat = native.native(cfg.base, cfg.motion_adapter or None)
    rows = schedule(cfg, clips)
    info = {"size": list(cfg.data.size), "frames": cfg.data.frames, "device": str(dev), "dtype": _DTYPES[dtype],
            "native": {"size": list(nat.size), "frames": nat.frames, "source": nat.source},
            "warning": native.warning(cfg), "schedule": rows}
    if not measure:
        info["estimate"] = {"skipped": "--no-estimate"}
        return info
    if unet_params is None:
        unet, _ = backbone.empty_unet(cfg.base, cfg.motion_adapter or None)
        unet_params = sum(p.numel() for p in unet.parameters())
    timed = measure_steps(cfg, dev, unet_params)
    info["estimate"] = _combine(rows, timed, dev)
    return info


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _combine(rows: list[dict], timed: dict, dev: torch.device) -> dict:
    """Each stage's estimated seconds (into its row) and the total, or the reason there is none."""
    if "skipped" in timed:
        return timed
    for row in rows:
        if row["stage"] == "samples":
            per_video = timed["sample_fixed"] + row["steps"] * timed["sample_step"]
            row["seconds_each"] = round(per_video, 3)
            row["seconds"] = round(row["videos"] * per_video, 1)
        else:
            row["seconds_per_step"] = round(timed[row["stage"]], 4)
            row["seconds"] = round(row["steps"] * timed[row["stage"]], 1)
    threads = torch.get_num_threads()
    where = f"{dev}, {threads} thread{'s' if threads > 1 else ''}" if dev.type == "cpu" else str(dev)
    return {"total_seconds": round(sum(r["seconds"] for r in rows), 1),
            "measured_seconds": round(timed["seconds"], 1),
            "how": (f"an estimate: one step of each stage and one validation video (sampled with 1 and 3 denoising "
                    f"steps) timed after a warm-up on this machine ({where}, {timed['shape']}), times the steps; "
                    "loading the base, reading the clip and writing checkpoints are not included")}


# ------------------------------------------------------------------------------------------------ measuring
def _unmeasurable(cfg: TrainConfig, dev: torch.device, unet_params: int) -> str | None:
    """Why a step cannot (or should not) be timed here, or None."""
    for what, name in ((cfg.base, "base"), (cfg.motion_adapter, "motion adapter")):
        if not what:
            continue
        source = backbone.resolve_base(what) if name == "base" else backbone.resolve_motion_adapter(what)
        marker = "model_index.json" if name == "base" else "config.json"
        if not Path(source).is_dir() and not backbone.hub_cached(source, marker):
            return f"the {name} '{what}' is not on this machine (a hub id not in the Hugging Face cache)"
    work = step_work(cfg, unet_params)
    if dev.type == "cpu" and work > CPU_WORK_LIMIT:
        return (f"a step of {cfg.data.frames} frames of {cfg.data.size[0]}x{cfg.data.size[1]} on this UNet is too large "
                f"to time quickly on a CPU ({unet_params:,} parameters x latent positions = {work:.1e}; steps are timed on "
                f"a CPU up to {CPU_WORK_LIMIT:.0e}, the toy recipe's step is 1.9e10)")
    return None


def step_work(cfg: TrainConfig, unet_params: int) -> float:
    """UNet parameters times the latent positions of the largest batch a step sees (absorbers: single frames;
    T-LoRA: copies of the clip; sampling: the clip twice, for guidance)."""
    try:
        vae = backbone.read_config(cfg.base, "vae")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (CavError, KeyError):
        factor = 8
    plane = (cfg.data.size[0] // factor) * (cfg.data.size[1] // factor)
    batches = [min(cfg.absorbers.batch, cfg.data.frames), cfg.motion.batch * cfg.data.frames, 2 * cfg.data.frames]
    return float(unet_params) * plane * max(batches)


def measure_steps(cfg: TrainConfig, dev: torch.device, unet_params: int) -> dict:
    """Seconds per step of each stage and of sampling, measured here (module doc), or ``{"skipped": reason}``."""
    reason = _unmeasurable(cfg, dev, unet_params)
    if reason:
        return {"skipped": reason}
    t0 = time.perf_counter()
    bb = None
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # the caller's random state stays
            bb = backbone.load(cfg.base, cfg.system.device, cfg.system.dtype, motion_adapter=cfg.motion_adapter or None)
            timed = _time_stages(bb, cfg)
    except (CavError, RuntimeError, OSError, ValueError) as exc:  # an estimate never stops a run: say why it is missing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"skipped": f"the measurement failed ({type(exc).__name__}: {first[:160]})"}
    finally:
        del bb
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    timed["seconds"] = time.perf_counter() - t0
    return timed


def _time_stages(bb, cfg: TrainConfig) -> dict:
    """The timings of ``measure_steps`` on a loaded base, with the run's own stage builders."""
    from . import accel, lean
    from .adapters import lora
    from .sampling import sample_with
    from .stages import S_LORA, T_LORA, absorber_stage, given_absorbers, make_textual_inversion, t_lora_stage

    accel.tune_backends(bb.device)
    if accel.wants_checkpointing(cfg.system.gradient_checkpointing, bb.device):
        accel.set_gradient_checkpointing(bb.unet, True)
    gen = torch.Generator("cpu").manual_seed(0)
    frames = torch.rand((cfg.data.frames, 3, *cfg.data.size), generator=gen) * 2 - 1  # a clip in [-1, 1]
    autocast = lean.autocast_dtype(bb.device, bb.dtype)
    out = {"shape": f"{cfg.data.frames} frames of {cfg.data.size[0]}x{cfg.data.size[1]}", "absorbers": 0.0}
    ti = make_textual_inversion(bb, cfg) if cfg.absorbers.uses_ti else None
    if cfg.absorbers.given:
        given_absorbers(bb, cfg)
    elif cfg.absorbers.kind != "none":
        out["absorbers"] = _time_stage(bb, absorber_stage(bb, cfg, frames, ti), gen, cfg, autocast)
    frozen = lean.FrozenMerge(bb.unet, [S_LORA] if cfg.absorbers.uses_s_lora else [])  # as the run: S-LoRA folded in
    stage = t_lora_stage(bb, cfg, frames, ti)
    with frozen.merged():
        out["t_lora"] = _time_stage(bb, stage, gen, cfg, autocast)
    lora.activate(bb.unet, [T_LORA], [cfg.validation.lora_weight])  # validation samples: the T-LoRA alone, as generate

    def sample(steps: int) -> None:
        sample_with(bb, [SAMPLE_PROMPT], cfg.validation, [0], steps=steps)

    one = _time(bb, lambda: sample(1))
    three = _time(bb, lambda: sample(3), warm_up=False)
    out["sample_step"] = max(0.0, (three - one) / 2)
    out["sample_fixed"] = max(0.0, one - out["sample_step"])
    return out


def _time_stage(bb, stage, gen: torch.Generator, cfg: TrainConfig, autocast) -> float:
    """Seconds of one ``train_step`` of ``stage`` after one warm-up step."""
    from .trainer import make_optimizer, train_step

    opt = make_optimizer(stage)
    return _time(bb, lambda: train_step(bb.unet, bb.scheduler, stage, opt, gen, max_grad_norm=cfg.max_grad_norm,
                                        autocast_dtype=autocast))


def _time(bb, fn, warm_up: bool = True) -> float:
    """Seconds of ``fn()``, after one warm-up call (the first call allocates, tunes kernels, fills caches)."""
    if warm_up:
        fn()
    _sync(bb.device)
    t0 = time.perf_counter()
    fn()
    _sync(bb.device)
    return time.perf_counter() - t0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------------- the text
def duration(seconds: float) -> str:
    """1 h 02 min, 3 min 05 s, 42 s, 0.4 s."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_statement(info: dict) -> str:
    """The statement as lines of text (``statement``'s dict, e.g. inside a plan)."""
    h, w = info["size"]
    nh, nw = info["native"]["size"]
    lines = [f"will run: {info['frames']} frames at {h}x{w} on {info['device']} in {info['dtype']} (the base was "
             f"trained at {info['native']['frames']} frames of {nh}x{nw})"]
    est = info["estimate"]
    for row in info["schedule"]:
        if row["stage"] == "samples":
            what = f"{row['videos']} validation video{'s' if row['videos'] != 1 else ''} of {row['steps']} " \
                   "denoising steps"
        else:
            clips = f" ({row['clips']} clips)" if row.get("clips", 1) > 1 else ""
            what = f"{row['steps']} steps{clips}"
        time_ = f"~{duration(row['seconds'])}" if "seconds" in row else ""
        lines.append(f"  {row['stage']:<10} {what:<45} {time_}".rstrip())
    if "skipped" in est:
        lines.append(f"  no time estimate: {est['skipped']}")
    else:
        lines.append(f"  {'total':<10} {'':<45} ~{duration(est['total_seconds'])}")
        lines.append(f"  ({est['how']}; measuring took {duration(est['measured_seconds'])})")
    return "\n".join(lines)
