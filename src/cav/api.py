"""The Python API shared by the CLI, the demo and the benchmarks: ``plan``, ``train``, ``generate``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable


from . import native, preflight
from . import estimate as estimate_mod
from . import backbone as backbone_mod
from . import generation
from . import resume as resume_mod
from . import runfolder
from .adapters import lora
from .config import FRAME_SELECTION, SampleConfig, TrainConfig, parse_weighted  # noqa: F401 (parse_weighted: API)
from .errors import CavError
from .run import Run, stage_keys
from .sampling import sample_with
from .stages import T_LORA, s_lora_name

ASSETS = Path(__file__).parent / "assets"
logger = logging.getLogger("cav")


# ----------------------------------------------------------------------------------------------- plan (dry run)
def plan(cfg: TrainConfig, clips: int = 1, estimate: bool = False) -> dict:
    """Trainable parameters and adapted modules per stage, from the base's config files alone (meta device). With
    several ``clips`` stage 1 lists each clip's own absorbers (``clip`` and ``spatial_prompt`` name them). Also what
    the run will do (``estimate.statement``: size, frames, steps per stage, device, dtype, the base's native
    settings and a warning when far from them) and, with ``estimate``, its wall time measured on this machine."""
    cfg.check_clips(clips)
    preflight.check_train(cfg)
    unet, family = backbone_mod.empty_unet(cfg.base, cfg.motion_adapter or None)
    unet_config = dict(unet.config)
    stages = []
    trained = [] if cfg.absorbers.given else stage_keys(cfg, clips)[:-1]  # given absorbers (--s-lora-from…): none
    for k in (key.clip_index for key in trained):  # the run's plan: each clip's absorbers, then the T-LoRA
        own = {"clip": k, "spatial_prompt": cfg.spatial_prompt_of(k)} if clips > 1 else {}
        if cfg.absorbers.uses_s_lora:
            name = s_lora_name(k)
            n = lora.add_lora(unet, name, cfg.lora_config("spatial", family), low_cpu_mem_usage=True)
            stages.append({"name": name, "trainable_params": lora.count_parameters(unet, name), "modules": n, **own})
        if cfg.absorbers.uses_ti:  # the condition's own absorber (token rows; Wan: prompt vectors)
            stages.append({**family.condition.ti.plan_row(cfg, unet_config, family, k if clips > 1 else None), **own})
    n = lora.add_lora(unet, T_LORA, cfg.lora_config("temporal", family), low_cpu_mem_usage=True)
    share = family.targets.heads(cfg.motion.placement)  # heads measured on the clip: every block counted, at most
    stages.append({"name": "t_lora", "trainable_params": lora.count_parameters(unet, T_LORA), "modules": n,
                   **({"clips": clips} if clips > 1 else {}),
                   **({"heads_share": share, "upper_bound": "heads are chosen on the clip"} if share else {})})
    expert = backbone_mod.check_experts(cfg.base, cfg.motion.experts or None, family)
    if expert:  # a two-expert base: every LoRA trains on the chosen expert(s) (an untrained one samples, frozen)
        parts = backbone_mod.expert_parts(family, expert)  # both: each LoRA row once per expert; the text
        ti = family.condition.ti.name  # condition's absorber (TI tokens, prompt vectors) is one for both
        stages = [row for s in stages for row in
                  ([s] if s["name"].startswith(ti) else [{**s, "expert": p} for p in parts])]
    base_params = sum(p.numel() for n_, p in unet.named_parameters() if ".lora_" not in n_)
    resolved = backbone_mod.resolve_base(cfg.base)
    memory = ({"memory": family.memory(cfg, lambda name: backbone_mod._read_json(resolved, name, "base"))}
              if family.memory else {})
    return {"base": cfg.base, "family": family.name, "model_class": family.model_class, "placement": cfg.motion.placement,
            "absorbers": cfg.absorbers.kind, **({"experts": expert} if expert else {}), "unet_params": base_params,
            "stages": stages, **({"clips": clips} if clips > 1 else {}), **memory,
            **estimate_mod.statement(cfg, clips, measure=estimate, unet_params=base_params)}


# ----------------------------------------------------------------------------------------------------- train
def train(video, cfg: TrainConfig, out, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
          video_options: dict | None = None, announce: Callable[[dict], None] | None = None,
          estimate: bool = True, swap_on_cpu: bool = False) -> Path:
    """Run the staged method on one reference video (or a list of clips of one motion); returns the run folder
    (its stage plan, resume and hooks: ``run.py``; its files: ``runfolder.py``).

    With ``resume`` the run continues from its furthest checkpoint (adapters, optimizer, RNG, stage, clip and step),
    so it ends with the same adapters as an uninterrupted run; it must be the same clips in the same order (and the
    same ``--s-lora-from``/``--ti-from`` files), and without selection flags it uses the frame selection the run
    recorded. Several clips: each gets its own absorbers in stage 1 (own S-LoRA, TI tokens ``cfg.absorbers.clip_token(k)``,
    spatial prompt), and stage 2 trains one T-LoRA over all of them. Validation samples start as ``cfg``'s
    ``validation_*`` start options say (the reference: the run's first clip), as `cav generate` would. The process
    holds ``out``'s lock (``runlock.py``) from before anything in it changes to the end: a second training, an
    ``overwrite`` or a ``resume`` of a folder being trained is refused with one line.

    A size or frame count far from the base's native settings is warned about (``native.warning``). ``announce``
    is called, once every input is checked and before any training, with what the run will do
    (``estimate.statement``; with ``estimate``, its wall time measured on this machine). ``swap_on_cpu``:
    ``--offload-frozen`` swaps a DiT's blocks on a CPU too, with the CPU as both devices (``run.Run``): the GPU
    code path on a machine without one, for tests; not a CLI flag.
    """
    from .runlock import RunLock

    videos = [video] if isinstance(video, (str, Path)) else list(video)
    out = Path(out)
    runfolder.check(out, overwrite, resume)  # first: `--resume` of nothing says so, whatever else is missing
    if not cfg.prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video and its motion'")
    if cfg.absorbers.given and len(videos) > 1:
        raise CavError("--s-lora-from / --ti-from give one clip's absorbers: train on one clip, or drop them so "
                       "each clip trains its own")
    preflight.check_train(cfg)
    with RunLock(out, tidy=True):  # one owner (CLI, web app child, batch worker): a second one is refused here
        return _train_owned(videos, cfg, out, overwrite, resume, quiet, video_options, announce, estimate,
                            swap_on_cpu)


def _train_owned(videos: list, cfg: TrainConfig, out: Path, overwrite: bool, resume: bool, quiet: bool,
                 video_options: dict | None, announce: Callable[[dict], None] | None, estimate: bool,
                 swap_on_cpu: bool = False) -> Path:
    """``train`` once this process holds ``out``'s lock: the checks again (the folder may have changed before the
    lock was ours), the inputs read, then the run (``run.Run``: its stage plan, resume, hooks)."""
    from .data.video import check_exists, read_video

    runfolder.check(out, overwrite, resume)
    backbone_mod.resolve_dtype(cfg.system.dtype, backbone_mod.resolve_device(cfg.system.device))  # fp16 on a CPU: refuse now
    records = [runfolder.clip_record(check_exists(v), {**cfg.data.frame_selection(), **(video_options or {})})
               for v in videos]
    clip = records[0]
    cfg = _validation_paths(cfg, len(videos))
    val = cfg.validation.sample_config(run=out.absolute())
    image = generation.read_image_input(val, tuple(cfg.data.size))  # a bad --validation-image: refused before any work
    if resume:
        selection = runfolder.resumed_selection(out, records, cfg)
        for r in records:
            r["selection"] = selection
        if runfolder.finished(out, cfg):
            return out  # nothing left to train: the run and its summary stay as they are
    cfg.check_clips(len(videos))  # after a resume's check of the clips: a wrong clip list is named as such
    frames_u8 = [read_video(v, frames=cfg.data.frames, size=tuple(cfg.data.size), fit=cfg.data.fit, **r["selection"])
                 for v, r in zip(videos, records)]
    selection = {k: clip["selection"].get(k) for k in FRAME_SELECTION}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **selection))  # config.yaml: the frames used
    far = native.warning(cfg)  # once every input is checked: a refused run says only why it is refused
    if far:
        logger.warning(far)
    if announce is not None:  # before the seed is set: the measurement cannot change the run's random draws
        announce(estimate_mod.statement(cfg, len(videos), measure=estimate))
    runfolder.prepare(out, overwrite)
    run = Run(out, cfg, resume_mod.latest(out) if resume else None, quiet, swap_on_cpu)
    run.train(frames_u8, runfolder.data_record(records, cfg), image)
    return out


def _validation_paths(cfg: TrainConfig, clips: int) -> TrainConfig:
    """The validation start's image as an absolute path (its recipe is read from anywhere), its reference clip one
    of the run's."""
    if cfg.validation.reference_clip > clips:
        raise CavError(f"--validation-reference-clip {cfg.validation.reference_clip} is out of range: the run has "
                       f"{clips} clip(s), pass 1 to {clips}")
    if not cfg.validation.image:
        return cfg
    return dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation,
                                                                   image=str(Path(cfg.validation.image).absolute())))


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
    if textual_inversions:  # the condition's own absorber files (token rows; Wan: prompt vectors)
        bb.condition.ti.apply_files(bb, list(textual_inversions))
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


