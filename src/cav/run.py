"""A training run's one owner: ``Run`` executes a declarative plan of stages.

The plan (``stage_plan``) is a list of ``PlannedStage``: each one a key (``absorbers/clip-0``, ``absorbers/clip-1``
…, ``t_lora``: what its checkpoints record), a builder of its ``trainer.Stage`` (lean step included), how it saves and
loads its adapters, where it is published, and its hooks (around its steps: the frozen S-LoRA's merge policy; around
a checkpoint: unmerged; after a checkpoint: validation samples). Several clips are more absorber entries; each
entry's builder turns its clip's number into names (S-LoRA adapter, TI token, spatial prompt, folder) once, so no
function below it sees the number.

``Run.execute`` walks the plan in one loop. Every entry is built, in order (building draws the adapters' random
initial weights, so a resumed run draws what the uninterrupted one drew), then by ``actions``: ``skip`` (finished
before the checkpoint the run continues from: its published adapters are loaded), ``restore`` (that checkpoint holds
it: adapters, optimizer and RNG, then train on), ``train``; a trained entry is then published. Resume is a lookup: the
key of the latest checkpoint in the plan. The files are ``runfolder.py``'s, the trainer state ``resume.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import accel, generation, lean, runfolder, textcache
from . import backbone as backbone_mod
from . import resume as resume_mod
from .config import TrainConfig
from .errors import CavError
from .io_utils import publish_dir
from .resume import ResumePoint, StageKey
from .stages import (ClipInputs, absorber_stage, active_adapters, given_absorbers, make_textual_inversion,
                     measure_heads, s_lora_name, t_lora_stage)
from .trainer import JsonlLog, Stage, make_optimizer, run_stage

NoContext = Callable[[], contextlib.AbstractContextManager]
logger = logging.getLogger("cav")


@dataclass
class PlannedStage:
    """One entry of a run's plan."""

    key: StageKey
    # build(checkpoint) → the stage, its checkpoint callback given; None: nothing to train (given absorbers)
    build: Callable[[Callable], Stage | None]
    save: Callable[[Path, int], None]  # its adapters after ``step`` steps into a folder (checkpoint or published)
    load: Callable[[Path], None]  # its adapters back from such a folder
    published: Path | None = None  # where it is published once trained (None: ``runfolder.finalize`` publishes it)
    log_fields: dict = field(default_factory=dict)  # added to each of its log lines
    around_steps: NoContext = contextlib.nullcontext  # around its training steps (the frozen S-LoRA merged)
    around_checkpoint: NoContext = contextlib.nullcontext  # around each checkpoint (the frozen S-LoRA unmerged)
    after_checkpoint: list[Callable[[Path, int], None]] = field(default_factory=list)  # unless on Ctrl-C


# ------------------------------------------------------------------------------------------------- the plan
def stage_keys(cfg: TrainConfig, clips: int) -> list[StageKey]:
    """The plan's keys: each clip's absorbers (given ones, one clip: the first clip's; none with ``--absorbers
    none``), then the T-LoRA."""
    absorbers = 1 if cfg.absorbers.given else 0 if cfg.absorbers.kind == "none" else clips
    return [StageKey("absorbers", k) for k in range(absorbers)] + [StageKey("t_lora")]


def stage_plan(bb, cfg: TrainConfig, out: Path, frames: list[torch.Tensor],
               starts: generation.StartInputs | None) -> list[PlannedStage]:
    """The plan of a run on the clips ``frames`` (each (F, 3, H, W) in [-1, 1]): the stages of ``stage_keys``."""
    clips = [ClipInputs(f, None, s_lora_name(k) if cfg.absorbers.uses_s_lora else None) for k, f in enumerate(frames)]
    keys = stage_keys(cfg, len(clips))
    if cfg.absorbers.given:
        absorbers = [_given_absorbers(bb, cfg, out, keys[0], clips[0])]
    else:
        absorbers = [_absorbers(bb, cfg, out, key, clips[key.clip_index], len(clips) > 1) for key in keys[:-1]]
    return absorbers + [_t_lora(bb, cfg, out, clips, starts)]


