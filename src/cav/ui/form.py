"""The page's form ↔ cav's own objects: recipe presets, the recipe's fields as form values, generation grids.

Every value goes through ``TrainConfig.from_dict`` (as the CLI's flags do), so a bad value gets the CLI's message.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..config import ABSORBERS, PLACEMENTS, TrainConfig, load_recipe
from ..errors import CavError

# fields the page shows outside the "advanced" block (prompts, trimming) or that the server decides
MAIN_FIELDS = ("prompt", "spatial_prompt", "frames")
CHOICES = {"absorbers": ABSORBERS, "placement": PLACEMENTS, "fit": ("crop", "pad"),
           "gradient_checkpointing": ("auto", "on", "off")}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
MAX_GRID = 16  # videos per Generate click: more would keep a CPU busy for long with no way to cancel


def recipe_dir() -> Path:
    """The recipe presets shipped with cav (``configs/`` of the checkout)."""
    return Path(__file__).resolve().parents[3] / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def advanced_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in MAIN_FIELDS]


def kind(f: dataclasses.Field) -> str:
    """How a field is edited: choice | bool | int | float | list | lines | text."""
    if f.name in CHOICES:
        return "choice"
    if f.name == "validation_prompts":
        return "lines"
    return {"bool": "bool", "int": "int", "float": "float", "list": "list"}.get(str(f.type), "text")


def preset_values(name: str, base: str) -> dict:
    """Every TrainConfig field's value under preset ``name`` (its defaults where the preset is silent), as form
    values; the server's ``--base`` replaces the preset's base."""
    data = load_recipe(recipe_dir() / f"{name}.yaml") if name else {}
    cfg = TrainConfig.from_dict({**data, "prompt": "x", "base": base})
    return {f.name: to_form(f, getattr(cfg, f.name)) for f in dataclasses.fields(TrainConfig)}


def to_form(f: dataclasses.Field, value):
    k = kind(f)
    if k == "list":
        return " ".join(str(v) for v in value)
    if k == "lines":
        return "\n".join(value)
    return value


def from_form(f: dataclasses.Field, value):
    """A form value back to the field's type; a list that is not numbers is refused in the CLI's words."""
    k = kind(f)
    if k == "list":
        parts = [p for p in re.split(r"[\s,x×]+", str(value or "").strip()) if p]
        try:
            values = [int(p) if re.fullmatch(r"-?\d+", p) else float(p) for p in parts]
        except ValueError:
            raise CavError(f"{f.name} '{value}' is not a list of numbers: write them with spaces, "
                           f"e.g. {to_form(f, f.default_factory())}") from None
        return values * 2 if f.name == "size" and len(values) == 1 else values  # H means HxH, as --size H
    if k == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if k == "int":
        if value is None or float(value) != int(float(value)):
            raise CavError(f"{f.name} must be a whole number, got {value}")
        return int(float(value))
    if k == "float":
        if value is None:
            raise CavError(f"{f.name} is empty: type a number")
        return float(value)
    if k == "bool":
        return bool(value)
    return str(value or "").strip()


def build_config(prompt: str, spatial_prompt: str, frames, advanced: dict) -> TrainConfig:
    """The TrainConfig of the form (validated as the CLI validates its flags)."""
    data = {name: from_form(FIELDS[name], value) for name, value in advanced.items()}
    data.update(prompt=str(prompt or ""), spatial_prompt=str(spatial_prompt or ""),
                frames=from_form(FIELDS["frames"], frames))
    return TrainConfig.from_dict(data)


def selection(start, end, fps) -> dict:
    """The clip trimming as ``cav train`` flags: 0 (or empty) means not given."""
    return {k: float(v) for k, v in (("start", start), ("end", end), ("fps", fps)) if v not in (None, "") and float(v) > 0}


def parse_seeds(text: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", str(text or "").strip()) if p]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise CavError(f"seeds '{text}' are not whole numbers: write e.g. 0, 1, 2") from None
    return seeds or [0]


def parse_weights(text: str, adapters: int) -> list[list[float | None]]:
    """Grid columns of adapter weights: ``0.5, 1`` (each weight for every adapter) or ``0.7/0.3, 1/0`` (one per
    adapter); empty: each adapter's own recorded weight (``None``)."""
    columns = [c for c in re.split(r"[\s,]+", str(text or "").strip()) if c]
    if not columns or not adapters:
        return [[None] * adapters]
    grid = []
    for col in columns:
        try:
            weights = [float(w) for w in col.split("/")]
        except ValueError:
            raise CavError(f"weight '{col}' is not a number: write e.g. 0.5, 1 or 0.7/0.3 for two adapters") from None
        if len(weights) == 1:
            weights *= adapters
        if len(weights) != adapters:
            raise CavError(f"weights '{col}' give {len(weights)} values for {adapters} adapters: give one per adapter "
                           "(a/b) or one for all")
        grid.append(weights)
    return grid


def check_grid(weights: list, seeds: list) -> None:
    if len(weights) * len(seeds) > MAX_GRID:
        raise CavError(f"the grid has {len(weights) * len(seeds)} videos (weights × seeds), more than {MAX_GRID}: "
                       "give fewer weights or seeds")
