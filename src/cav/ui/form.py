"""The page's form ↔ cav's own objects: recipe presets, the recipe's fields as form values, generation grids.

Every value goes through ``TrainConfig.from_dict`` (as the CLI's flags do), so a bad value gets the CLI's message.
"""

from __future__ import annotations

import re
import typing
from typing import Literal

from .. import options
from ..config import SampleConfig, TrainConfig, load_recipe, recipe_names
from ..errors import CavError

# fields the page shows outside the "advanced" block (prompts, trimming)
MAIN_FIELDS = ("prompt", "spatial_prompt", "frames", "start", "end", "fps")
FIELDS = {leaf.key: leaf for leaf in options.leaves(TrainConfig)}  # recipe key → its option (section included)
MAX_GRID = 16  # videos per Generate click: more would keep a CPU busy for long with no way to cancel


def presets() -> list[str]:
    """The shipped recipes a run starts from (``toy``, ``modelscope`` …; the ablation plans are not training recipes)."""
    return [n for n in recipe_names() if "/" not in n]


def advanced_fields() -> list[options.Leaf]:
    return [f for f in FIELDS.values() if f.key not in MAIN_FIELDS]


def kind(f: options.Leaf) -> str:
    """How a field is edited: choice | bool | int | float | lines | text (tuples and optional values as text)."""
    hint = f.hint
    if typing.get_origin(hint) is Literal:
        return "choice"
    if typing.get_origin(hint) is list:
        return "lines"
    return {bool: "bool", int: "int", float: "float"}.get(hint, "text")


def choices(f: options.Leaf) -> tuple:
    return typing.get_args(f.hint)


def preset_values(name: str, base: str) -> dict:
    """Every TrainConfig field's value under preset ``name`` (its defaults where the preset is silent), as form
    values; the server's ``--base`` replaces the preset's base."""
    data = load_recipe(name) if name else {}
    values = TrainConfig.from_dict({**data, "prompt": "x", "base": base}).keys()
    return {key: to_form(f, values[key]) for key, f in FIELDS.items()}


def to_form(f: options.Leaf, value):
    if value is None:
        return ""
    if isinstance(value, (tuple, list)) and kind(f) != "lines":
        return " ".join(str(v) for v in value)
    if kind(f) == "lines":
        return "\n".join(value)
    return value


def from_form(f: options.Leaf, value):
    """A form value as a recipe value; TrainConfig parses it with the CLI's rule (and message)."""
    if kind(f) == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if isinstance(value, str) and not value.strip():
        return None if f.field.default is None else value  # an empty optional field: not given
    return value


def build_config(prompt: str, spatial_prompt: str, frames, advanced: dict, trim: dict | None = None) -> TrainConfig:
    """The TrainConfig of the form (validated as the CLI validates its flags)."""
    data = {name: from_form(FIELDS[name], value) for name, value in advanced.items()}
    data.update(prompt=str(prompt or ""), spatial_prompt=str(spatial_prompt or ""), frames=frames, **(trim or {}))
    return TrainConfig.from_dict(data)


def selection(start, end, fps) -> dict:
    """The clip trimming as recipe values (``--start/--end/--fps``), parsed as the flags are: 0 (or empty) means not
    given."""
    given = options.typed_keys(TrainConfig, {k: v for k, v in (("start", start), ("end", end), ("fps", fps))
                                             if v not in (None, "")})
    return {k: given[k] if given.get(k) and given[k] > 0 else None for k in ("start", "end", "fps")}


def parse_seeds(text: str) -> list[int]:
    """The grid's seeds, parsed as `cav generate --seeds` parses them (``SampleConfig.seeds``); empty: seed 0."""
    parts = [p for p in re.split(r"[\s,]+", str(text or "").strip()) if p]
    return options.typed(SampleConfig, {"seeds": parts})["seeds"] or [0]


def parse_weights(text: str, adapters: int) -> list[list[float | None]]:
    """Grid columns of adapter weights: ``0.5, 1`` (each weight for every adapter) or ``0.7/0.3, 1/0`` (one per
    adapter); empty: each adapter's own recorded weight (``None``)."""
    columns = [c for c in re.split(r"[\s,]+", str(text or "").strip()) if c]
    if not columns or not adapters:
        return [[None] * adapters]
    grid = []
    for col in columns:
        try:
            weights = [options.coerce(float, w) for w in col.split("/")]
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
