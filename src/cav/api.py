"""The Python API shared by the CLI, the demo and the benchmarks: ``plan``, ``train``, ``generate``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import accel
from . import resume as resume_mod
from . import backbone as backbone_mod
from .adapters import lora
from .adapters.textual_inversion import TextualInversion
from .config import TrainConfig, dump_yaml
from .errors import CavError
from .io_utils import atomic_path, write_json, write_text
from .sampling import sample_video
from .stages import S_LORA, T_LORA, absorber_stage, given_absorbers, make_textual_inversion, t_lora_stage
from .trainer import JsonlLog, make_optimizer, run_stage

ASSETS = Path(__file__).parent / "assets"
RUN_MARKERS = ("config.yaml", "log.jsonl", "t_lora", "checkpoints", "absorbers")


# ----------------------------------------------------------------------------------------------- plan (dry run)
def plan(cfg: TrainConfig) -> dict:
    """Trainable parameters and adapted modules per stage, from the base's config files alone (meta device)."""
    unet, family = backbone_mod.empty_unet(cfg.base, cfg.motion_adapter or None)
    unet_config = dict(unet.config)
    stages = []
    if cfg.uses_s_lora and not cfg.absorbers_given:  # given absorbers (--s-lora-from/--ti-from) train nothing
        n = lora.add_lora(unet, S_LORA, lora.lora_config("spatial", cfg.placement, cfg.s_lora_rank, cfg.s_lora_alpha,
                                                         family.name), low_cpu_mem_usage=True)
        stages.append({"name": "s_lora", "trainable_params": lora.count_parameters(unet, S_LORA), "modules": n})
    if cfg.uses_ti and not cfg.absorbers_given:
        dim = _text_hidden_size(cfg.base, unet_config)
        stages.append({"name": "textual_inversion", "trainable_params": cfg.ti_tokens * dim, "modules": 1})
    n = lora.add_lora(unet, T_LORA, lora.lora_config("temporal", cfg.placement, cfg.t_lora_rank, cfg.t_lora_alpha,
                                                     family.name), low_cpu_mem_usage=True)
    stages.append({"name": "t_lora", "trainable_params": lora.count_parameters(unet, T_LORA), "modules": n})
    base_params = sum(p.numel() for n_, p in unet.named_parameters() if ".lora_" not in n_)
    return {"base": cfg.base, "family": family.name, "placement": cfg.placement, "absorbers": cfg.absorbers,
            "unet_params": base_params, "stages": stages}


def _text_hidden_size(base: str, unet_config: dict) -> int:
    resolved = backbone_mod.resolve_base(base)
    path = Path(resolved) / "text_encoder" / "config.json"
    if path.is_file():
        return int(json.loads(path.read_text())["hidden_size"])
    return int(unet_config["cross_attention_dim"])  # the UNet attends to the text encoder's hidden states


