"""Exact resume: checkpoint folders hold adapters plus the trainer state (optimizer, RNG, stage, step).

Each checkpoint folder is published with ``io_utils.publish_dir`` (built under a temporary name, renamed into
place), so a kill during a save leaves the previous checkpoint intact and never a half-written one under a
checkpoint's name. All tensors go to safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from . import versioned
from .io_utils import publish_dir, save_safetensors, write_text

STAGE_ORDER = {"absorbers": 0, "t_lora": 1}


def checkpoint_name(stage: str, step: int, clip_index: int = 0) -> str:
    """``step-N`` (T-LoRA), ``absorbers-step-N`` (the first clip's absorbers), ``absorbers-clip-K-step-N`` (clip K ≥ 1
    of a run on several clips, counted from 0 as ``absorbers/clip-K``)."""
    if stage == "t_lora":
        return f"step-{step:06d}"
    return f"{stage}-{f'clip-{clip_index}-' if clip_index else ''}step-{step:06d}"


def CheckpointWriter(run: Path, stage: str, step: int, clip_index: int = 0):
    """``with CheckpointWriter(run, stage, step) as tmp:`` fill ``tmp``; on success it becomes the checkpoint."""
    return publish_dir(Path(run) / "checkpoints" / checkpoint_name(stage, step, clip_index))


class StageKey(NamedTuple):
    """A stage of a run's plan as its checkpoints record it (``state.json``'s ``stage`` and ``clip``): the trainer
    stage and, for absorbers, the number of the clip they absorb (from 0). Written ``absorbers/clip-K`` or
    ``t_lora``; a resumed run looks the key of its latest checkpoint up in its plan."""

    stage: str
    clip_index: int = 0

    def __str__(self) -> str:
        return self.stage if self.stage == "t_lora" else f"{self.stage}/clip-{self.clip_index}"

    def checkpoint_name(self, step: int) -> str:
        return checkpoint_name(self.stage, step, self.clip_index)


class ResumePoint(NamedTuple):
    """Where a run continues: the stage and step of its furthest checkpoint, and that checkpoint's folder; ``clip``
    (``state.json``'s name): the number of the clip whose absorbers the checkpoint holds (several clips train their
    absorbers one after another); ``key``: the plan's key of it all."""

    stage: str
    step: int
    folder: Path
    clip: int = 0

    @property
    def key(self) -> StageKey:
        return StageKey(self.stage, self.clip)

    @property
    def order(self) -> tuple[int, int, int]:
        return step_order(self.stage, self.clip, self.step)


def step_order(stage: str, clip_index: int, step: int) -> tuple[int, int, int]:
    """Training order of a step: stage 1 clip by clip, then stage 2 (T-LoRA steps carry clip 0)."""
    return (STAGE_ORDER[stage], clip_index, step)


def save_state(directory: Path, stage: str, step: int, optimizer: torch.optim.Optimizer, gen_state: torch.Tensor,
               elapsed_seconds: float | None = None, clip_index: int = 0) -> None:
    opt = optimizer.state_dict()
    tensors = {"rng.generator": gen_state, "rng.torch": torch.get_rng_state()}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    save_safetensors(Path(directory) / "state.safetensors", tensors)
    meta = {"stage": stage, "step": step, "param_groups": opt["param_groups"],
            **({"clip": clip_index} if clip_index else {})}
    if elapsed_seconds is not None:
        meta["elapsed_seconds"] = elapsed_seconds
    versioned.write(Path(directory) / "state.json", meta)


def load_state(directory: Path, optimizer: torch.optim.Optimizer, gen: torch.Generator) -> int:
    from safetensors.torch import load_file

    meta = versioned.read(Path(directory) / "state.json")
    tensors = load_file(str(Path(directory) / "state.safetensors"))
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["param_groups"]):
        saved["params"] = group["params"]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def latest(run: Path) -> ResumePoint | None:
    """The furthest checkpoint that holds a trainer state: (stage, step, folder)."""
    best = None
    for d in (Path(run) / "checkpoints").glob("*step-*"):
        if d.name.startswith(".") or not (d / "state.json").is_file():
            continue
        meta = versioned.read(d / "state.json")
        point = ResumePoint(meta["stage"], int(meta["step"]), d, int(meta.get("clip", 0)))
        if best is None or point.order > best.order:
            best = point
    return best


def truncate_log(path: Path, stage: str, step: int, clip_index: int = 0) -> None:
    """Drop log lines written after the checkpoint a run resumes from (absorber lines of a run on several clips
    carry their ``clip``)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if step_order(rec["stage"], int(rec.get("clip", 0)), rec["step"]) <= step_order(stage, clip_index, step):
            keep.append(line)
    write_text(path, "".join(x + "\n" for x in keep))
