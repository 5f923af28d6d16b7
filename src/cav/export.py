"""`cav export`: write a run's T-LoRA in the file layout another tool loads.

Formats are fields of the family rows (``families.Family.exports``: a family lists the layouts its T-LoRAs go to;
an ``ExportFormat`` holds the converter of the peft state and the default file name). (The diffusers LoRA layout
needs no export: every adapter folder already holds ``pytorch_lora_weights.safetensors``.) A T-LoRA of one expert of
a two-expert base (Wan 2.2 A14B) is written as that expert's file of the pair (``ExportFormat.expert_suffixes``), a
T-LoRA of both experts as the pair.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import families
from .adapters import lora
from .errors import CavError
from .io_utils import save_safetensors


FORMATS = families.export_formats()  # every format a family lists, by name


def export(run: str | Path, fmt: str | None = None, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert the T-LoRA of ``run`` (a run, checkpoint or adapter folder) to ``fmt`` (None: the first format of the
    run's family); returns the written file (the first of them: see ``export_files``)."""
    return export_files(run, fmt, out, overwrite)[0]


def export_files(run: str | Path, fmt: str | None = None, out: str | Path | None = None,
                 overwrite: bool = False) -> list[Path]:
    """``export``, returning every file written: one, or on a two-expert base one per expert the T-LoRA trained on
    (``--experts both``: the pair)."""
    from safetensors.torch import load_file

    if fmt is not None and fmt not in FORMATS:
        raise CavError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    folder = lora.find_adapter_dir(Path(run), "temporal")
    meta = lora.read_meta(folder)
    family = meta.get("family", families.LEGACY.name)
    if fmt is None:
        own = families.get(family).exports
        if not own:
            raise CavError(f"T-LoRA '{folder}' was trained on a {family} base, which has no export layout: its "
                           f"{lora.DIFFUSERS_WEIGHTS} is already diffusers' layout")
        fmt = own[0].name
    spec = FORMATS[fmt]
    if spec not in families.get(family).exports:
        takes = [f.name for f in families.FAMILIES.values() if spec in f.exports]
        raise CavError(f"T-LoRA '{folder}' was trained on a {family} base ({meta.get('base', 'unknown')}): "
                       f"--format {fmt} needs a T-LoRA trained on a {' or '.join(takes)} base")
    config = json.loads((folder / lora.CONFIG).read_text())
    target = Path(out) if out else Path(run) / "export" / spec.filename
    if target.suffix != ".safetensors":
        raise CavError(f"--out '{target}' must end in .safetensors")
    files = _per_expert(load_file(str(folder / lora.WEIGHTS)), target, spec, meta.get("expert_parts") or [])
    for path in files:
        if path.exists() and not overwrite:
            raise CavError(f"'{path}' already exists: pass --overwrite to replace it, or another --out")
    info = {**({"cav_expert": meta["experts"]} if meta.get("experts") else {}), "format": "pt", "cav_layout": fmt,
            "cav_rank": str(config["r"]), "cav_alpha": str(config["lora_alpha"]),
            "cav_base": str(meta.get("base", "")), "cav_family": family, "cav_step": str(meta.get("step", "")),
            "cav_note": spec.note}
    return [save_safetensors(path, spec.convert(state, int(config["r"]), float(config["lora_alpha"])), metadata=info)
            for path, state in files.items()]


def _per_expert(state: dict, target: Path, spec, parts: list[str]) -> dict[Path, dict]:
    """Where each part of a T-LoRA's state goes: all of it to ``target``; a T-LoRA of one expert of a two-expert base
    to that expert's file of the pair; one of both experts (keys prefixed by the expert: ``backbone.Experts``) split
    into the pair."""
    if not parts:
        return {target: state}
    if len(parts) == 1:
        return {_expert_file(target, spec, parts[0]): state}
    return {_expert_file(target, spec, p): sub for p, sub in lora.by_part(state, tuple(parts)).items()}


def _expert_file(target: Path, spec, part: str) -> Path:
    """``<stem>_<suffix>.safetensors`` of the expert component ``part`` (Wan: ``_high_noise`` for ``transformer``,
    ``_low_noise`` for ``transformer_2``): the other expert's run writes the other file of the pair beside it."""
    suffixes = dict(spec.expert_suffixes)
    if part not in suffixes:
        raise CavError(f"--format {spec.name} has no file for expert '{part}': pick a format that names experts")
    return target.with_name(f"{target.stem}_{suffixes[part]}{target.suffix}")