# ----------------------------------------------------------------------------------------------------- train
def check_run_dir(out: Path, overwrite: bool, resume: bool) -> bool:
    """Refuse to touch an existing run unless asked; returns whether ``out`` holds one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CavError(f"--out '{out}' is a file: pass a folder path")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not (overwrite or resume):
        raise CavError(f"'{out}' already holds a run: pass --resume to continue it, --overwrite to replace it, "
                       "or another --out")
    return holds_run


def prepare_run_dir(out: Path, overwrite: bool, resume: bool) -> None:
    out = Path(out)
    holds_run = check_run_dir(out, overwrite, resume)
    if holds_run and overwrite:
        for m in RUN_MARKERS + ("samples",):
            p = out / m
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def validation_prompts(cfg: TrainConfig) -> list[str]:
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    return [cfg.prompt.replace(cfg.ti_token, cfg.ti_init)]


def train(video, cfg: TrainConfig, out, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
          video_options: dict | None = None) -> Path:
    """Run the staged method on one reference video; returns the run folder (layout in DESIGN.md).

    With ``resume`` the run continues from its furthest checkpoint (adapters, optimizer, RNG, stage and step), so
    it ends with the same adapters as an uninterrupted run.
    """
    from .data.video import read_video, to_tensor

    if not cfg.prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video and its motion'")
    out = Path(out)
    holds_run = check_run_dir(out, overwrite, resume)
    if resume and not holds_run:
        raise CavError(f"nothing to resume in '{out}': drop --resume to start a new run there")
    frames_u8 = read_video(video, frames=cfg.frames, size=tuple(cfg.size), fit=cfg.fit, **(video_options or {}))
    prepare_run_dir(out, overwrite, resume)
    point = resume_mod.latest(out) if resume else None
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    bb = backbone_mod.load(cfg.base, cfg.device, cfg.dtype, motion_adapter=cfg.motion_adapter or None)
    accel.tune_backends(bb.device)
    if accel.wants_checkpointing(cfg.gradient_checkpointing, bb.device):
        accel.set_gradient_checkpointing(bb.unet, True)
    if cfg.compile:
        accel.compile_unet(bb.unet)
    write_text(out / "config.yaml", dump_yaml(cfg))
    if point:
        resume_mod.truncate_log(out / "log.jsonl", point[0], point[1])
    else:
        write_text(out / "log.jsonl", "")
    frames = to_tensor(frames_u8)
    log = JsonlLog(out / "log.jsonl")
    run = dict(max_grad_norm=cfg.max_grad_norm, quiet=quiet,
               autocast_dtype=bb.dtype if bb.device.type == "cuda" and bb.dtype != torch.float32 else None)
    try:
        ti = make_textual_inversion(bb, cfg) if cfg.uses_ti else None
        if cfg.absorbers_given:  # --s-lora-from / --ti-from: existing appearance work, no stage 1
            given_absorbers(bb, cfg)
            _save_absorbers(bb, cfg, out, ti)
        elif cfg.absorbers != "none":
            stage = absorber_stage(bb, cfg, frames, ti)
            if point and point[0] == "t_lora":  # absorbers finished before the interruption
                _load_absorbers(bb, cfg, out / "absorbers", ti)
            else:
                stage.checkpoint = lambda step, opt, gstate, _: _absorber_checkpoint(bb, cfg, out, ti, step, opt, gstate)
                stage.checkpoint_every = cfg.checkpoint_every
                start, opt = _restore(bb, cfg, stage, point, ti, gen) if point else (0, None)
                run_stage(bb.unet, bb.scheduler, stage, gen, log, start_step=start, optimizer=opt, **run)
                _save_absorbers(bb, cfg, out, ti)
        stage = t_lora_stage(bb, cfg, frames, ti)
        lora_cfg = lora.lora_config("temporal", cfg.placement, cfg.t_lora_rank, cfg.t_lora_alpha, bb.family)
        active = ([S_LORA] if cfg.uses_s_lora else []) + [T_LORA]
        stage.checkpoint = lambda step, opt, gstate, interrupted: _checkpoint(
            bb, cfg, out, lora_cfg, step, active, opt, gstate, samples=not interrupted)
        stage.checkpoint_every = cfg.checkpoint_every
        t_point = point if point and point[0] == "t_lora" else None
        start, opt = _restore(bb, cfg, stage, t_point, ti, gen) if t_point else (0, None)
        run_stage(bb.unet, bb.scheduler, stage, gen, log, start_step=start, optimizer=opt, **run)
    finally:
        log.close()
    _finalize(out, cfg, frames_u8, time.time() - t_start)
    return out


def _restore(bb, cfg: TrainConfig, stage, point, ti, gen) -> tuple[int, torch.optim.Optimizer]:
    """Load a checkpoint's adapter weights, optimizer and RNG state into a freshly built stage."""
    name, _, folder = point
    if name == "t_lora":
        lora.load_lora_weights(bb.unet, folder / "t_lora", T_LORA)
    else:
        _load_absorbers(bb, cfg, folder, ti)
    opt = make_optimizer(stage)
    return resume_mod.load_state(folder, opt, gen), opt


def _load_absorbers(bb, cfg: TrainConfig, folder: Path, ti: TextualInversion | None) -> None:
    if cfg.uses_s_lora:
        lora.load_lora_weights(bb.unet, folder / "s_lora", S_LORA)
    if ti is not None:
        ti.load_rows(folder / "textual_inversion.safetensors")


