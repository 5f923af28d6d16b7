"""Bad input for a Wan run, refused from config files and file headers before any weight loads.

Each check raises ``CavError`` with one line naming the problem and the fix (the CLI prints it, exit 2):
- ``--experts`` (``high`` | ``low`` | ``both``) on a one-expert base, or an unknown value (``backbone.chosen_expert``,
  the one rule);
- ``--placement motiondirector+tconv`` (a DiT has no temporal convolutions) or another unknown placement;
- a frame count the causal VAE cannot take (4k+1) and a size the patch × VAE factor does not divide;
- a LoRA file (``--s-lora-from``, a LoRA to sample with) made for another Wan: another width (14B on 1.3B),
  more blocks, or another Wan version (2.1 on 2.2) when the file recorded its base;
- ``--offload-frozen`` without a GPU: allowed, as a no-op with a warning (``offload_plan`` says why).

``check_run`` runs all of them for one run; the single checks exist for ``cav generate`` and the UI.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbone import chosen_expert
from ..errors import CavError
from . import formats, published, targets

EXPERT_CHOICES = {"high": ("transformer",), "low": ("transformer_2",), "both": ("transformer", "transformer_2")}


def expert_components(experts: str | None, n_experts: int) -> tuple[str, ...]:
    """The pipeline components (``transformer``, ``transformer_2``) the LoRAs train on."""
    return EXPERT_CHOICES[experts] if n_experts > 1 else ("transformer",)


def experts_of(model_index: dict) -> int:
    """1 or 2: whether a ``model_index.json`` names a low-noise expert (``transformer_2``)."""
    second = model_index.get("transformer_2")
    return 2 if second and second[0] is not None else 1


def check_placement(placement: str) -> None:
    """Refuse a placement Wan does not have (``motiondirector+tconv``: a DiT has no temporal convolutions)."""
    targets.target_regex(placement)


def check_clip(transformer_config: dict, vae_config: dict, frames: int, height: int, width: int) -> None:
    """Frames 4k+1 and a size tiled by patch × VAE factor, from the base's transformer and VAE configs (a VAE
    config without factors is Wan 2.1's: 8 spatial, 4 temporal, ``AutoencoderKLWan``'s defaults)."""
    published.check_frames(frames, int(vae_config.get("scale_factor_temporal", 4)))
    spatial = int(vae_config.get("scale_factor_spatial", 8))
    unit = published.size_multiple(transformer_config, spatial)
    if height % unit or width % unit or min(height, width) < unit:
        down = [max(unit, v // unit * unit) for v in (height, width)]
        up = [max(unit, -(-v // unit) * unit) for v in (height, width)]
        options = dict.fromkeys(f"{h}x{w}" for h, w in (down, up))
        raise CavError(f"--size {height}x{width} does not fit Wan: height and width must be multiples of {unit} (patch "
                       f"{unit // spatial} × VAE factor {spatial}): pass --size {' or --size '.join(options)}")


def check_lora(path: str | Path, transformer_config: dict, base: str | None = None) -> None:
    """A Wan LoRA file fits this base (``base``: its published name, e.g. ``wan2.2-t2v-a14b``, when known)."""
    formats.check_lora_file(path, transformer_config, base)


def offload_plan(offload_frozen: bool, device: torch.device | str) -> tuple[bool, str | None]:
    """(swap blocks?, warning). On a machine without a GPU the frozen blocks already live in the memory they would
    be offloaded to, so ``--offload-frozen`` is a no-op there, said once as a warning rather than refused: a recipe
    or ``cav batch`` manifest written for a GPU machine still runs on a CPU (and the UNet families' ``--offload-frozen``
    is likewise harmless on a CPU)."""
    device = torch.device(device)
    if not offload_frozen:
        return False, None
    if device.type == "cpu":
        return False, ("--offload-frozen does nothing on the CPU (the blocks already live in main memory): "
                       "training runs without block swap")
    return True, None


def check_run(transformer_config: dict, vae_config: dict, n_experts: int, *, frames: int, height: int, width: int,
              placement: str = "cav", experts: str | None = None, lora_files: tuple = (),
              base: str | None = None) -> str | None:
    """Every check of a Wan training run that needs no weights; returns the ``--experts`` value to use."""
    check_placement(placement)
    chosen = chosen_expert(experts, n_experts)
    check_clip(transformer_config, vae_config, frames, height, width)
    for path in lora_files:
        if path:
            check_lora(path, transformer_config, base)
    return chosen


__all__ = ["EXPERT_CHOICES", "expert_components", "experts_of", "check_placement", "check_clip",
           "check_lora", "offload_plan", "check_run"]
