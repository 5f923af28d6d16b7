"""Which recipe a base starts from, and the size and frame count it was trained at.

`cav train` without ``--recipe`` starts from the base's own recipe, then the flags given: a user's first run on their
own clip gets settings that fit the base (the toy model's 32x32 and 8 frames, not ModelScope's 256x256 and 16, which
made the toy base train for hours on a CPU). ``BASES`` is the one rule: its first row that recognizes the base names
the recipe. A base is recognized by

- a marker file: a toy-world model (the embedded ``toy`` or one trained by `cav toy train-base`) carries
  ``cav_model.json`` recording the recipe it was trained with (a random model of ``toy.factory`` records none);
- its name (an anchored regex on the hub id's name or the folder's name) within a family: Zeroscope v2 is a
  fine-tune of ModelScope with the same UNet3D and VAE layout, so no config field tells the two apart;
- else its family (``backbone.family_of``): the last rows are the families' own (``Family.recipe``), so a family
  added later brings its recipe in its row of ``families.FAMILIES``.

The native settings are what a warning compares a run's size and frames against: a toy-world model's recorded
recipe; a base recognized by name: its recipe's size and frames; a base recognized only by family: the size its
configs say (the UNet's ``sample_size`` times the VAE's factor, the size diffusers' pipelines sample at by default)
and its family recipe's frames.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import backbone
from .families import FAMILIES
from .config import TrainConfig, load_recipe
from .errors import CavError

TOY_MARKER = ("cav_model.json", "recipe")  # (file in the base folder, the key it must hold)
FAR = 2.0  # a side or frame count more than this factor from the native one is warned about
IDENTITY = ("base", "motion_adapter")  # recipe keys that name a model: the user's base keeps its own


@dataclass(frozen=True)
class Row:
    """How one kind of base is recognized and which shipped recipe it starts from."""

    recipe: str
    what: str  # the base in words, for messages
    family: str | None = None  # a ``families.FAMILIES`` name the base must have (None: any)
    name: str | None = None  # anchored regex on the name of the hub id or folder, case-insensitive
    marker: tuple[str, str] | None = None  # (file, key): the base folder holds that JSON file with that key


BASES: tuple[Row, ...] = (
    Row("toy", "a toy-world model", marker=TOY_MARKER),
    Row("zeroscope", "Zeroscope", family="unet3d", name=r"^zeroscope"),
    # the toy world's Wan (base toy-wan: src/cav/toy/wan_model; `cav toy train-base --family wan`'s runs/toy-wan)
    Row("toy-wan", "the toy Wan", family="wan", name=r"^(wan_model|toy-wan)$"),
    *(Row(f.recipe, f.what, family=f.name) for f in FAMILIES.values()),  # last resort: the family's own recipe
)


@dataclass(frozen=True)
class Native:
    """What a base was trained at: (height, width) in pixels, frames, and where these numbers come from."""

    size: tuple[int, int]
    frames: int
    source: str


def _marker(source: str, marker: tuple[str, str]) -> dict | None:
    """The marker file's value under its key, when the base folder holds it."""
    path = Path(source) / marker[0]
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = data.get(marker[1]) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else None


def _name(source: str) -> str:
    """The last part of a hub id or a folder path (what a name regex is matched against)."""
    return Path(source).name if Path(source).is_dir() else source.rsplit("/", 1)[-1]


def recognize(base: str | Path, motion_adapter: str | None = None) -> Row:
    """The first row of ``BASES`` that recognizes ``base`` (with ``motion_adapter``, an image model it animates)."""
    source = backbone.resolve_base(base)
    family = None
    for row in BASES:
        if row.marker and _marker(source, row.marker) is None:
            continue
        if row.name and not re.match(row.name, _name(source), re.IGNORECASE):
            continue
        if row.family:
            family = family or backbone.family_of(source, motion_adapter or None).name
            if row.family != family:
                continue
        return row
    raise AssertionError(f"no row of native.BASES recognizes family {family}")  # the last rows cover every family


def starting_recipe(base: str | Path | None, motion_adapter: str | None = None) -> tuple[Row, dict]:
    """The row that recognizes ``base`` (None: TrainConfig's default base) and its recipe's values, less the keys
    that name a model: the base and motion adapter are the user's, whatever the recipe was written for."""
    base = _default("base") if base is None else base
    row = recognize(base, motion_adapter)
    data = {k: v for k, v in load_recipe(row.recipe).items() if k not in IDENTITY}
    return row, data


def _default(name: str):
    return TrainConfig.__dataclass_fields__[name].default


def native(base: str | Path, motion_adapter: str | None = None) -> Native:
    """What ``base`` was trained at (module doc: where each number comes from)."""
    row = recognize(base, motion_adapter)
    source = backbone.resolve_base(base)
    recipe = load_recipe(row.recipe)
    size, frames = _pair(recipe["size"]), int(recipe["frames"])
    if row.marker:
        own = _marker(source, row.marker)
        size, frames = _pair(own.get("size", size)), int(own.get("frames", frames))
        return Native(size, frames, f"{row.what}: the recipe it was trained with")
    if row.name:
        return Native(size, frames, f"{row.what}: the {row.recipe} recipe's size and frames")
    configured = _configured_size(base)
    if configured is None:
        return Native(size, frames, f"{row.what}: the {row.recipe} recipe's size and frames")
    return Native(configured, frames, f"{row.what}: the size its UNet and VAE configs give, the {row.recipe} "
                                      "recipe's frames")


def _pair(size) -> tuple[int, int]:
    items = list(size) if isinstance(size, (list, tuple)) else [size]
    return (int(items[0]), int(items[-1]))


def _configured_size(base) -> tuple[int, int] | None:
    """UNet ``sample_size`` times the VAE's downscale factor (None when the configs cannot be read here)."""
    try:
        unet, vae = backbone.read_config(base, "unet"), backbone.read_config(base, "vae")
    except CavError:
        return None
    side = unet.get("sample_size")
    if side is None or "block_out_channels" not in vae:
        return None
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    h, w = _pair(side)
    return (h * factor, w * factor)


def far(value: int, reference: int) -> bool:
    """More than ``FAR`` times larger or smaller."""
    return max(value, reference) > FAR * min(value, reference)


def warning(cfg: TrainConfig) -> str | None:
    """One line when the run's size or frame count is far from what the base was trained at, else None."""
    nat = native(cfg.base, cfg.motion_adapter or None)
    h, w = cfg.data.size
    off = []
    if far(h, nat.size[0]) or far(w, nat.size[1]):
        off.append(f"--size {h}x{w}")
    if far(cfg.data.frames, nat.frames):
        off.append(f"--frames {cfg.data.frames}")
    if not off:
        return None
    nh, nw = nat.size
    size_flag = f"{nh}" if nh == nw else f"{nh}x{nw}"
    return (f"cav: warning: {' and '.join(off)} {'is' if len(off) == 1 else 'are'} far from what base '{cfg.base}' "
            f"was trained at ({nh}x{nw}, {nat.frames} frames; {nat.source}): a base draws poorly far from its "
            f"training settings and larger runs cost more per step; pass --size {size_flag} --frames {nat.frames} for "
            "its native settings")