def output_files(out, num_videos: int, overwrite: bool = False, sample: SampleConfig | None = None) -> list[Path]:
    """The videos ``generate`` will write (``out``, ``out-k`` for several, ``out-wW-sS`` for a grid: see
    ``generation.output_names``), checked before any sampling: the format, an existing file (unless ``overwrite``),
    a folder in the way, a folder that cannot be written. Beside each: the other format and its recipe (.json)."""
    out = Path(out)
    if out.is_dir():
        raise CavError(f"--out '{out}' is a folder: pass a video file name, e.g. {out / 'out.mp4'}")
    other = {".mp4": ".gif", ".gif": ".mp4"}.get(out.suffix.lower())
    if other is None:
        raise CavError(f"--out '{out}' must end in .mp4 or .gif (the other format is written beside it)")
    sample = sample or SampleConfig(num_videos=num_videos)
    targets = generation.output_names(out, sample)
    extra = [out.with_name(f"{out.stem}-sheet.png")] if len(targets) > 1 else []
    for path in [p for t in targets for p in (t, t.with_suffix(other), t.with_suffix(".json"))] + extra:
        if path.is_dir():
            raise CavError(f"'{path}' is a folder: pass another --out")
        if path.exists() and not overwrite:
            raise CavError(f"'{path}' exists: pass --overwrite to replace it, or another --out")
    runfolder.check_writable(out.parent)
    return targets


