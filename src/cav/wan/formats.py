"""Wan LoRA files other tools load: diffusers' layout and ComfyUI's (Wan's original module names).

- diffusers: ``WanPipeline.save_lora_weights`` itself writes the file (``transformer.``-prefixed peft keys, the
  LoraConfig in the safetensors metadata), so stock ``WanPipeline.load_lora_weights`` + ``set_adapters`` rebuilds
  the same adapter, scaling included.
- ComfyUI: keys ``diffusion_model.blocks.N.{self_attn,cross_attn}.{q,k,v,o}.lora_{A,B}.weight`` (and
  ``blocks.N.ffn.{0,2}`` for the FFN placements) with one ``.alpha`` scalar per module, ComfyUI's convention for the
  scale alpha / rank. diffusers' own Wan converter (``_convert_non_diffusers_wan_lora_to_diffusers``) reads the
  same file, folding alpha / rank into the weights. musubi's ``lora_unet_*`` names are not written: diffusers'
  converter raises ``KeyError`` on an attention-only LoRA in that layout.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict

from ..errors import CavError
from ..io_utils import save_safetensors

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_ORIGINAL = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
             "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_KEY = re.compile(r"(?:transformer\.)?blocks\.(\d+)\."
                  r"(?:(attn[12])\.(to_q|to_k|to_v|to_out\.0)|(ffn\.net\.(?:0\.proj|2)))"
                  r"\.(lora_[AB])\.weight")
_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights", "use_dora",
                "use_rslora")


def adapter_state(transformer, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights under peft's saved names (``blocks.0.attn1.to_q.lora_A.weight``), fp32 on CPU."""
    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}


