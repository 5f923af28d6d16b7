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
from .config import SampleConfig, TrainConfig, dump_yaml, parse_weighted  # noqa: F401 (parse_weighted: API)
from .errors import CavError
from .io_utils import atomic_path, check_new_files, write_json, write_text
from .sampling import sample_video
from .stages import S_LORA, T_LORA, absorber_stage, t_lora_stage
from .trainer import JsonlLog, make_optimizer, run_stage

ASSETS = Path(__file__).parent / "assets"
RUN_MARKERS = ("config.yaml", "log.jsonl", "t_lora", "checkpoints", "absorbers")


# ----------------------------------------------------------------------------------------------- plan (dry run)
def plan(cfg: TrainConfig) -> dict:
    """Trainable parameters and adapted modules per stage, from the base's config files alone (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet3DConditionModel

    unet_config = backbone_mod.read_unet_config(cfg.base)
    with init_empty_weights():
        unet = UNet3DConditionModel.from_config(unet_config)
    stages = []
    if cfg.uses_s_lora:
        n = lora.add_lora(unet, S_LORA, lora.lora_config("spatial", cfg.placement, cfg.s_lora_rank, cfg.s_lora_alpha),
                          low_cpu_mem_usage=True)
        stages.append({"name": "s_lora", "trainable_params": lora.count_parameters(unet, S_LORA), "modules": n})
    if cfg.uses_ti:
        dim = _text_hidden_size(cfg.base, unet_config)
        stages.append({"name": "textual_inversion", "trainable_params": cfg.ti_tokens * dim, "modules": 1})
    n = lora.add_lora(unet, T_LORA, lora.lora_config("temporal", cfg.placement, cfg.t_lora_rank, cfg.t_lora_alpha),
                      low_cpu_mem_usage=True)
    stages.append({"name": "t_lora", "trainable_params": lora.count_parameters(unet, T_LORA), "modules": n})
    base_params = sum(p.numel() for n_, p in unet.named_parameters() if ".lora_" not in n_)
    return {"base": cfg.base, "placement": cfg.placement, "absorbers": cfg.absorbers,
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


def train(video, cfg: TrainConfig, out, *, overwrite: bool = False, resume: bool = False,
          quiet: bool = False) -> Path:
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
    backbone_mod.resolve_dtype(cfg.dtype, backbone_mod.resolve_device(cfg.device))  # fp16 on a CPU: refuse now
    frames_u8 = read_video(video, frames=cfg.frames, size=tuple(cfg.size), fit=cfg.fit, **cfg.frame_selection())
    prepare_run_dir(out, overwrite, resume)
    point = resume_mod.latest(out) if resume else None
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    bb = backbone_mod.load(cfg.base, cfg.device, cfg.dtype)
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
        ti = TextualInversion(bb.tokenizer, bb.text_encoder, cfg.ti_token, cfg.ti_tokens, cfg.ti_init) if cfg.uses_ti else None
        if cfg.absorbers != "none":
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
        lora_cfg = lora.lora_config("temporal", cfg.placement, cfg.t_lora_rank, cfg.t_lora_alpha)
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


def _t_lora_meta(cfg: TrainConfig, step: int) -> dict:
    return {"kind": "temporal", "base": cfg.base, "placement": cfg.placement, "rank": cfg.t_lora_rank,
            "alpha": cfg.t_lora_alpha, "prompt": cfg.prompt, "spatial_prompt": cfg.spatial_prompt,
            "absorbers": cfg.absorbers, "step": step,
            "validation": {"prompts": validation_prompts(cfg), **cfg.sample_config().to_validation()}}


def _write_absorbers(bb, cfg: TrainConfig, folder: Path, ti: TextualInversion | None) -> None:
    if cfg.uses_s_lora:
        meta = {"kind": "spatial", "base": cfg.base, "placement": cfg.placement, "rank": cfg.s_lora_rank,
                "alpha": cfg.s_lora_alpha, "prompt": cfg.spatial_prompt or cfg.prompt}
        lora.save_lora(bb.unet, S_LORA, lora.lora_config("spatial", cfg.placement, cfg.s_lora_rank, cfg.s_lora_alpha),
                       folder / "s_lora", meta)
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
        lora.save_lora(bb.unet, T_LORA, lora_cfg, ckpt / "t_lora", _t_lora_meta(cfg, step))
        resume_mod.save_state(ckpt, "t_lora", step, opt, gen_state)
        if not samples:
            return
        lora.activate(bb.unet, [T_LORA], [cfg.lora_weight])  # only the T-LoRA, as at inference
        sample = cfg.sample_config()
        try:
            with accel.on_device(bb.device, bb.vae, bb.text_encoder):
                videos = [sample_video(bb, prompt, frames=sample.frames, size=sample.size, steps=sample.steps,
                                       guidance=sample.guidance, seed=sample.seed)
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
def load_adapters(bb, adapters: list[tuple[str, float | None]], image_loras: list[tuple[str, float | None]] = (),
                  textual_inversions: list[str] = (), default: float | None = None) -> list[dict]:
    """Load T-LoRAs (and optional spatial LoRAs, TI files) onto ``bb`` and activate them with their weights (None:
    ``default``, else a T-LoRA's recorded ``lora_weight``, else 1)."""
    names, weights, metas = [], [], []
    for i, (path, w) in enumerate(adapters):
        d = lora.find_adapter_dir(Path(path), "temporal")
        meta = lora.load_lora(bb.unet, d, f"t_lora_{i}", expect_kind="temporal")
        metas.append(meta)
        names.append(f"t_lora_{i}")
        weights.append(w if w is not None else default if default is not None else default_weight(meta))
    for j, (path, w) in enumerate(image_loras):
        d = lora.find_adapter_dir(Path(path), "spatial")
        lora.load_lora(bb.unet, d, f"image_lora_{j}", expect_kind="spatial")
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


def sample_settings(adapters: list[tuple[str, float | None]] = ()) -> SampleConfig:
    """What `cav generate` samples with unless told otherwise: the first T-LoRA's recorded validation settings
    (frames, size, steps, guidance), else SampleConfig's defaults."""
    if not adapters:
        return SampleConfig()
    meta = lora.read_meta(lora.find_adapter_dir(Path(adapters[0][0]), "temporal"))
    return SampleConfig.from_validation(meta.get("validation", {}))


def output_files(out, num_videos: int, overwrite: bool = False) -> list[Path]:
    """The videos ``generate`` will write (``out``, or ``out-k`` for several), checked before any sampling: the
    format, an existing file (unless ``overwrite``), a folder in the way, a folder that cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise CavError(f"--out '{out}' is a folder: pass a video file name, e.g. {out / 'out.mp4'}")
    other = {".mp4": ".gif", ".gif": ".mp4"}.get(out.suffix.lower())
    if other is None:
        raise CavError(f"--out '{out}' must end in .mp4 or .gif (the other format is written beside it)")
    targets = [out] if num_videos == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(num_videos)]
    check_new_files([p for t in targets for p in (t, t.with_suffix(other))], overwrite=overwrite, flag="--out")
    return targets


def generate(prompt: str, adapters: list[tuple[str, float | None]] = (), *, sample: SampleConfig | None = None,
             image_loras=(), textual_inversions=(), base: str | None = None, out="out.mp4", overwrite: bool = False,
             device="auto", dtype="auto", quiet: bool = False) -> list[Path]:
    """Sample ``sample.num_videos`` videos (seeds seed, seed+1, …); writes ``out`` (.mp4 or .gif) and the other
    format beside each. ``sample`` None: ``sample_settings(adapters)``; its ``size`` None: the base's native size."""
    from .data.video import write_video

    if not prompt or not prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video to generate'")
    sample = sample or sample_settings(adapters)
    targets = output_files(out, sample.num_videos, overwrite)
    metas = [lora.read_meta(lora.find_adapter_dir(Path(p), "temporal")) for p, _ in adapters]
    base = base or (metas[0].get("base") if metas else None) or "toy"
    bb = backbone_mod.load(base, device, dtype)
    load_adapters(bb, list(adapters), list(image_loras), list(textual_inversions), default=sample.lora_weight)
    size = tuple(sample.size or _default_size(bb))
    for k, target in enumerate(targets):
        video = sample_video(bb, prompt, frames=sample.frames, size=size, steps=sample.steps, guidance=sample.guidance,
                             seed=sample.seed + k, negative_prompt=sample.negative_prompt, progress=not quiet)
        for path in (target, target.with_suffix(".gif" if target.suffix.lower() == ".mp4" else ".mp4")):
            write_video(path, video)
    return targets


def _default_size(bb) -> tuple[int, int]:
    s = int(bb.unet.config.sample_size) * bb.vae_factor
    return (s, s)