def generate(prompt: str, adapters: list[tuple[str, float | None]] = (), *, sample: SampleConfig | None = None,
             image_loras=(), textual_inversions=(), base: str | None = None, out="out.mp4", overwrite: bool = False,
             device="auto", dtype="auto", quiet: bool = False, motion_adapter: str | None = None,
             recorded: bool = True, **settings) -> list[Path]:
    """Sample one video per entry of ``sample.grid`` (seeds seed, seed+1, … or --weights × --seeds), each from the
    start ``sample`` names (noise, a reference's noise prior or inversion, an image); writes ``out`` (.mp4 or .gif),
    the other format and the recipe (.json) beside each, and ``out-sheet.png`` for several. Settings: ``sample``
    (None: the first adapter's recorded ones, see ``sample_settings``), then the SampleConfig fields given in
    ``settings`` (``steps=10``, ``seed=3``; None means "not given"); ``size`` None: the base's native size.
    ``recorded=False``: the adapters are data from elsewhere (the web app): their ``cav.json`` never names the base or
    motion adapter to load (``base`` is required then)."""
    from .data.video import write_video
    from .io_utils import write_json

    if not prompt or not prompt.strip():
        raise CavError("the prompt is empty: pass --prompt 'a description of the video to generate'")
    sample = (sample or sample_settings(adapters)).updated(**settings)
    if sample.weights and not adapters:
        raise CavError("--weights sets the weight of each --adapter: pass --adapter RUN, or drop --weights")
    targets = output_files(out, sample.num_videos, overwrite, sample)
    metas = [lora.read_meta(lora.find_adapter_dir(Path(p), "temporal")) for p, _ in adapters]
    if not recorded and not base:
        raise CavError("no base model given: pass --base (an adapter's own record is not followed here)")
    base = base or (metas[0].get("base") if metas else None) or "toy"
    if recorded and motion_adapter is None and metas and base == metas[0].get("base"):
        motion_adapter = metas[0].get("motion_adapter")  # the adapter's own base: image model + its motion adapter
    bb = backbone_mod.load(base, device, dtype, motion_adapter=motion_adapter, experts=_trained_expert(adapters, metas))
    check_steps(bb, sample.steps)
    size = tuple(sample.size or _default_size(bb))
    inputs = generation.read_inputs(sample, size)
    metas = load_adapters(bb, list(adapters), list(image_loras), list(textual_inversions), default=sample.lora_weight)
    videos = []
    for target, (weight, seed) in zip(targets, sample.grid):
        used = _set_grid_weight(bb, adapters, image_loras, metas, sample, weight)
        video = sample_with(bb, [prompt], sample, [seed], size=size, progress=not quiet,
                            start=generation.start_for(bb, sample, inputs, seed))[0]
        for path in (target, target.with_suffix(".gif" if target.suffix.lower() == ".mp4" else ".mp4")):
            write_video(path, video)
        write_json(target.with_suffix(".json"), generation.record(prompt, adapters, sample, weight, seed, used))
        videos.append(video)
    if len(targets) > 1:
        generation.write_sheet(Path(out).with_name(f"{Path(out).stem}-sheet.png"), videos, sample)
    return targets