def _absorbers(bb, cfg: TrainConfig, out: Path, key: StageKey, clip: ClipInputs, several: bool) -> PlannedStage:
    """Stage 1 on one clip: its own TI tokens (``cfg.absorbers.clip_token``) and S-LoRA trained on its frames under its spatial
    prompt; published under ``absorbers/`` (``absorbers/clip-K/`` after the first)."""
    k = key.clip_index
    name, prompt = s_lora_name(k), cfg.spatial_prompt_of(k)  # its names: adapter, spatial prompt (TI token: below)

    def build(checkpoint: Callable) -> Stage:
        if cfg.absorbers.uses_ti:  # made here, in training order: clip K's tokens join the text encoder after clip K-1 trained
            clip.ti = make_textual_inversion(bb, cfg, k)
        return absorber_stage(bb, cfg, clip.frames, clip.ti, checkpoint, s_lora=name, prompt=prompt)

    return PlannedStage(
        key, build, save=lambda folder, step: runfolder.write_absorbers(bb, cfg, folder, clip.ti, name, prompt),
        load=lambda folder: runfolder.load_absorbers(bb, cfg, folder, clip.ti, name),
        published=runfolder.absorber_dir(out, k),
        log_fields={"clip": k} if several else {})  # a resume cuts the log of several clips by it


def _given_absorbers(bb, cfg: TrainConfig, out: Path, key: StageKey, clip: ClipInputs) -> PlannedStage:
    """``--s-lora-from`` / ``--ti-from``: existing appearance work instead of stage 1 (one clip), published as
    ``absorbers/``; nothing trains."""
    def build(checkpoint: Callable) -> None:
        if cfg.absorbers.uses_ti:
            clip.ti = make_textual_inversion(bb, cfg)
        given_absorbers(bb, cfg)

    return PlannedStage(key, build, save=lambda folder, step: runfolder.write_absorbers(bb, cfg, folder, clip.ti),
                        load=lambda folder: runfolder.load_absorbers(bb, cfg, folder, clip.ti),
                        published=runfolder.absorber_dir(out, 0))


def _t_lora(bb, cfg: TrainConfig, out: Path, clips: list[ClipInputs],
            starts: generation.StartInputs | None) -> PlannedStage:
    """Stage 2: one T-LoRA over every clip, each step with its clip's absorbers on. One clip: its frozen S-LoRA is
    folded into the weights while the T-LoRA trains and unfolded for checkpoints (several clips switch S-LoRAs per
    step). Checkpoints carry validation samples; ``runfolder.finalize`` publishes the last. A placement that cuts the
    T-LoRA to measured heads (the row's ``targets.heads``) measures them when the stage is built, once: the run
    records them (``runfolder.write_heads``) and a resumed run reads them back instead of measuring again."""
    frozen = lean.FrozenMerge(bb.unet, [clips[0].s_lora] if len(clips) == 1 and clips[0].s_lora else [], bb.swaps)
    chosen: dict = {}  # the T-LoRA's measured heads, once the stage is built (none: every head)

    def build(checkpoint: Callable) -> Stage:
        if bb.family.targets.heads(cfg.motion.placement):
            heads = runfolder.read_heads(out)
            if heads is None:
                heads, mass = measure_heads(bb, cfg, clips)
                runfolder.write_heads(out, cfg.motion.placement, heads, mass)
            chosen["heads"] = heads
        return t_lora_stage(bb, cfg, clips[0].frames, clips[0].ti, checkpoint, clips=clips,
                            heads=chosen.get("heads"))

    return PlannedStage(
        StageKey("t_lora"), build,
        save=lambda folder, step: runfolder.write_t_lora(bb, cfg, folder, step, chosen.get("heads")),
        load=lambda folder: runfolder.load_t_lora(bb, folder),
        around_steps=frozen.merged, around_checkpoint=frozen.unmerged,
        after_checkpoint=[runfolder.validation_samples(bb, cfg, out, starts, active_adapters(clips[0]))])


