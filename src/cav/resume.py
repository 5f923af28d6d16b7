"""Exact resume: checkpoint folders hold adapters plus the trainer state (optimizer, RNG, stage, step).

Each checkpoint folder is built under a temporary name and renamed into place, so a kill during a save leaves the
previous checkpoint intact and never a half-written one under a checkpoint's name. All tensors go to safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .io_utils import save_safetensors, write_json

STAGE_ORDER = {"absorbers": 0, "t_lora": 1}


def checkpoint_name(stage: str, step: int) -> str:
    return f"step-{step:06d}" if stage == "t_lora" else f"{stage}-step-{step:06d}"


class CheckpointWriter:
    """``with CheckpointWriter(run, stage, step) as tmp:`` fill ``tmp``; on success it becomes the checkpoint."""

    def __init__(self, run: Path, stage: str, step: int):
        self.final = Path(run) / "checkpoints" / checkpoint_name(stage, step)
        self.tmp = self.final.parent / f".tmp-{self.final.name}"

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.final.parent / f".old-{self.final.name}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return False


def save_state(directory: Path, stage: str, step: int, optimizer: torch.optim.Optimizer, gen_state: torch.Tensor) -> None:
    opt = optimizer.state_dict()
    tensors = {"rng.generator": gen_state, "rng.torch": torch.get_rng_state()}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    save_safetensors(Path(directory) / "state.safetensors", tensors)
    write_json(Path(directory) / "state.json", {"stage": stage, "step": step, "param_groups": opt["param_groups"]})


def load_state(directory: Path, optimizer: torch.optim.Optimizer, gen: torch.Generator) -> int:
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / "state.json").read_text())
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


def latest(run: Path) -> tuple[str, int, Path] | None:
    """The furthest checkpoint that holds a trainer state: (stage, step, folder)."""
    best = None
    for d in (Path(run) / "checkpoints").glob("*step-*"):
        if d.name.startswith(".") or not (d / "state.json").is_file():
            continue
        meta = json.loads((d / "state.json").read_text())
        key = (STAGE_ORDER[meta["stage"]], meta["step"])
        if best is None or key > best[0]:
            best = (key, (meta["stage"], meta["step"], d))
    return None if best is None else best[1]


def truncate_log(path: Path, stage: str, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if (STAGE_ORDER[rec["stage"]], rec["step"]) <= (STAGE_ORDER[stage], step):
            keep.append(line)
    from .io_utils import write_text

    write_text(path, "".join(x + "\n" for x in keep))
