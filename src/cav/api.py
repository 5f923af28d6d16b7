"""The Python API shared by the CLI, the demo and the benchmarks: ``plan``, ``train``, ``generate``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import accel, preflight
from . import backbone as backbone_mod
from . import resume as resume_mod
from . import runfolder
from .adapters import lora
from .config import SampleConfig, TrainConfig, parse_weighted  # noqa: F401 (parse_weighted: API)
from .errors import CavError
from .sampling import sample_video
from .stages import S_LORA, T_LORA, absorber_stage, given_absorbers, make_textual_inversion, t_lora_stage
from .trainer import JsonlLog, make_optimizer, run_stage

ASSETS = Path(__file__).parent / "assets"


# ----------------------------------------------------------------------------------------------- plan (dry run)
def plan(cfg: TrainConfig) -> dict:
    """Trainable parameters and adapted modules per stage, from the base's config files alone (meta device)."""
    preflight.check_train(cfg)
    unet, family = backbone_mod.empty_unet(cfg.base, cfg.motion_adapter or None)
    unet_config = dict(unet.config)
    stages = []
    if cfg.uses_s_lora and not cfg.absorbers_given:  # given absorbers (--s-lora-from/--ti-from) train nothing
        n = lora.add_lora(unet, S_LORA, cfg.lora_config("spatial", family.name), low_cpu_mem_usage=True)
        stages.append({"name": "s_lora", "trainable_params": lora.count_parameters(unet, S_LORA), "modules": n})
    if cfg.uses_ti and not cfg.absorbers_given:
        dim = _text_hidden_size(cfg.base, unet_config)
        stages.append({"name": "textual_inversion", "trainable_params": cfg.ti_tokens * dim, "modules": 1})
    n = lora.add_lora(unet, T_LORA, cfg.lora_config("temporal", family.name), low_cpu_mem_usage=True)
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
def train(video, cfg: TrainConfig, out, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
          video_options: dict | None = None) -> Path:
    """Run the staged method on one reference video; returns the run folder (its files: ``runfolder.py``).

    With ``resume`` the run continues from its furthest checkpoint (adapters, optimizer, RNG, stage and step), so
    it ends with the same adapters as an uninterrupted run; it must be the same clip, and without selection flags
    it uses the frame selection the run recorded.
    """
    from .data.video import check_exists, read_video, to_tensor

    if not cfg.prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video and its motion'")
    preflight.check_train(cfg)
    out = Path(out)
    runfolder.check(out, overwrite, resume)
    backbone_mod.resolve_dtype(cfg.dtype, backbone_mod.resolve_device(cfg.device))  # fp16 on a CPU: refuse now
    clip = runfolder.clip_record(check_exists(video), {**cfg.frame_selection(), **(video_options or {})})
    if resume:
        clip["selection"] = runfolder.resumed_selection(out, clip)
        if runfolder.finished(out, cfg):
            return out  # nothing left to train: the run and its summary stay as they are
    selection = {k: clip["selection"].get(k) for k in ("stride", "fps", "start", "end")}
    cfg = dataclasses.replace(cfg, **selection)  # config.yaml records the frames actually used
    frames_u8 = read_video(video, frames=cfg.frames, size=tuple(cfg.size), fit=cfg.fit, **clip["selection"])
    runfolder.prepare(out, overwrite)
    point = resume_mod.latest(out) if resume else None
    clock = runfolder.Clock(point)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    bb = backbone_mod.load(cfg.base, cfg.device, cfg.dtype, motion_adapter=cfg.motion_adapter or None)
    accel.tune_backends(bb.device)
    if accel.wants_checkpointing(cfg.gradient_checkpointing, bb.device):
        accel.set_gradient_checkpointing(bb.unet, True)
    if cfg.compile:
        accel.compile_unet(bb.unet)
    runfolder.start(out, cfg, point)
    runfolder.record_clip(out, clip)
    frames = to_tensor(frames_u8)
    log = JsonlLog(out / "log.jsonl")
    run = dict(max_grad_norm=cfg.max_grad_norm, quiet=quiet,
               autocast_dtype=bb.dtype if bb.device.type == "cuda" and bb.dtype != torch.float32 else None)
    try:
        ti = make_textual_inversion(bb, cfg) if cfg.uses_ti else None
        if cfg.absorbers_given:  # --s-lora-from / --ti-from: existing appearance work, no stage 1
            given_absorbers(bb, cfg)
            runfolder.publish_absorbers(bb, cfg, out, ti)
        elif cfg.absorbers != "none":
            stage = absorber_stage(bb, cfg, frames, ti, runfolder.absorber_checkpoint(bb, cfg, out, ti, clock))
            if point and point.stage == "t_lora":  # absorbers finished before the interruption
                runfolder.load_absorbers(bb, cfg, out / "absorbers", ti)
            else:
                start, opt = _restore(bb, cfg, stage, point, ti, gen) if point else (0, None)
                run_stage(bb.unet, bb.scheduler, stage, gen, log, start_step=start, optimizer=opt, **run)
                runfolder.publish_absorbers(bb, cfg, out, ti)
        active = ([S_LORA] if cfg.uses_s_lora else []) + [T_LORA]
        stage = t_lora_stage(bb, cfg, frames, ti, runfolder.t_lora_checkpoint(bb, cfg, out, active, clock))
        t_point = point if point and point.stage == "t_lora" else None
        start, opt = _restore(bb, cfg, stage, t_point, ti, gen) if t_point else (0, None)
        run_stage(bb.unet, bb.scheduler, stage, gen, log, start_step=start, optimizer=opt, **run)
    finally:
        log.close()
    runfolder.finalize(out, frames_u8, clock)
    return out


