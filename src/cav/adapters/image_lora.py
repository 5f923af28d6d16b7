"""An existing image LoRA (e.g. a Stable Diffusion 1.5 or SDXL LoRA of the subject) as the S-LoRA absorber.

A bypassed AnimateDiff UNet *is* its image model, so an image LoRA made for that model is an appearance absorber
as it stands. Accepted: a ``.safetensors`` file in diffusers' LoRA layout (``unet.``-prefixed keys, optional
``lora_adapter_metadata``) or the kohya/A1111 layout (``lora_unet_...``, with ``.alpha`` keys), which diffusers'
loader converts; or a folder holding ``pytorch_lora_weights.safetensors`` (a cav S-LoRA folder or run included).
Text-encoder LoRA weights in the file are not used (the absorber is the UNet's). Pickle files are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CavError
from .lora import DIFFUSERS_WEIGHTS, SAFE_KEYS, read_meta


def resolve_image_lora(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / DIFFUSERS_WEIGHTS, path / "absorbers" / "s_lora" / DIFFUSERS_WEIGHTS):
            if candidate.is_file():
                return candidate
        raise CavError(f"no image LoRA ({DIFFUSERS_WEIGHTS}) in '{path}': pass the LoRA's .safetensors file")
    if not path.is_file():
        raise CavError(f"image LoRA '{path}' does not exist: pass a .safetensors LoRA file or folder")
    if path.suffix != ".safetensors":
        raise CavError(f"image LoRA '{path}' is not a .safetensors file: convert it to safetensors (pickle files "
                       "are not loaded)")
    return path


def _read(file: Path) -> tuple[dict, dict | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
        with safe_open(str(file), "pt") as fh:
            header = fh.metadata() or {}
    except Exception as exc:
        raise CavError(f"could not read image LoRA '{file}' ({type(exc).__name__}): is it a safetensors file?") from None
    raw = header.get("lora_adapter_metadata")
    return state, json.loads(raw) if raw else None


def load_image_lora(unet: torch.nn.Module, path: str | Path, name: str, family) -> dict:
    """Inject image LoRA ``path`` into ``unet`` (of base ``family``, a ``families.Family``) as adapter ``name``; it
    must fit the UNet's modules exactly."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = resolve_image_lora(path)
    trained_on = read_meta(file.parent).get("family")
    if trained_on and trained_on != family.name:
        raise CavError(f"image LoRA '{path}' was trained on a {trained_on} base, but this base is {family.name}: "
                       f"pass a LoRA of this base's image model")
    state, metadata = _read(file)
    # kohya/A1111 → diffusers keys; the UNet config maps SDXL's SGM block numbers (input_blocks.N) as diffusers does
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(state, unet_config=unet.config)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise CavError(f"image LoRA '{path}' holds no UNet LoRA weights: pass a LoRA that adapts the image UNet")
    if not any("lora_A" in k for k in unet_state):
        unet_state = convert_unet_state_dict_to_peft(unet_state)
    _check_fit(unet, unet_state, path)
    if alphas and metadata:
        alphas = None  # diffusers' own metadata already carries lora_alpha
    metadata = {k.removeprefix("unet."): v for k, v in (metadata or {}).items() if k.startswith("unet.")} or None
    if metadata:  # data only: rank, alpha and flags; no pattern fields (peft runs them as regexes)
        metadata = {k: v for k, v in metadata.items() if k in SAFE_KEYS and type(v) in (int, float, bool, str)}
    if metadata:  # suffix targets such as "to_q" would also match the motion modules: name the modules exactly
        metadata["target_modules"] = sorted({k.split(".lora_", 1)[0] for k in unet_state if ".lora_" in k})
        metadata = {f"unet.{k}": v for k, v in metadata.items()}
    unet.load_lora_adapter({f"unet.{k}": v for k, v in unet_state.items()}, prefix="unet", adapter_name=name,
                           network_alphas=alphas, metadata=metadata)
    n_text = sum(1 for k in state if not k.startswith("unet."))
    return {"file": str(file), "tensors": len(unet_state), "ignored_text_encoder_tensors": n_text}


def _check_fit(unet: torch.nn.Module, state: dict, path) -> None:
    """Every adapted module must exist in this UNet with the LoRA's input/output sizes."""
    modules = dict(unet.named_modules())
    for key, tensor in state.items():
        if ".lora_" not in key or tensor.ndim < 2:
            continue
        module_name, part = key.split(".lora_", 1)
        module = modules.get(module_name)
        if module is None or not hasattr(module, "weight"):
            raise CavError(f"image LoRA '{path}' adapts {module_name}, which this base does not have: it was made "
                           "for another base family (e.g. SDXL); pass a LoRA of this base's image model")
        out_f, in_f = module.weight.shape[0], module.weight.shape[1]
        fits = tensor.shape[1] == in_f if part.startswith("A") else tensor.shape[0] == out_f
        if not fits:
            raise CavError(f"image LoRA '{path}' does not fit this base (tensor {key} {tuple(tensor.shape)} for a "
                           f"{tuple(module.weight.shape)} layer): it was made for another base family; pass a LoRA "
                           "of this base's image model")