def actions(keys: list[StageKey], point: StageKey | None) -> list[str]:
    """What a run does with each key of its plan: ``train`` them all, or resumed at checkpoint key ``point``:
    ``skip`` the ones before it (finished), ``restore`` its own, ``train`` the ones after."""
    if point is None:
        return ["train"] * len(keys)
    if point not in keys:
        plan = ", ".join(map(str, keys))
        raise CavError(f"the run's latest checkpoint is of stage {point}, which this run's plan ({plan}) does not "
                       "have: resume with the recipe the run started with, or start a new run with another --out")
    at = keys.index(point)
    return ["skip"] * at + ["restore"] + ["train"] * (len(keys) - at - 1)


# -------------------------------------------------------------------------------------------------- the run
def _load_backbone(cfg: TrainConfig, swap_on_cpu: bool = False):
    """The base to train on, with the accelerations the recipe and the device ask for. ``--offload-frozen`` on a
    family whose row swaps blocks (``Family.block_swap``: a DiT's blocks visit the device one or two at a time) and
    on a GPU: the base loads with its blocks swapped (``backbone.load(swap_blocks=True)``), for the whole run, so
    the blocks are never all on the device: not at load, not in training, not at a checkpoint (S-LoRA unmerged and
    merged again through the swap, saves, validation samples with the swap on). On a CPU it is a no-op with a
    warning (``cav.wan.checks.offload_plan``), unless ``swap_on_cpu`` (``Run``'s) asks for the swap with the CPU as
    both devices."""
    from .wan.checks import offload_plan

    device = backbone_mod.resolve_device(cfg.system.device)
    swap, warning = offload_plan(cfg.system.offload_frozen, device)
    swap = swap or (cfg.system.offload_frozen and swap_on_cpu)
    bb = backbone_mod.load(cfg.base, cfg.system.device, cfg.system.dtype, motion_adapter=cfg.motion_adapter or None,
                           experts=cfg.motion.experts or None, swap_blocks=swap)
    if warning and not swap and bb.family.block_swap is not None:
        logger.warning(f"cav: warning: {warning}")
    if not cfg.validation.prompts:  # the validation prompt is --prompt, whose cut preflight reported: once is enough
        bb.reported.update(runfolder.validation_prompts(cfg))
    accel.tune_backends(bb.device)
    if accel.wants_checkpointing(cfg.system.gradient_checkpointing, bb.device):
        accel.set_gradient_checkpointing(bb.unet, True)
    if accel.wants_compile(cfg.system.compile, bb.device):
        accel.compile_unet(bb.unet, bb.device)
    return bb