def save_diffusers(transformer, name: str, config: LoraConfig, directory: str | Path,
                   weight_name: str = DIFFUSERS_WEIGHTS) -> Path:
    """Write adapter ``name`` in diffusers' Wan LoRA layout, by ``WanPipeline.save_lora_weights``. (An A14B
    low-noise expert's file loads with ``load_lora_weights(..., load_into_transformer_2=True)``.)"""
    from diffusers import WanPipeline

    cfg = config.to_dict()
    cfg["target_modules"] = config.target_modules if isinstance(config.target_modules, str) else sorted(
        config.target_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        WanPipeline.save_lora_weights(str(directory), transformer_lora_layers=adapter_state(transformer, name),
                                      transformer_lora_adapter_metadata={k: cfg[k] for k in _CONFIG_KEYS if k in cfg},
                                      weight_name=weight_name, safe_serialization=True)
    return Path(directory) / weight_name


def to_comfyui(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft/diffusers-named LoRA tensors → Wan's original names with ``diffusion_model.`` prefix and ``.alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise CavError(f"LoRA tensor '{key}' is not on a Wan attention or FFN projection: only motion and "
                           "absorber LoRAs of a Wan transformer can be exported to ComfyUI")
        block, attn, proj, ffn, ab = m.groups()
        module = f"blocks.{block}." + (f"{_ORIGINAL[attn]}.{_ORIGINAL[proj]}" if attn else _ORIGINAL[ffn])
        out[f"diffusion_model.{module}.{ab}.weight"] = tensor
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    return out


def export_comfyui(transformer, name: str, config: LoraConfig, path: str | Path, base: str | None = None) -> Path:
    """Write adapter ``name`` as one ComfyUI LoRA file (safetensors); ``base`` (a published name such as
    ``wan2.1-t2v-14b``) is recorded so that a same-shaped but different base can be refused later."""
    tensors = to_comfyui(adapter_state(transformer, name), config.lora_alpha)
    meta = {"format": "pt", "cav_rank": str(config.r), "cav_alpha": str(config.lora_alpha)}
    if base:
        meta["cav_base"] = base
    return save_safetensors(path, tensors, metadata=meta)


# ------------------------------------------------------------------------------- does a LoRA file fit this base?
_SELF_Q = re.compile(r"(?:transformer\.|diffusion_model\.)?blocks\.(\d+)\.(?:attn1\.to_q|self_attn\.q)"
                     r"\.lora_(?:A|down)\.weight")
_BLOCK = re.compile(r"(?:transformer\.|diffusion_model\.)?blocks\.(\d+)\.")


def _version(base: str | None) -> str | None:
    m = re.match(r"wan(\d\.\d)-", base or "")
    return m.group(1) if m else None


def check_lora_file(path: str | Path, transformer_config: dict, base: str | None = None) -> None:
    """Refuse, from the file's header alone (no weights read), a Wan LoRA that does not fit a transformer with
    ``transformer_config``: another width (e.g. a 14B LoRA on 1.3B), more blocks, or, when both are known, another
    Wan version (a 2.1 LoRA on a 2.2 base: same shapes for 14B / A14B, so only the recorded base tells)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CavError(f"LoRA file '{path}' does not exist: pass a .safetensors LoRA file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
            meta = fh.metadata() or {}
    except Exception as exc:
        raise CavError(f"could not read LoRA '{path}' ({type(exc).__name__}): pass a .safetensors LoRA file") from None
    if any(k.startswith("lora_unet_") for k in shapes):
        raise CavError(f"'{path}' is in musubi's lora_unet_* layout: convert it to diffusers or ComfyUI names first")
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    layers = transformer_config["num_layers"]
    trained = meta.get("cav_base")
    widths = {shape[1] for k, shape in shapes.items() if _SELF_Q.fullmatch(k)}
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    if not blocks:
        raise CavError(f"'{path}' holds no Wan transformer block weights: pass a Wan LoRA")
    on = f" (trained on {trained})" if trained else ""
    if widths and widths != {width}:
        raise CavError(f"LoRA '{path.name}' is for a Wan of width {max(widths)}{on}, this base has width {width} "
                       f"({layers} blocks): use a LoRA trained on this base size")
    if max(blocks) >= layers:
        raise CavError(f"LoRA '{path.name}' adapts block {max(blocks)}{on}, this base has {layers} blocks: use a "
                       "LoRA trained on this base size")
    if _version(trained) and _version(base) and _version(trained) != _version(base):
        raise CavError(f"LoRA '{path.name}' was trained on {trained}, a Wan {_version(trained)} base, but this base "
                       f"is {base} (Wan {_version(base)}): use a LoRA trained on a Wan {_version(base)} base")


# Wan 2.2 A14B: the community's names for the two experts' files (``transformer`` = high noise)
EXPERT_SUFFIXES = {"transformer": "high_noise", "transformer_2": "low_noise"}


def has_adapter(transformer, name: str) -> bool:
    return transformer is not None and any(name in getattr(m, "lora_A", {}) for m in transformer.modules())


def export_comfyui_experts(experts: dict, name: str, config: LoraConfig, path: str | Path,
                           base: str | None = None) -> dict[str, Path]:
    """A14B: one ComfyUI file per expert that carries adapter ``name``, ``<stem>_high_noise.safetensors`` and
    ``<stem>_low_noise.safetensors`` beside ``path`` (``experts`` maps ``transformer`` / ``transformer_2`` to the
    models). An expert the LoRA was not trained on gets no file."""
    path = Path(path)
    written = {}
    for component, model in experts.items():
        if component not in EXPERT_SUFFIXES:
            raise ValueError(f"unknown Wan expert '{component}': use transformer or transformer_2")
        if has_adapter(model, name):
            target = path.with_name(f"{path.stem}_{EXPERT_SUFFIXES[component]}{path.suffix or '.safetensors'}")
            written[component] = export_comfyui(model, name, config, target, base)
    if not written:
        raise CavError(f"no expert carries the LoRA '{name}': train it with --experts high, low or both first")
    return written


def load_lora_file(transformer, path: str | Path, name: str, base: str | None = None) -> None:
    """Load a Wan LoRA file in diffusers' or ComfyUI's layout (e.g. ``--s-lora-from``: an image LoRA) into
    ``transformer`` as peft adapter ``name``, through diffusers' own reader and Wan converter. Checked against the
    transformer's config from the file header first, so a misfit is one line, not a shape error mid-load."""
    from diffusers import WanPipeline

    check_lora_file(path, dict(transformer.config), base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, metadata = WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name, metadata=metadata)


__all__ = ["DIFFUSERS_WEIGHTS", "EXPERT_SUFFIXES", "adapter_state", "save_diffusers", "to_comfyui", "export_comfyui",
           "has_adapter", "export_comfyui_experts", "check_lora_file", "load_lora_file"]