def check_steps(bb, steps: int) -> None:
    """The scheduler takes at most as many denoising steps as it has training timesteps."""
    limit = int(getattr(bb.scheduler.config, "num_train_timesteps", 0) or 0)
    if limit and steps > limit:
        raise CavError(f"steps (--steps) {steps} is more than this base's scheduler has timesteps ({limit}): pass "
                       f"--steps {limit} or fewer")


def _trained_expert(adapters, metas: list[dict]) -> str | None:
    """The expert of a two-expert base the T-LoRAs go on (what each recorded: ``experts``); None: one-expert
    adapters (the base's default). Adapters of different experts cannot be composed on one expert: refused."""
    chosen = {m.get("experts") for m in metas}
    if len(chosen) > 1:
        listed = ", ".join(f"{p} ({m.get('experts') or 'one expert'})" for (p, _), m in zip(adapters, metas))
        raise CavError(f"the adapters were trained on different experts ({listed}): pass adapters of one expert")
    return next(iter(chosen), None)


def _set_grid_weight(bb, adapters, image_loras, metas, sample: SampleConfig, weight: float | None) -> list[float]:
    """Activate the T-LoRAs at the grid's ``weight`` (None: each one's own); returns the T-LoRA weights used."""
    own = [w if w is not None else sample.lora_weight if sample.lora_weight is not None else default_weight(m)
           for (_, w), m in zip(adapters, metas)]
    if weight is None:
        return own
    used = [weight] * len(adapters)
    names = [f"t_lora_{i}" for i in range(len(adapters))] + [f"image_lora_{j}" for j in range(len(image_loras))]
    lora.activate(bb.unet, names, used + [1.0 if w is None else w for _, w in image_loras])
    return used


def _default_size(bb) -> tuple[int, int]:
    return bb.latents.default_size(bb)


# ---------------------------------------------------------------------------------------------------- select
def select(run, clip: str | None = None) -> dict:
    """Score every checkpoint of ``run`` against its reference and publish the best as ``RUN/selected/``
    (``cav.selection``: the scores and the rule); returns what ``RUN/selection.json`` holds."""
    from . import selection

    return selection.select(Path(run), clip)