class Run:
    """One training run in its folder ``out``: resumed at ``point`` (None: from the start), it owns the backbone,
    the generator, the log and the wall clock, and executes the plan."""

    def __init__(self, out: Path, cfg: TrainConfig, point: ResumePoint | None = None, quiet: bool = False,
                 swap_on_cpu: bool = False):
        """``swap_on_cpu``: ``--offload-frozen`` swaps blocks on a CPU too, the CPU being both the compute and the
        offload device (``backbone.load(swap_blocks=True)``): the GPU code path, checkable on a machine without a
        GPU (the tests use it); without it ``--offload-frozen`` is a no-op on a CPU."""
        self.out, self.cfg, self.point, self.quiet = Path(out), cfg, point, quiet
        self.swap_on_cpu = swap_on_cpu
        self.clock = runfolder.Clock(point)

    @property
    def point_key(self) -> StageKey | None:
        return self.point.key if self.point else None

    def train(self, frames_u8: list[np.ndarray], data: dict, image) -> None:
        """Seed, load the base, record the recipe and the clips (``data``: ``data.json``), execute the plan on the
        clips' frames (uint8), publish the result. ``image``: the validation start's image (or None)."""
        from .data.video import to_tensor

        cfg = self.cfg
        actions(stage_keys(cfg, len(frames_u8)), self.point_key)  # a stranger checkpoint: refused before any write
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)
        self.bb = bb = _load_backbone(cfg, self.swap_on_cpu)
        if bb.condition.encode_once:  # every text of the run encoded now, once; the text encoder released
            bb.text_cache = textcache.TextCache(bb)
            bb.text_cache.encode(textcache.run_texts(cfg, len(frames_u8)))
            bb.text_cache.release()
        runfolder.start(self.out, cfg, self.point)
        runfolder.record_clip(self.out, data)
        val = cfg.validation.sample_config(run=self.out.absolute())
        starts = generation.StartInputs(generation.read_reference(val, tuple(cfg.data.size)), image)  # via the run
        self.log = JsonlLog(self.out / "log.jsonl")
        try:
            self.execute(stage_plan(bb, cfg, self.out, [to_tensor(f) for f in frames_u8], starts))
        finally:
            self.log.close()
        extra = {"block_swap": {"device": str(bb.device), **bb.residency.record()}} if bb.residency else {}
        if bb.text_cache is not None:
            extra["text_encoder"] = bb.text_cache.record()
        runfolder.finalize(self.out, frames_u8[0], self.clock, extra)

    def execute(self, plan: list[PlannedStage]) -> None:
        """Each entry of ``plan`` in order: build it, then skip, restore and train, or train; publish what trained."""
        todo = actions([e.key for e in plan], self.point_key)
        for entry, action in zip(plan, todo):
            stage = entry.build(self._checkpoint(entry))
            if stage is None:  # given absorbers: published as they are
                self._publish(entry, 0)
            elif action == "skip":
                entry.load(entry.published)
            else:
                start, opt = self._restore(entry, stage) if action == "restore" else (0, None)
                with entry.around_steps():
                    run_stage(self.bb.unet, self.bb.scheduler, stage, self.gen, self._log(entry), start_step=start,
                              optimizer=opt, max_grad_norm=self.cfg.max_grad_norm, quiet=self.quiet,
                              autocast_dtype=lean.autocast_dtype(self.bb.device, self.bb.dtype))
                if entry.published is not None:
                    self._publish(entry, stage.steps)

    def _checkpoint(self, entry: PlannedStage):
        """``entry``'s checkpoint callback (``Stage.checkpoint``): its adapters and the trainer state, then its
        ``after_checkpoint`` hooks (not on Ctrl-C: the user is waiting)."""
        key = entry.key

        def save(step: int, opt, gen_state, interrupted: bool) -> None:
            with entry.around_checkpoint(), \
                    resume_mod.CheckpointWriter(self.out, key.stage, step, key.clip_index) as d:
                entry.save(d, step)
                resume_mod.save_state(d, key.stage, step, opt, gen_state, elapsed_seconds=self.clock.total(),
                                      clip_index=key.clip_index)
                if not interrupted:
                    for hook in entry.after_checkpoint:
                        hook(d, step)
        return save

    def _restore(self, entry: PlannedStage, stage: Stage) -> tuple[int, torch.optim.Optimizer]:
        """The checkpoint's adapters, optimizer and RNG state into ``entry``'s freshly built stage."""
        entry.load(self.point.folder)
        opt = make_optimizer(stage)
        return resume_mod.load_state(self.point.folder, opt, self.gen), opt

    def _publish(self, entry: PlannedStage, step: int) -> None:
        with publish_dir(entry.published) as tmp:
            entry.save(tmp, step)

    def _log(self, entry: PlannedStage) -> Callable[[dict], None]:
        fields = entry.log_fields
        return (lambda record: self.log({**record, **fields})) if fields else self.log