def _t_lora_meta(bb, cfg: TrainConfig, step: int) -> dict:
    return {"kind": "temporal", "base": cfg.base, "placement": cfg.placement, "rank": cfg.t_lora_rank,
            "alpha": cfg.t_lora_alpha, "prompt": cfg.prompt, "spatial_prompt": cfg.spatial_prompt,
            "absorbers": cfg.absorbers, "step": step,
            "validation": {"prompts": validation_prompts(cfg), "seed": cfg.validation_seed, "frames": cfg.frames,
                           "size": list(cfg.size), "steps": cfg.sample_steps, "guidance": cfg.guidance,
                           "weight": cfg.lora_weight},
            **_base_meta(bb)}


def _base_meta(bb) -> dict:
    """What an adapter records about its base, so `cav generate` rebuilds the same model."""
    return {"family": bb.family, **({"motion_adapter": bb.motion_adapter} if bb.motion_adapter else {})}


def _write_absorbers(bb, cfg: TrainConfig, folder: Path, ti: TextualInversion | None) -> None:
    if cfg.uses_s_lora:
        config = (bb.unet.peft_config[S_LORA] if cfg.s_lora_from else
                  lora.lora_config("spatial", cfg.placement, cfg.s_lora_rank, cfg.s_lora_alpha, bb.family))
        meta = {"kind": "spatial", "base": cfg.base, "placement": cfg.placement, "rank": config.r,
                "alpha": config.lora_alpha, "prompt": cfg.spatial_prompt or cfg.prompt, **_base_meta(bb),
                **({"from": cfg.s_lora_from} if cfg.s_lora_from else {})}
        lora.save_lora(bb.unet, S_LORA, config, folder / "s_lora", meta)
    if ti is not None:
        ti.save(folder / "textual_inversion.safetensors")


def _save_absorbers(bb, cfg: TrainConfig, out: Path, ti: TextualInversion | None) -> None:
    """Publish the trained absorbers as ``absorbers/`` (built aside, then renamed into place)."""
    tmp, final = out / ".absorbers.tmp", out / "absorbers"
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_absorbers(bb, cfg, tmp, ti)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _absorber_checkpoint(bb, cfg: TrainConfig, out: Path, ti, step: int, opt, gen_state) -> None:
    with resume_mod.CheckpointWriter(out, "absorbers", step) as tmp:
        _write_absorbers(bb, cfg, tmp, ti)
        resume_mod.save_state(tmp, "absorbers", step, opt, gen_state)


