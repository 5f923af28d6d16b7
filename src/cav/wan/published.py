"""The published Wan bases cav knows offline, and the shape rules a Wan clip must follow.

Each ``configs/<name>.json`` holds the base's transformer config (``WanTransformer3DModel``'s ``config.json``
fields), its VAE's compression factors, its expert count and boundary ratio (A14B: ``transformer`` for high noise,
``transformer_2`` for low noise) and the published parameter count it was checked against (by building the
transformer on the ``meta`` device: ``tests/test_wan_published.py``). So a dry run can size a run without a download.

Shape rules: Wan's causal VAE takes 4k+1 frames (the first frame alone, then groups of 4), and the height and width
must divide by the transformer's spatial patch × the VAE's spatial factor (2 × 8 = 16; TI2V-5B: 2 × 16 = 32).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from ..errors import CavError


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cav.wan").joinpath("configs").iterdir()
                  if p.name.endswith(".json"))


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return resources.files("cav.wan").joinpath("configs", f"{name}.json").read_text()


def published(name: str) -> dict:
    """The shipped record of base ``name`` (a fresh dict)."""
    if name not in names():
        raise CavError(f"unknown Wan base '{name}': use one of {', '.join(names())}")
    return json.loads(_read(name))


def build_on_meta(name: str):
    """The base's transformer with no weights (``meta`` device): sizes and module names without memory."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel.from_config(published(name)["transformer"])


def parameter_count(name: str) -> int:
    """Parameters of all the base's experts together."""
    row = published(name)
    return row["experts"] * sum(p.numel() for p in build_on_meta(name).parameters())


def size_multiple(transformer_config: dict, vae_spatial: int) -> int:
    """Height and width must be multiples of this: the spatial patch times the VAE's spatial factor."""
    _, ph, pw = transformer_config["patch_size"]
    if ph != pw:
        raise ValueError(f"non-square patch {ph}×{pw} is not a Wan layout")
    return ph * vae_spatial


def check_frames(frames: int, temporal: int = 4) -> None:
    """Refuse a frame count the causal VAE cannot take (it needs ``temporal``·k + 1)."""
    if frames < 1 or (frames - 1) % temporal:
        lower = max(1, (frames - 1) // temporal * temporal + 1)
        raise CavError(f"--frames {frames} does not fit Wan's VAE, which takes {temporal}k+1 frames: pass --frames "
                       f"{lower} or {lower + temporal}")


def check_size(height: int, width: int, multiple: int) -> None:
    """Refuse a size that the VAE and the patch embedding cannot tile."""
    bad = [f"--{what} {v}" for what, v in (("height", height), ("width", width)) if v < multiple or v % multiple]
    if bad:
        fix = " and ".join(f"{b.split()[0]} {max(multiple, int(b.split()[1]) // multiple * multiple)}" for b in bad)
        raise CavError(f"{', '.join(bad)} is not a multiple of {multiple} (Wan's patch × VAE factor): pass {fix}")


def check_shape(name: str, frames: int, height: int, width: int) -> None:
    """Both rules for a published base."""
    row = published(name)
    check_frames(frames, row["vae"]["scale_factor_temporal"])
    check_size(height, width, size_multiple(row["transformer"], row["vae"]["scale_factor_spatial"]))


__all__ = ["names", "published", "build_on_meta", "parameter_count", "size_multiple", "check_frames", "check_size",
           "check_shape"]
