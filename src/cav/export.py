"""`cav export`: write a run's T-LoRA in the file layout another tool loads.

Formats are rows of ``FORMATS``: the base family a T-LoRA must come from, the converter of its peft state, and the
default file name. (The diffusers LoRA layout needs no export: every adapter folder already holds
``pytorch_lora_weights.safetensors``.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters import lora, motion_lora
from .errors import CavError
from .io_utils import save_safetensors


@dataclass(frozen=True)
class ExportFormat:
    families: tuple[str, ...]  # the base families whose T-LoRAs the layout holds
    convert: Callable  # (peft state, rank, alpha) -> state in the target layout
    filename: str
    describe: str


FORMATS = {
    # SDXL motion modules are named as SD 1.5's in the original AnimateDiff code (sdxl branch), so the layout holds both
    "animatediff": ExportFormat(("animatediff", "animatediff-sdxl"), motion_lora.to_animatediff,
                                "animatediff_motion_lora.safetensors",
                                "the original AnimateDiff MotionLoRA key layout"),
}


def export(run: str | Path, fmt: str = "animatediff", out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert the T-LoRA of ``run`` (a run, checkpoint or adapter folder) to ``fmt``; returns the written file."""
    from safetensors.torch import load_file

    if fmt not in FORMATS:
        raise CavError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    folder = lora.find_adapter_dir(Path(run), "temporal")
    meta = lora.read_meta(folder)
    family = meta.get("family", "unet3d")
    if family not in spec.families:
        raise CavError(f"T-LoRA '{folder}' was trained on a {family} base ({meta.get('base', 'unknown')}): "
                       f"--format {fmt} needs a T-LoRA trained on a {' or '.join(spec.families)} base")
    config = json.loads((folder / lora.CONFIG).read_text())
    converted = spec.convert(load_file(str(folder / lora.WEIGHTS)), int(config["r"]), float(config["lora_alpha"]))
    target = Path(out) if out else Path(run) / "export" / spec.filename
    if target.suffix != ".safetensors":
        raise CavError(f"--out '{target}' must end in .safetensors")
    if target.exists() and not overwrite:
        raise CavError(f"'{target}' already exists: pass --overwrite to replace it, or another --out")
    info = {"format": "pt", "cav_layout": fmt, "cav_rank": str(config["r"]), "cav_alpha": str(config["lora_alpha"]),
            "cav_base": str(meta.get("base", "")), "cav_family": family, "cav_step": str(meta.get("step", "")),
            "cav_note": "lora_alpha/r is folded into the up weights: load with alpha (strength) 1.0"}
    return save_safetensors(target, converted, metadata=info)