def _restore(bb, cfg: TrainConfig, stage, point: resume_mod.ResumePoint, ti, gen) -> tuple[int, torch.optim.Optimizer]:
    """Load a checkpoint's adapter weights, optimizer and RNG state into a freshly built stage."""
    if point.stage == "t_lora":
        lora.load_lora_weights(bb.unet, point.folder / "t_lora", T_LORA)
    else:
        runfolder.load_absorbers(bb, cfg, point.folder, ti)
    opt = make_optimizer(stage)
    return resume_mod.load_state(point.folder, opt, gen), opt


# -------------------------------------------------------------------------------------------------- generate
def load_adapters(bb, adapters: list[tuple[str, float | None]], image_loras: list[tuple[str, float | None]] = (),
                  textual_inversions: list[str] = (), default: float | None = None) -> list[dict]:
    """Load T-LoRAs (and optional spatial LoRAs, TI files) onto ``bb`` and activate them with their weights (None:
    ``default``, else a T-LoRA's recorded ``lora_weight``, else 1)."""
    names, weights, metas = [], [], []
    for i, (path, w) in enumerate(adapters):
        d = lora.find_adapter_dir(Path(path), "temporal")
        meta = lora.load_lora(bb.unet, d, f"t_lora_{i}", expect_kind="temporal", family=bb.family)
        metas.append(meta)
        names.append(f"t_lora_{i}")
        weights.append(w if w is not None else default if default is not None else default_weight(meta))
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


def sample_settings(adapters: list[tuple[str, float | None]] = ()) -> SampleConfig:
    """What `cav generate` samples with unless told otherwise: the first T-LoRA's recorded validation settings
    (frames, size, steps, guidance), else SampleConfig's defaults."""
    if not adapters:
        return SampleConfig()
    meta = lora.read_meta(lora.find_adapter_dir(Path(adapters[0][0]), "temporal"))
    return SampleConfig.from_validation(meta.get("validation", {}))


def output_files(out, num_videos: int, overwrite: bool = False) -> list[Path]:
    """The videos ``generate`` will write (``out``, or ``out-k`` for several), checked before any sampling: the
    format, a folder in the way, an existing file or its sidecar (unless ``overwrite``), an unwritable folder."""
    out = Path(out)
    if out.is_dir():
        raise CavError(f"--out '{out}' is a folder: pass a video file name, e.g. {out / 'out.mp4'}")
    other = {".mp4": ".gif", ".gif": ".mp4"}.get(out.suffix.lower())
    if other is None:
        raise CavError(f"--out '{out}' must end in .mp4 or .gif (the other format is written beside it)")
    targets = [out] if num_videos == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(num_videos)]
    for path in (p for t in targets for p in (t, t.with_suffix(other))):
        if path.is_dir():
            raise CavError(f"'{path}' is a folder: pass another --out")
        if path.exists() and not overwrite:
            raise CavError(f"'{path}' exists: pass --overwrite to replace it, or another --out")
    runfolder.check_writable(out.parent)
    return targets


def generate(prompt: str, adapters: list[tuple[str, float | None]] = (), *, sample: SampleConfig | None = None,
             image_loras=(), textual_inversions=(), base: str | None = None, out="out.mp4", overwrite: bool = False,
             device="auto", dtype="auto", quiet: bool = False, motion_adapter: str | None = None,
             **settings) -> list[Path]:
    """Sample ``num_videos`` videos (seeds seed, seed+1, …); writes ``out`` (.mp4 or .gif) and the other format
    beside each. Settings: ``sample`` (None: the first adapter's recorded ones, see ``sample_settings``), then the
    SampleConfig fields given in ``settings`` (``steps=10``, ``seed=3``; None means "not given"); ``size`` None: the
    base's native size."""
    from .data.video import write_video

    if not prompt or not prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video to generate'")
    sample = (sample or sample_settings(adapters)).updated(**settings)
    targets = output_files(out, sample.num_videos, overwrite)
    metas = [lora.read_meta(lora.find_adapter_dir(Path(p), "temporal")) for p, _ in adapters]
    base = base or (metas[0].get("base") if metas else None) or "toy"
    if motion_adapter is None and metas and base == metas[0].get("base"):
        motion_adapter = metas[0].get("motion_adapter")  # the adapter's own base: image model + its motion adapter
    bb = backbone_mod.load(base, device, dtype, motion_adapter=motion_adapter)
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
