"""T-LoRA and S-LoRA as named peft adapters on a T2V UNet: add, save (peft format), load, activate.

A saved adapter folder holds ``adapter_model.safetensors`` and ``adapter_config.json`` exactly as peft writes
them (``LoraConfig.from_pretrained`` reads the folder), ``cav.json`` (kind, base, family, prompt, step, ...) and
the same weights in diffusers' LoRA format (``pytorch_lora_weights.safetensors``: ``unet.``-prefixed peft keys with
the LoraConfig in the file's metadata), so stock ``pipeline.load_lora_weights(folder, adapter_name=...)`` loads it.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from .. import families, versioned
from ..errors import CavError
from ..io_utils import save_safetensors, write_json
from .targets import target_regex

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "cav.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


def lora_config(kind: str, placement: str, rank: int, alpha: float, family: families.Family) -> LoraConfig:
    if rank < 1:
        raise CavError(f"LoRA rank must be ≥ 1, got {rank}: pass --t-lora-rank/--s-lora-rank 1 or more")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_regex(kind, placement, family), lora_dropout=0.0,
                      init_lora_weights=True)


def add_lora(unet: torch.nn.Module, name: str, config: LoraConfig, low_cpu_mem_usage: bool = False,
             device: torch.device | str | None = None) -> int:
    """Inject adapter ``name``; return the number of adapted modules. A denoiser made of several models names
    their modules with a prefix (``backbone.Experts``: ``transformer.``, ``transformer_2.``) and says so in
    ``lora_scope``: a target regex then matches under each prefix. ``device``: where the adapter's weights live
    (None: beside each adapted layer's base weight, peft's rule; a block-swapped denoiser passes its compute device,
    its blocks' base weights resting on the CPU: ``place``)."""
    scope = getattr(unet, "lora_scope", None)
    if scope and isinstance(config.target_modules, str):
        config = copy.deepcopy(config)
        config.target_modules = rf"{scope}(?:{config.target_modules})"
    with warnings.catch_warnings():  # several named adapters on one model is what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, unet, adapter_name=name, low_cpu_mem_usage=low_cpu_mem_usage)
    for p in lora_parameters(unet, name):  # adapter weights stay fp32 when the frozen base is fp16/bf16
        if p.is_floating_point() and not p.is_meta:
            p.data = p.data.float()
    if device is not None:
        place(unet, name, device)
    n = sum(1 for m in unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A)
    if n == 0:
        raise CavError(f"adapter '{name}' matched no module of this UNet: does the base family match the targets?")
    return n


def place(unet: torch.nn.Module, name: str, device: torch.device | str) -> None:
    """Adapter ``name``'s weights onto ``device`` (the same ``Parameter`` objects; nothing moves when they are
    there already)."""
    for p in lora_parameters(unet, name):
        if not p.is_meta and p.device != torch.device(device):
            p.data = p.data.to(device)


def lora_parameters(unet: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if f".{name}." in n and ".lora_" in n]


def adapter_names(unet: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for m in unet.modules():
        if isinstance(m, LoraLayer):
            names.update(m.lora_A.keys())
    return names


def activate(unet: torch.nn.Module, names: list[str], weights: list[float] | None = None,
             trainable: str | None = None) -> None:
    """Make exactly ``names`` active with ``weights``; only adapter ``trainable`` (if any) requires grad."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    weights = [1.0] * len(names) if weights is None else list(weights)
    set_weights_and_activate_adapters(unet, list(names), weights)
    for n, p in unet.named_parameters():  # peft's set_adapter turns grads on for active adapters: set explicitly
        p.requires_grad_(trainable is not None and f".{trainable}." in n and ".lora_" in n)


def save_lora(unet: torch.nn.Module, name: str, config: LoraConfig, directory: Path, meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, adapter_name=name)
    save_safetensors(directory / WEIGHTS, {k: v.float() for k, v in state.items()}, metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["target_modules"] = config.target_modules
    for key, value in list(cfg.items()):
        if isinstance(value, set):
            cfg[key] = sorted(value)
    write_json(directory / CONFIG, cfg)
    versioned.write(directory / META, meta)
    family = families.get(meta["family"]) if meta.get("family") else None
    for k, (part, sub) in enumerate(by_part(state, getattr(unet, "parts", None)).items()):  # one file per expert
        save_diffusers_lora(directory, sub, cfg, family, DIFFUSERS_WEIGHTS if k == 0 else diffusers_weights(part))
    return directory


def diffusers_weights(part: str) -> str:
    """The diffusers-layout file of the LoRA of a denoiser's model ``part`` after its first (``--experts both``: the
    low-noise expert's, ``pytorch_lora_weights_transformer_2.safetensors``)."""
    return DIFFUSERS_WEIGHTS.replace(".safetensors", f"_{part}.safetensors")


def by_part(state: dict, parts: tuple[str, ...] | None) -> dict:
    """An adapter's state per model of its denoiser: ``{None: state}``, or per expert ``parts`` of a
    ``backbone.Experts`` (keys prefixed by the component name, which is stripped; an expert without keys left out)."""
    if not parts:
        return {None: state}
    split = {p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(f"{p}.")} for p in parts}
    return {p: sub for p, sub in split.items() if sub}


def save_diffusers_lora(directory: Path, state: dict, config: dict, family: families.Family | None = None,
                        weight_name: str = DIFFUSERS_WEIGHTS) -> Path:
    """The adapter in diffusers' LoRA layout, written by diffusers itself (the family's ``lora_writer``:
    ``unet.`` keys for the UNet pipelines, ``transformer.`` for Wan; LoraConfig metadata)."""
    import importlib

    module, cls = (family or families.LEGACY).lora_writer.split(":")
    writer = getattr(importlib.import_module(module), cls)
    part = (family or families.LEGACY).model_folder  # the pipeline's name of the denoiser: unet, transformer
    keep = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights", "use_dora", "use_rslora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer.save_lora_weights(
            str(directory), **{f"{part}_lora_layers": {k: v.detach().float().cpu().contiguous() for k, v in state.items()},
                               f"{part}_lora_adapter_metadata": {k: config[k] for k in keep if k in config}},
            weight_name=weight_name, safe_serialization=True)
    return Path(directory) / weight_name


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    return versioned.read(path) if path.is_file() else {}


def find_adapter_dir(path: Path, kind: str) -> Path:
    """Accept an adapter folder, a checkpoint folder or a run folder; return the folder holding ``kind``'s LoRA."""
    path = Path(path)
    sub = {"temporal": "t_lora", "spatial": "absorbers/s_lora"}[kind]
    for candidate in (path, path / sub):
        if (candidate / WEIGHTS).is_file():
            return candidate
    if not path.exists():
        raise CavError(f"adapter '{path}' does not exist: pass a run folder, a checkpoint folder or an adapter folder")
    raise CavError(f"no {kind} LoRA ({WEIGHTS}) found in '{path}': pass a run, checkpoint or adapter folder")


def load_lora(unet: torch.nn.Module, directory: Path, name: str, expect_kind: str | None = None,
              family: families.Family | None = None, device: torch.device | str | None = None) -> dict:
    """Inject adapter ``name`` from a saved folder; the weights must fit this UNet (of base ``family``) exactly.
    ``device``: as ``add_lora``'s."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory)
    if expect_kind and meta.get("kind") and meta["kind"] != expect_kind:
        raise CavError(f"adapter '{directory}' is a {meta['kind']} LoRA, not a {expect_kind} one: pass a "
                       f"{'T-LoRA (run/t_lora)' if expect_kind == 'temporal' else 'spatial LoRA'} folder")
    trained_on = meta.get("family", families.LEGACY.name if meta else None)  # runs before families: UNet3D
    if family and trained_on and trained_on != family.name:
        raise CavError(f"adapter '{directory}' was trained on a {trained_on} base ({meta.get('base', 'unknown')}), "
                       f"but this base is {family.name}: use an adapter trained on a {family.name} base, or that "
                       "adapter's base")
    try:
        raw = json.loads((directory / CONFIG).read_text())
        state = load_file(str(directory / WEIGHTS))
    except Exception as exc:
        raise CavError(f"could not read adapter '{directory}' ({type(exc).__name__}): is it a peft LoRA folder?") from None
    config = saved_config(raw, state, unet, directory)
    try:
        add_lora(unet, name, config, device=device)
    except CavError:
        raise CavError(f"adapter '{directory}' targets no module of this base: it was trained on another kind of model") from None
    expected = {n: p.shape for n, p in unet.named_parameters() if f".{name}." in n}
    for key, tensor in state.items():
        model_key = key.replace(".lora_A.weight", f".lora_A.{name}.weight").replace(".lora_B.weight", f".lora_B.{name}.weight")
        if model_key not in expected or expected[model_key] != tensor.shape:
            raise CavError(f"adapter '{directory}' does not fit this base (tensor {key} "
                           f"{tuple(tensor.shape)}): it was trained on another base ({meta.get('base', 'unknown')})")
    ref = next(p for n, p in unet.named_parameters() if f".{name}." in n)
    set_peft_model_state_dict(unet, {k: v.to(ref.device) for k, v in state.items()}, adapter_name=name)
    return meta


SAFE_KEYS = ("r", "lora_alpha", "lora_dropout", "bias", "init_lora_weights", "use_dora", "use_rslora")


def saved_config(raw: dict, state: dict, unet: torch.nn.Module, directory) -> LoraConfig:
    """A saved adapter's LoraConfig, read as data: rank and alpha must be numbers, and the adapted modules are the
    ones its weights name, each checked to be a module of this UNet. Its ``target_modules`` (a regex peft would run
    over every module name: a crafted one hangs loading) and pattern fields are never used."""
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not (type(r) is int and 1 <= r <= 4096 and type(alpha) in (int, float) and 0 < alpha <= 1e6):
        raise CavError(f"adapter '{directory}' has no valid rank and alpha in {CONFIG}: is it a LoRA saved by cav?")
    modules = sorted({k.split(".lora_", 1)[0] for k in state if ".lora_" in k})
    known = dict(unet.named_modules())
    stray = [m for m in modules if m not in known]
    if not modules or stray:
        raise CavError(f"adapter '{directory}' does not fit this base (module {stray[0] if stray else 'none'} is "
                       "not one of its modules): it was trained on another base")
    return LoraConfig(**{k: raw[k] for k in SAFE_KEYS if k in raw and type(raw[k]) in (int, float, bool, str)},
                      target_modules=modules)


def load_lora_weights(unet: torch.nn.Module, directory: Path, name: str) -> None:
    """Overwrite the weights of adapter ``name`` (already injected) with a saved folder's."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / WEIGHTS))
    ref = lora_parameters(unet, name)[0]
    result = set_peft_model_state_dict(unet, {k: v.to(ref.device) for k, v in state.items()}, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise CavError(f"checkpoint '{directory}' does not match adapter '{name}': was the recipe changed? start anew")


def count_parameters(unet: torch.nn.Module, name: str) -> int:
    return sum(p.numel() for p in lora_parameters(unet, name))


__all__ = ["lora_config", "add_lora", "place", "lora_parameters", "activate", "save_lora", "load_lora", "find_adapter_dir",
           "read_meta", "count_parameters", "adapter_names", "load_lora_weights", "save_diffusers_lora"]