def _checkpoint(bb, cfg: TrainConfig, out: Path, lora_cfg, step: int, active: list[str], opt, gen_state,
                samples: bool = True) -> None:
    """Save T-LoRA, trainer state and validation samples made exactly as `cav generate` makes them."""
    from .data.video import write_video

    with resume_mod.CheckpointWriter(out, "t_lora", step) as ckpt:
        lora.save_lora(bb.unet, T_LORA, lora_cfg, ckpt / "t_lora", _t_lora_meta(bb, cfg, step))
        resume_mod.save_state(ckpt, "t_lora", step, opt, gen_state)
        if not samples:
            return
        lora.activate(bb.unet, [T_LORA], [cfg.lora_weight])  # only the T-LoRA, as at inference
        try:
            with accel.on_device(bb.device, bb.vae, bb.text_encoder):
                videos = [sample_video(bb, prompt, frames=cfg.frames, size=tuple(cfg.size), steps=cfg.sample_steps,
                                       guidance=cfg.guidance, seed=cfg.validation_seed)
                          for prompt in validation_prompts(cfg)]
        finally:
            lora.activate(bb.unet, active, trainable=T_LORA)
        for i, video in enumerate(videos):
            for ext in (".mp4", ".gif"):
                write_video(ckpt / "samples" / f"sample-{i}{ext}", video)
            with atomic_path(ckpt / "samples" / f"sample-{i}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, video, allow_pickle=False)


def _finalize(out: Path, cfg: TrainConfig, reference: np.ndarray, seconds: float) -> None:
    """Publish the last checkpoint as the run's T-LoRA and samples, plus a contact sheet."""
    from .data.video import write_contact_sheet

    ckpts = sorted(d for d in (out / "checkpoints").glob("step-*") if (d / "samples").is_dir())
    if not ckpts:
        return
    last = ckpts[-1]
    for name in ("t_lora", "samples"):
        dst = out / name
        tmp = out / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(last / name, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    samples = [np.load(p, allow_pickle=False) for p in sorted((out / "samples").glob("sample-*.npy"))]
    write_contact_sheet(out / "samples" / "contact_sheet.png", [[reference], samples],
                        labels=["reference", f"T-LoRA step {int(last.name[5:])}"])
    write_json(out / "summary.json", {"seconds": round(seconds, 2), "final_checkpoint": last.name})


# -------------------------------------------------------------------------------------------------- generate
def parse_weighted(spec: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` → (path, weight or None); a Windows drive colon or a path with colons but no float suffix is
    kept. None means the adapter's own default: the weight its run validated with (``lora_weight``), else 1."""
    path, sep, weight = str(spec).rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return str(spec), None


def load_adapters(bb, adapters: list[tuple[str, float | None]], image_loras: list[tuple[str, float | None]] = (),
                  textual_inversions: list[str] = ()) -> list[dict]:
    """Load T-LoRAs (and optional spatial LoRAs, TI files) onto ``bb`` and activate them with their weights (None:
    a T-LoRA's recorded ``lora_weight``, else 1)."""
    names, weights, metas = [], [], []
    for i, (path, w) in enumerate(adapters):
        d = lora.find_adapter_dir(Path(path), "temporal")
        meta = lora.load_lora(bb.unet, d, f"t_lora_{i}", expect_kind="temporal", family=bb.family)
        metas.append(meta)
        names.append(f"t_lora_{i}")
        weights.append(default_weight(meta) if w is None else w)
    for j, (path, w) in enumerate(image_loras):
        d = lora.find_adapter_dir(Path(path), "spatial")
        lora.load_lora(bb.unet, d, f"image_lora_{j}", expect_kind="spatial", family=bb.family)
        names.append(f"image_lora_{j}")
        weights.append(1.0 if w is None else w)
    if names:
        lora.activate(bb.unet, names, weights)
    for file in textual_inversions:
        if not Path(file).is_file():
            raise CavError(f"textual inversion file '{file}' does not exist: pass a .safetensors file from absorbers/")
        try:
            bb.pipeline().load_textual_inversion(str(file))
        except ValueError as exc:
            raise CavError(f"could not load textual inversion '{file}': {str(exc).splitlines()[0][:160]}") from None
    return metas


def default_weight(meta: dict) -> float:
    """The weight a T-LoRA's validation samples used (runs before ``lora_weight`` existed: 1)."""
    return float(meta.get("validation", {}).get("weight", 1.0))


def generate(prompt: str, adapters: list[tuple[str, float | None]] = (), *, image_loras=(), textual_inversions=(),
             base: str | None = None, frames: int | None = None, size=None, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, num_videos: int = 1, out="out.mp4", device="auto",
             dtype="auto", negative_prompt: str | None = None, quiet: bool = False,
             motion_adapter: str | None = None) -> list[Path]:
    """Sample ``num_videos`` videos (seeds seed, seed+1, …); writes ``out`` (.mp4) and a .gif beside each."""
    from .data.video import write_video

    if not prompt or not prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video to generate'")
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise CavError(f"--out '{out}' must end in .mp4 (a .gif is written beside it)")
    metas = [lora.read_meta(lora.find_adapter_dir(Path(p), "temporal")) for p, _ in adapters]
    val = metas[0].get("validation", {}) if metas else {}
    base = base or (metas[0].get("base") if metas else None) or "toy"
    if motion_adapter is None and metas and base == metas[0].get("base"):
        motion_adapter = metas[0].get("motion_adapter")  # the adapter's own base: image model + its motion adapter
    bb = backbone_mod.load(base, device, dtype, motion_adapter=motion_adapter)
    load_adapters(bb, list(adapters), list(image_loras), list(textual_inversions))
    frames = frames or val.get("frames") or 16
    size = tuple(size) if size else tuple(val.get("size") or _default_size(bb))
    steps = steps or val.get("steps") or 25
    guidance = guidance if guidance is not None else val.get("guidance", 9.0)
    written = []
    for k in range(num_videos):
        video = sample_video(bb, prompt, frames=frames, size=size, steps=steps, guidance=guidance, seed=seed + k,
                             negative_prompt=negative_prompt, progress=not quiet)
        target = out if num_videos == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        write_video(target, video)
        write_video(target.with_suffix(".gif"), video)
        written.append(target)
    return written


def _default_size(bb) -> tuple[int, int]:
    s = int(bb.unet.config.sample_size) * bb.vae_factor
    return (s, s)
