"""Load a text-to-video model in the diffusers layout; the only module that knows diffusers pipeline classes.

A *base* is one of:
- ``toy``: the tiny model trained on the toy world and shipped inside the package (the embedded default);
- a local folder in the diffusers layout of ModelScope / Zeroscope (``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``);
- a hub id such as ``damo-vilab/text-to-video-ms-1.7b`` (needs network or a populated local cache);
- an AnimateDiff model: a diffusers folder or hub id whose ``unet/`` is a ``UNetMotionModel``, or a Stable Diffusion
  image model (``unet/`` = ``UNet2DConditionModel``) plus ``motion_adapter`` (a ``MotionAdapter`` folder or hub id);
  SD 1.5 (``AnimateDiffPipeline``) or SDXL (``AnimateDiffSDXLPipeline``: a second text encoder, ``text_encoder_2``).
- a Wan text-to-video DiT (``WanPipeline``: ``transformer/`` = ``WanTransformer3DModel``, ``AutoencoderKLWan``, a umT5
  text encoder), or ``toy-wan``, the toy world's Wan (``toy/wan_model``, its card there). A two-expert base (Wan
  2.2 T2V-A14B: ``transformer_2`` beside ``transformer``) loads both; LoRAs train on the one ``--experts`` names
  (``Backbone.unet``), samples use both, each on its side of the pipeline's boundary (``Backbone.denoiser_at``).

Families of bases are the rows of ``families.FAMILIES``: the model class each one loads, the pipeline that samples
from it, its text condition, its objective's schedulers; this module reads them and never branches on a family's
name. The rest of cav only passes ``Backbone.family`` (a ``families.Family``) along.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CavError
from .families import FAMILIES, LEGACY, Family
from .wan.shipped import SHIPPED_CONFIGS as WAN_SHIPPED

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # "unet": the denoiser's folder (any row's)
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"
# shipped toy models by name (``toy-wan``: the toy world's Wan, trained by `cav toy` on its own)
TOY_MODELS = {"toy": TOY_MODEL_DIR, "toy-wan": Path(__file__).parent / "toy" / "wan_model"}
# how a missing toy model is made again
_TOY_HINT = {"toy": " or train it with `cav toy train-base`",
             "toy-wan": " or train it with `cav toy train-base --family wan`"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ASSETS = Path(__file__).parent / "assets"
# hub ids whose small JSON files ship in ``assets/`` as <prefix>_<path with / as _> (plans and checks work offline)
SHIPPED_CONFIGS = {"damo-vilab/text-to-video-ms-1.7b": "modelscope", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
                   "guoyww/animatediff-motion-adapter-sdxl-beta": "animatediff_motion_adapter_sdxl_beta",
                   **WAN_SHIPPED}  # the published Wan bases (``wan/shipped.py``)
HUB_TIMEOUT_S = 5.0  # one request to the hub before a download; its absence is reported instead of retried
PIPELINE_MULTIPLE = 8  # diffusers' TextToVideoSD- and AnimateDiffPipeline.check_inputs: height, width divisible by 8
# the config keys that bound a model's (or its add-on's) frame count: the rows' ``frame_limit_key``s
FRAME_LIMIT_KEYS = tuple(dict.fromkeys(f.frame_limit_key for f in FAMILIES.values() if f.frame_limit_key))
_DOWNLOAD_HINT = "download it where the hub is reachable (`hf download {repo} --local-dir DIR`) and pass {flag} DIR"


def resolve_base(base: str | Path) -> str:
    """Map ``toy`` (``toy-wan``) to the shipped model; check a local folder's layout; pass a hub id through."""
    base = str(base)
    if base in TOY_MODELS:
        folder = TOY_MODELS[base]
        if not (folder / "model_index.json").is_file():
            raise CavError(
                f"the embedded toy model is missing from {folder}: reinstall cav{_TOY_HINT.get(base, '')}"
            )
        return str(folder)
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise CavError(
                f"base '{base}' is not a diffusers text-to-video folder (no model_index.json): "
                "pass a folder like text-to-video-ms-1.7b, a hub id, or `toy`"
            )
        denoisers = dict.fromkeys(f.model_folder for f in FAMILIES.values())  # unet/ or transformer/
        missing = [c for c in COMPONENTS[1:] if not (path / c).is_dir()]
        if not any((path / d).is_dir() for d in denoisers):
            missing.insert(0, " or ".join(denoisers))
        if missing:
            raise CavError(f"base '{base}' misses component folder(s) {', '.join(missing)}: download the complete model")
        return str(path)
    if _HUB_ID.match(base) and not base.startswith((".", "/")):
        return base
    raise CavError(f"base '{base}' does not exist: pass an existing folder, a hub id (owner/name), or `toy`")


def _read_json(resolved: str, name: str, what: str, flag: str = "--base") -> dict:
    """A small JSON file of a local folder or hub repository (no weights), from where it is known locally first so
    plans and checks work offline: the folder, the files shipped for known hub ids (``SHIPPED_CONFIGS``), the Hugging
    Face cache; only then the hub, with one quick request that fails fast (``check_hub``) when it cannot be reached."""
    if Path(resolved).is_dir():
        local = Path(resolved) / name
        if not local.is_file():
            raise CavError(f"{what} '{resolved}' has no {name}: download the complete model")
        return json.loads(local.read_text())
    shipped = ASSETS / f"{SHIPPED_CONFIGS.get(resolved)}_{name.replace('/', '_')}"
    if resolved in SHIPPED_CONFIGS and shipped.is_file():
        return json.loads(shipped.read_text())
    return json.loads(Path(hub_file(resolved, name, what, flag)).read_text())


def hub_file(repo: str, filename: str, what: str = "base", flag: str = "--base") -> str:
    """Local path of one file of a hub repository: from the Hugging Face cache, else downloaded after ``check_hub``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    check_hub(repo, what, flag)
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # noqa: BLE001 - missing file, network drop: one clear line
        raise CavError(f"could not download {filename} of {what} '{repo}' ({type(exc).__name__}): "
                       f"{_DOWNLOAD_HINT.format(repo=repo, flag=flag)}") from None


def check_hub(repo: str, what: str = "base", flag: str = "--base") -> None:
    """One request with a short timeout: does the hub answer and hold ``repo``? Fails fast instead of retrying."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError):
        raise CavError(f"{what} '{repo}' is not a model on the Hugging Face hub (or it is private or gated): "
                       "check the id, or log in with `hf auth login`") from None
    except Exception as exc:  # noqa: BLE001 - offline, DNS, timeout, HF_HUB_OFFLINE: all mean "not reachable"
        raise CavError(f"{what} '{repo}' is not in the Hugging Face cache and the hub cannot be reached "
                       f"({type(exc).__name__}): {_DOWNLOAD_HINT.format(repo=repo, flag=flag)}") from None


def hub_cached(repo: str, filename: str = "model_index.json") -> bool:
    """Whether the Hugging Face cache holds ``filename`` of ``repo`` (then loading needs no network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def _hub_kwargs(source: str, what: str, flag: str, marker: str = "model_index.json") -> dict:
    """``from_pretrained`` arguments for a folder or hub id: a cached hub id loads offline, an uncached one is checked
    with one fast request first (diffusers and transformers would retry for ~30 s before failing)."""
    if Path(source).is_dir():
        return {}
    if hub_cached(source, marker):
        return {"local_files_only": True}
    check_hub(source, what, flag)
    return {}


def read_config(base: str | Path, component: str) -> dict:
    """``config.json`` of one component (unet, vae, text_encoder) of a base, reading no weights (see ``_read_json``)."""
    return _read_json(resolve_base(base), f"{component}/config.json", "base")


def read_unet_config(base: str | Path) -> dict:
    """The UNet config of a base, reading one small JSON file and no weights."""
    return read_config(base, "unet")


def resolve_motion_adapter(adapter: str | Path) -> str:
    """Check a local MotionAdapter folder (``config.json`` + weights) or pass a hub id through."""
    adapter = str(adapter)
    path = Path(adapter).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CavError(f"motion adapter '{adapter}' is not a diffusers MotionAdapter folder (no config.json): "
                           "pass a folder like animatediff-motion-adapter-v1-5-2 or a hub id")
        return str(path)
    if _HUB_ID.match(adapter):
        return adapter
    raise CavError(f"motion adapter '{adapter}' does not exist: pass an existing folder or a hub id (owner/name)")


def read_motion_adapter_config(adapter: str | Path) -> dict:
    config = _read_json(resolve_motion_adapter(adapter), "config.json", "motion adapter", "--motion-adapter")
    if config.get("_class_name", "MotionAdapter") != "MotionAdapter":
        raise CavError(f"'{adapter}' holds a {config['_class_name']}, not a MotionAdapter: pass an AnimateDiff motion adapter")
    return config


def _condition_of(index: dict) -> str:
    """The text condition a model_index.json describes: the condition whose text encoders (folder and class) are
    exactly the index's (Wan: umT5); an index without that says (config-only folders): SDXL layouts have a second
    text encoder."""
    encoders = {k: v[1] for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0]}
    for condition in dict.fromkeys(f.condition for f in FAMILIES.values()):
        if encoders == {p.encoder: p.encoder_class for p in condition.parts}:
            return condition.name
    return "sdxl" if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None else "clip"


# --experts: the first (high-noise) or the second (low-noise) denoiser of a two-expert base, or both (``Experts``)
EXPERTS = ("high", "low", "both")


class Experts(torch.nn.Module):
    """``--experts both``: a two-expert base's experts as one denoiser, so the trainer still calls one model. Each
    batch row runs on the expert the pipeline uses at its timestep (high noise at or above ``boundary``), so every
    draw of a training step reaches its own expert. Module names carry the expert's component name
    (``transformer.blocks.0…``, ``transformer_2.blocks.0…``): an adapter injected by name (``lora_scope`` widens its
    target regex) lives in both experts and activates, trains, saves and loads as one."""

    _supports_gradient_checkpointing = True

    def __init__(self, experts: dict[str, torch.nn.Module], boundary: float):
        super().__init__()
        self.parts = tuple(experts)  # pipeline order: high noise, low noise
        for name, model in experts.items():
            self.add_module(name, model)
        self.boundary = float(boundary)
        self.lora_scope = rf"(?:{'|'.join(map(re.escape, self.parts))})\."

    def models(self) -> dict[str, torch.nn.Module]:
        return {p: getattr(self, p) for p in self.parts}

    @property
    def config(self):
        return self.models()[self.parts[0]].config

    @property
    def dtype(self) -> torch.dtype:
        return self.models()[self.parts[0]].dtype

    def enable_gradient_checkpointing(self) -> None:
        for model in self.models().values():
            model.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for model in self.models().values():
            model.disable_gradient_checkpointing()

    def load_lora_adapter(self, *args, **kwargs):
        """An image LoRA file (``--s-lora-from``, ``--image-lora FILE``) is one model's: refused on both experts."""
        raise CavError("an image LoRA file goes into one expert: with it, use an adapter of --experts high or low "
                       "(or a run folder's own S-LoRA)")

    def forward(self, hidden_states, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        n = hidden_states.shape[0]
        t = timestep.reshape(-1).expand(n) if timestep.numel() == 1 else timestep
        high = t >= self.boundary
        out = None
        for model, rows in zip(self.models().values(), (high, ~high)):
            idx = rows.nonzero().flatten()
            if idx.numel() == n:  # every row on one expert: the call as it is
                return model(hidden_states, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
            if idx.numel():
                part = model(hidden_states[idx], t[idx], encoder_hidden_states[idx], *args, return_dict=False,
                             **kwargs)[0]
                out = (part.new_zeros((n, *part.shape[1:])) if out is None else out).index_copy(0, idx, part)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def experts_of(index: dict, family: Family) -> tuple[str, ...]:
    """The denoiser components a model_index.json names, in the pipeline's order: ``(folder,)``, or two experts
    ``(folder, folder_2)`` (Wan 2.2 T2V-A14B: ``transformer`` for the high-noise steps, ``transformer_2`` for the
    low-noise ones, switched at the pipeline's ``boundary_ratio``)."""
    second = index.get(f"{family.model_folder}_2")
    if isinstance(second, list) and second[0] is not None:
        return family.model_folder, f"{family.model_folder}_2"
    return (family.model_folder,)


def expert_parts(family: Family, expert: str) -> tuple[str, ...]:
    """The component names of ``--experts`` ``high`` / ``low`` / ``both`` (``transformer`` / ``transformer_2``)."""
    parts = (family.model_folder, f"{family.model_folder}_2")
    return parts if expert == "both" else (parts[EXPERTS.index(expert)],)


def chosen_expert(experts: str | None, n_experts: int, base=None, folder: str = "transformer") -> str | None:
    """The one ``--experts`` rule: the expert the LoRAs train on, ``experts`` (default ``high``) on a two-expert
    base, None on a one-expert one, where ``--experts`` is refused in one line, as is a value that is no choice.
    ``base`` (its name, when known) and ``folder`` (the denoiser's) only word the message. ``check_experts`` (from
    the base's files) and the Wan dry run (``cav.wan.checks.check_run``, ``cav.wan.plan``) both ask it."""
    if experts is not None and experts not in EXPERTS:
        raise CavError(f"--experts {experts} is not a choice: pass --experts {', '.join(EXPERTS[:-1])} or {EXPERTS[-1]}")
    if n_experts == 1:
        if experts:
            where = f"base '{base}'" if base is not None else "this base"
            raise CavError(f"--experts {experts} needs a two-expert base (Wan 2.2 T2V-A14B), but {where} has one "
                           f"{folder}: drop --experts")
        return None
    return experts or "high"


def check_experts(base, experts: str | None, family: Family | None = None) -> str | None:
    """``--experts`` against the base's model_index.json, before any weight loads (``chosen_expert``)."""
    family = family or family_of(base)
    try:
        index = _read_json(resolve_base(base), "model_index.json", "base")
    except CavError:  # an unreachable hub id: loading it reports the problem
        return experts
    return chosen_expert(experts, len(experts_of(index, family)), base, family.model_folder)


def _model_class(index: dict) -> str | None:
    """The class of the denoiser a model_index.json names (in the first model folder a family uses)."""
    folders = dict.fromkeys(f.model_folder for f in FAMILIES.values())
    return next((index[k][1] for k in folders if index.get(k)), None)


def family_of(base: str | Path, motion_adapter: str | None = None) -> Family:
    """The family of a base, from its model_index.json (and whether an add-on such as a motion adapter animates it):
    the row whose model class (or whose add-on's image class) and text condition the folder has."""
    resolved = resolve_base(base)
    try:
        index = _read_json(resolved, "model_index.json", "base")
    except CavError:  # an unreachable hub id: take the family the arguments say; loading it reports the problem
        index = {}
    condition = _condition_of(index)
    addons = [f for f in FAMILIES.values() if f.addon and f.condition.name == condition]
    model_cls = _model_class(index) or (addons[0].addon.image_class if motion_adapter and addons
                                        else LEGACY.model_class)
    if motion_adapter:
        family = next((f for f in addons if f.addon.image_class == model_cls), None)
        if family is None:
            image = " or ".join(dict.fromkeys(f.addon.image_class for f in FAMILIES.values() if f.addon))
            raise CavError(f"--motion-adapter needs an image model base ({image}), but '{base}' has a {model_cls}: "
                           "pass a Stable Diffusion folder or drop --motion-adapter")
        return family
    family = next((f for f in FAMILIES.values() if f.model_class == model_cls and f.condition.name == condition),
                  None)
    if family is not None:
        return family
    animated = next((f for f in addons if f.addon.image_class == model_cls), None)
    if animated is not None:
        raise CavError(f"base '{base}' is an image model: pass {animated.addon.flag} (e.g. {animated.addon.example}) "
                       "to animate it with AnimateDiff")
    known = ", ".join(dict.fromkeys(f.model_class for f in FAMILIES.values()))
    raise CavError(f"base '{base}' has a {model_cls}: cav supports bases whose unet is one of {known}")


def check_motion_adapter_fits(unet_config: dict, adapter_config: dict, adapter: str) -> None:
    """A motion adapter must have one motion block per UNet block, with the same channels."""
    unet_ch = list(unet_config["block_out_channels"])
    ad_ch = list(adapter_config.get("block_out_channels", ()))
    if unet_ch != ad_ch:
        raise CavError(f"motion adapter '{adapter}' is made for UNet channels {ad_ch}, but the image UNet has "
                       f"{unet_ch}: pick the motion adapter of this base (e.g. v1-5-2 for Stable Diffusion 1.5, "
                       "sdxl-beta for SDXL)")


def empty_unet(base: str | Path, motion_adapter: str | None = None) -> tuple[torch.nn.Module, Family]:
    """The base's UNet built on the meta device from its config files alone (no weights), and its family."""
    import diffusers
    from accelerate import init_empty_weights

    family = family_of(base, motion_adapter)
    config = read_config(base, family.model_folder)
    with init_empty_weights():
        if motion_adapter:  # the image model + the family's add-on
            ad_config = read_motion_adapter_config(motion_adapter)
            check_motion_adapter_fits(config, ad_config, motion_adapter)
            image = getattr(diffusers, family.addon.image_class).from_config(config)
            adapter = getattr(diffusers, family.addon.addon_class).from_config(ad_config)
            unet = motion_unet(image, adapter, motion_adapter, load_weights=False)
        else:
            unet = getattr(diffusers, family.model_class).from_config(config)
    return unet, family


def motion_unet(image_unet, adapter, name: str = "motion adapter", load_weights: bool = True):
    """The ``UNetMotionModel`` of an image UNet plus a motion adapter, carrying *every* image weight.

    diffusers 0.42.1's ``UNetMotionModel.from_unet2d`` copies the blocks, time embedding and conv layers but not
    ``add_embedding``, SDXL's projection of the pooled text embedding and time ids, which stays at its random init;
    so every image weight is copied again by name (the motion UNet names them as the image UNet does)."""
    from diffusers import UNetMotionModel

    try:
        unet = UNetMotionModel.from_unet2d(image_unet, adapter, load_weights=load_weights)
    except (ValueError, RuntimeError) as exc:  # diffusers' own compatibility checks
        first = str(exc).strip().splitlines()[0][:160]
        raise CavError(f"motion adapter '{name}' does not fit the image UNet ({first}): "
                       "pick the motion adapter of this base") from None
    if load_weights:
        unexpected = unet.load_state_dict(image_unet.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise CavError(f"motion adapter '{name}' does not fit the image UNet (no place for {unexpected[0]}): "
                           "pick the motion adapter of this base")
    return unet

# ------------------------------------------------------------------------------------------- shape constraints
def shape_unit(unet_config: dict, vae_config: dict) -> tuple[int, str]:
    """The pixel multiple every height and width must be, and why (for messages).

    Three constraints, all read from the configs: the VAE halves the frame ``len(block_out_channels) - 1`` times;
    every down block of the UNet but the last halves the latent again (a latent that does not divide evenly is
    resized on the way up, so its skip features no longer line up with the pixels the model was trained on); and the
    diffusers pipelines that make every sample refuse sizes that are not multiples of 8.
    """
    vae = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet = 2 ** (len(unet_config["down_block_types"]) - 1)
    unit = math.lcm(vae * unet, PIPELINE_MULTIPLE)
    n = len(unet_config["down_block_types"])
    why = (f"the VAE shrinks frames {vae}x and the UNet's {n} down blocks {unet}x more"
           f"{'; sampling needs multiples of 8' if unit != vae * unet else ''}")
    return unit, why


def check_shape(base: str | Path, size, frames: int, *, motion_adapter: str | None = None,
                unet_config: dict | None = None, vae_config: dict | None = None, family: Family | None = None) -> None:
    """Refuse, before any work, a size or frame count the base cannot take, from its config files alone (or the
    configs given, e.g. a loaded model's), by the rule of its family's latents (``Family.latents.check_shape``).
    ``family`` None: the base's (its folder read), or, with configs given, the row whose model class the config
    names (a UNet's rule when none does)."""
    if family is None:
        family = (family_of(base, motion_adapter) if unet_config is None else
                  next((f for f in FAMILIES.values() if f.model_class == unet_config.get("_class_name")), LEGACY))
    unet_config = read_config(base, family.model_folder) if unet_config is None else unet_config
    vae_config = read_config(base, "vae") if vae_config is None else vae_config
    family.latents.check_shape(base, size, frames, unet_config, vae_config, motion_adapter)


def check_unet_shape(base, size, frames: int, unet_config, vae_config, motion_adapter: str | None = None) -> None:
    """The UNet families' rule: height and width multiples of ``shape_unit``, the message naming the nearest valid
    sizes; the frame limit is the UNet's (or the motion adapter's) ``motion_max_seq_length`` when it has one."""
    unit, why = shape_unit(unet_config, vae_config)
    h, w = (int(s) for s in size)
    if h % unit or w % unit or min(h, w) < unit:
        options = _nearby(h, w, unit)
        raise CavError(f"--size {h}x{w} does not fit base '{base}': height and width must be multiples of {unit} "
                       f"({why}): use {' or '.join(options)}")
    limit = next((unet_config[k] for k in FRAME_LIMIT_KEYS if unet_config.get(k) is not None), None)
    if limit is None and motion_adapter:
        ad_config = read_motion_adapter_config(motion_adapter)
        limit = next((ad_config[k] for k in FRAME_LIMIT_KEYS if ad_config.get(k) is not None), None)
    if limit is not None and frames > int(limit):
        raise CavError(f"--frames {frames} is more than base '{base}' takes (its motion modules have positions for "
                       f"{limit} frames): use --frames {limit} or fewer")


def _nearby(h: int, w: int, unit: int) -> list[str]:
    """The valid sizes just below and just above (h, w), as 'H' (square) or 'HxW' strings."""
    def around(x: int) -> list[int]:
        low, high = max(unit, x // unit * unit), max(unit, -(-x // unit) * unit)
        return sorted({low, high})

    hs, ws = around(h), around(w)
    if h == w:
        return [str(s) for s in hs]
    return [f"{a}x{b}" for a, b in dict.fromkeys([(hs[0], ws[0]), (hs[-1], ws[-1])])]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CavError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CavError("device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise CavError(f"unknown dtype '{dtype}': use auto, fp32, fp16 or bf16")
    if device.type == "cpu" and table[dtype] == torch.float16:  # measured: the loss turns nan within steps
        raise CavError("fp16 is not for CPUs: use --dtype fp32 or auto")
    return table[dtype]


@dataclass
class Backbone:
    """The parts of a T2V model that cav trains on and samples from."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    source: str
    device: torch.device
    dtype: torch.dtype
    family: Family  # the base's row of families.FAMILIES
    motion_adapter: str | None = None
    reported: set = field(default_factory=set, repr=False, compare=False)  # prompts already warned about (cut)
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (OpenCLIP bigG) and its tokenizer
    tokenizer_2: object = None
    # a two-expert base: the expert ``unet`` is (high / low), its component name, the other expert(s) by component
    # name, and the pipeline's boundary_ratio (None: one denoiser, ``unet``)
    expert: str | None = None
    part: str = ""
    others: dict = field(default_factory=dict)
    boundary_ratio: float | None = None
    # (cond, prompts) → cond: what `cav generate` puts into the sampled condition after the pipeline encoded it
    # (Wan's prompt vectors: ``wan.prompt_vectors.OutputVectors.apply_files``); empty: the pipeline's own, untouched
    condition_edits: list = field(default_factory=list, repr=False, compare=False)
    # ``load(swap_blocks=True)``: each denoiser's block swap by component name (``wan.offload.BlockSwap``, attached
    # for the backbone's life) and their shared ledger (``wan.offload.Residency``); empty / None: no swap
    swaps: dict = field(default_factory=dict, repr=False, compare=False)
    residency: object = field(default=None, repr=False, compare=False)
    # a training run of a condition that encodes once (``textcache``: Wan's umT5): every text of the run, encoded at
    # its start; the text encoder is then released (None). None: the encoder encodes each call (generate, UNet3D)
    text_cache: object = field(default=None, repr=False, compare=False)

    @property
    def condition(self):
        """How this base's UNet is conditioned on text (the family's ``conditioning`` class)."""
        return self.family.condition

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders still loaded (none once a ``text_cache`` released them)."""
        return [m for m in (getattr(self, part.encoder) for part in self.condition.parts) if m is not None]

    def text_parts(self) -> list[tuple[str | None, object, torch.nn.Module]]:
        """(textual-inversion file key, tokenizer, text encoder) of each text encoder: where TI tokens go."""
        return [(p.ti_key, getattr(self, p.tokenizer), getattr(self, p.encoder)) for p in self.condition.parts]

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        return self.family.latents.spatial_factor(self.vae.config)

    @property
    def latents(self):
        """How this base's VAE makes the latents its denoiser sees (the family's ``latents``)."""
        return self.family.latents

    def encode_prompt(self, prompt: str, grad: bool = False) -> torch.Tensor:
        """The text condition (1, L, D) of ``prompt`` as the base's family builds it (``conditioning``); from the
        run's ``text_cache`` when it has one."""
        if self.text_cache is not None and not grad:
            return self.text_cache.get(prompt)
        return self.condition.encode(self, [prompt], grad)

    def pipeline_condition(self, pipe, prompts: list[str], device, guidance: bool, negatives) -> tuple:
        """(condition, unconditional or None) exactly as the family's pipeline encodes them: the pipeline's own
        encoding, or the run's ``text_cache`` (the same tensors, encoded at the run's start)."""
        if self.text_cache is not None:
            return self.text_cache.pipeline(prompts, device, guidance, negatives)
        return self.condition.pipeline_encode(pipe, prompts, device, guidance, negatives)

    def sampling_condition(self, pipe, prompts: list[str], device, guidance: bool, negatives) -> tuple:
        """(condition, unconditional or None) as the pipeline encodes them, with ``condition_edits`` applied."""
        cond, uncond = self.pipeline_condition(pipe, prompts, device, guidance, negatives)
        for edit in self.condition_edits:
            cond = edit(cond, prompts)
        return cond, uncond

    def prompt_inputs(self, pipe, prompts: list[str], guidance: float, negatives) -> dict:
        """The prompt arguments of a pipeline call: the texts (the pipeline encodes them), or with
        ``condition_edits`` or a ``text_cache`` the encodings (``prompt_embeds``, ``negative_prompt_embeds``)."""
        if not self.condition_edits and self.text_cache is None:
            return {"prompt": list(prompts), "negative_prompt": negatives}
        cond, uncond = self.sampling_condition(pipe, list(prompts), self.device, guidance > 1.0, negatives)
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) of frames (N, 3, H, W) in [-1, 1], each an independent image (image mode)."""
        return self.latents.encode_frames(self, frames)

    def encode_clip(self, frames: torch.Tensor) -> torch.Tensor:
        """Latents (1, C, F', h, w) of a clip (F, 3, H, W) in [-1, 1] as the base's video model sees it."""
        return self.latents.encode_clip(self, frames)

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', h, w) → the video tensor ``pipe.video_processor`` post-processes."""
        return self.latents.decode(self, pipe, latents)

    def denoisers(self) -> dict[str, torch.nn.Module]:
        """The pipeline's denoisers by component name, in its order: ``unet`` alone, or both experts."""
        if isinstance(self.unet, Experts):
            return self.unet.models()
        parts = {self.part or self.family.model_folder: self.unet, **self.others}
        return {name: parts[name] for name in sorted(parts, key=lambda n: (len(n), n))}  # transformer, transformer_2

    @property
    def boundary(self) -> float | None:
        """The timestep at and above which the high-noise expert denoises (the pipeline's rule); None: one denoiser."""
        if self.boundary_ratio is None:
            return None
        return float(self.boundary_ratio) * int(self.scheduler.config.num_train_timesteps)

    def denoiser_at(self, t: torch.Tensor) -> torch.nn.Module:
        """The denoiser the pipeline runs at timestep ``t``: ``unet``, or on a two-expert base the high-noise expert
        at or above the boundary and the low-noise one below (as ``WanPipeline`` switches)."""
        if self.boundary is None:
            return self.unet
        high, low = self.denoisers().values()
        return high if float(t.reshape(-1)[0]) >= self.boundary else low

    def train_window(self, window: tuple[int, int] | None) -> tuple[int, int] | None:
        """The [low, high) training timesteps of a stage on ``unet``: ``window`` (None: the whole schedule) cut to the
        trained expert's noise range on a two-expert base (high: at or above the boundary; low: below; both: the
        whole window, each draw routed by ``Experts``)."""
        if self.boundary is None or self.expert == "both":
            return window
        lo, hi = window or (0, int(self.scheduler.config.num_train_timesteps))
        edge = math.ceil(self.boundary)
        lo, hi = (max(lo, edge), hi) if self.expert == "high" else (lo, min(hi, edge))
        if lo >= hi:
            raise CavError(f"--t-lora-timesteps {list(window)} lies outside the {self.expert}-noise expert's range "
                           f"(boundary {edge}): pass --t-lora-timesteps that overlap it, or the other --experts")
        return lo, hi

    def pipeline(self):
        """The family's diffusers pipeline (``TextToVideoSDPipeline``, ``AnimateDiffPipeline``,
        ``AnimateDiffSDXLPipeline``, ``WanPipeline``) over these very modules (no copies)."""
        import diffusers

        family = self.family
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = {name: getattr(self, name) for part in self.condition.parts
                    for name in (part.encoder, part.tokenizer)}
            pipe = getattr(diffusers, family.pipeline_class)(
                vae=self.vae,
                **text,
                **self.denoisers(),  # the pipeline names a denoiser as its folder: unet, transformer (transformer_2)
                scheduler=family.objective.sampler(self.scheduler.config),
                **dict(family.pipeline_extra),
                **({"boundary_ratio": self.boundary_ratio} if self.boundary_ratio is not None else {}),
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _load_unet(family: Family, source: str, motion_adapter: str | None, dt: torch.dtype, kw: dict,
               folder: str | None = None) -> torch.nn.Module:
    import diffusers

    folder = folder or family.model_folder
    if not motion_adapter:
        return getattr(diffusers, family.model_class).from_pretrained(source, subfolder=folder, torch_dtype=dt, **kw)
    adapter_src = resolve_motion_adapter(motion_adapter)  # the image model + the family's add-on
    image = getattr(diffusers, family.addon.image_class).from_pretrained(source, subfolder=folder, torch_dtype=dt, **kw)
    adapter_kw = _hub_kwargs(adapter_src, "motion adapter", family.addon.flag, marker="config.json")
    adapter = getattr(diffusers, family.addon.addon_class).from_pretrained(adapter_src, torch_dtype=dt, **adapter_kw)
    check_motion_adapter_fits(dict(image.config), dict(adapter.config), motion_adapter)
    return motion_unet(image, adapter, motion_adapter)


def attach_condition(unet: torch.nn.Module, family: Family, vae_factor: int = 8) -> None:
    """Register the forward pre-hook that turns cav's one text-condition tensor per video into what the family's
    UNet takes (nothing for a UNet that takes it as it is). ``vae_factor`` turns latent sizes into the pixel sizes of
    SDXL's time ids."""
    condition = family.condition
    if family.per_frame_condition or condition.packed:
        unet.register_forward_pre_hook(
            lambda module, args, kwargs: _adapt_condition(module, args, kwargs, condition, family.per_frame_condition,
                                                          vae_factor), with_kwargs=True)


def _adapt_condition(module, args: tuple, kwargs: dict, condition, per_frame: bool, vae_factor: int):
    """Unpack a packed condition into ``added_cond_kwargs`` (``conditioning`` module doc), then repeat a per-video
    condition (B, L, D) for each frame of a (B, C, F, H, W) sample: ``UNetMotionModel`` takes it per frame, as
    ``AnimateDiffPipeline`` passes it. A call that brings its own ``added_cond_kwargs`` or a per-frame condition
    (the pipeline's) is left alone."""
    if len(args) > 3:  # positional arguments beyond the condition: a caller that passes the UNet's own inputs
        return None
    call = {**dict(zip(("sample", "timestep", "encoder_hidden_states"), args)), **kwargs}
    sample, cond = call.get("sample"), call.get("encoder_hidden_states")
    if sample is None or cond is None:
        return None
    if condition.packed and call.get("added_cond_kwargs") is None:
        call["encoder_hidden_states"], call["added_cond_kwargs"] = condition.unpack(module.config, sample, cond,
                                                                                    vae_factor)
    cond = call["encoder_hidden_states"]
    if per_frame and sample.ndim == 5 and sample.shape[2] > 1 and cond.shape[0] == sample.shape[0]:
        call["encoder_hidden_states"] = cond.repeat_interleave(sample.shape[2], dim=0)
    return (), call


def load(base: str | Path = "toy", device: str = "auto", dtype: str = "auto",
         motion_adapter: str | None = None, experts: str | None = None, swap_blocks: bool = False) -> Backbone:
    """Load a base model (see module doc) with frozen weights on ``device`` in ``dtype``; on a two-expert base both
    experts, ``Backbone.unet`` being the one ``experts`` names (default high).

    ``swap_blocks`` (``--offload-frozen`` where it applies, ``run._load_backbone``) on a family with a block swap
    (``Family.block_swap``: Wan): each denoiser is loaded onto the CPU and only its non-block parts go to ``device``;
    its blocks' weights stay on the CPU and visit ``device`` through the swap (``Backbone.swaps``), which stays
    attached for the backbone's life, so the blocks are never all on the device, not even while loading. ``device``
    may be the CPU itself: the swap then runs with the CPU as both devices (its copies, hooks and ledger as on a
    GPU), which is how the tests check it on a machine without a GPU; ``--offload-frozen`` alone never does that
    (on a CPU it is a no-op, ``wan.checks.offload_plan``)."""
    import diffusers
    import transformers

    source = resolve_base(base)
    motion_adapter = str(motion_adapter) if motion_adapter else None
    family = family_of(source, motion_adapter)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = _hub_kwargs(source, "base", "--base")
    try:
        index = _read_json(source, "model_index.json", "base")
    except CavError:  # an unreachable hub id: from_pretrained below reports it
        index = {}
    parts = experts_of(index, family)
    expert = chosen_expert(experts, len(parts), base, family.model_folder)
    text = {}
    try:
        denoisers = {part: _load_unet(family, source, motion_adapter, dt, kw, part) for part in parts}
        vae = getattr(diffusers, family.vae_class).from_pretrained(source, subfolder="vae", torch_dtype=dt, **kw)
        for part in family.condition.parts:  # the family's text encoder(s) and tokenizer(s)
            text[part.encoder] = getattr(transformers, part.encoder_class).from_pretrained(
                source, subfolder=part.encoder, torch_dtype=dt, **kw)
            text[part.tokenizer] = getattr(transformers, part.tokenizer_class).from_pretrained(
                source, subfolder=part.tokenizer, **kw)
        scheduler = getattr(diffusers, family.objective.scheduler_class).from_pretrained(source, subfolder="scheduler",
                                                                                         **kw)
    except CavError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CavError(f"could not load base '{base}': {first[:200]} — check the folder is a complete diffusers T2V model") from None
    for model in denoisers.values():
        attach_condition(model, family, family.latents.spatial_factor(vae.config))
        if family.denoiser_setup is not None:
            family.denoiser_setup(model, dt)
    encoders = [text[p.encoder] for p in family.condition.parts]
    swapped = swap_blocks and family.block_swap is not None
    for module in (*denoisers.values(), vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        if not (swapped and any(module is d for d in denoisers.values())):
            module.to(dev)
    swaps, residency = {}, None
    if swapped:  # each denoiser's blocks stay where they loaded (the CPU): the swap brings them to ``dev`` in turn
        from .wan.offload import Residency

        residency = Residency()
        swaps = {part: family.block_swap(model, dev, residency, part) for part, model in denoisers.items()}
    ratio = index.get("boundary_ratio")
    if expert == "both":
        if ratio is None:
            raise CavError(f"base '{base}' has two experts but no boundary_ratio in model_index.json: pass "
                           "--experts high or low")
        unet, part = Experts(denoisers, float(ratio) * int(scheduler.config.num_train_timesteps)), ""
        denoisers = {}
    else:
        part = expert_parts(family, expert)[0] if expert else parts[0]
        unet = denoisers.pop(part)
    two = {"expert": expert, "part": part, "others": denoisers, "boundary_ratio": ratio} if expert else {}
    return Backbone(unet, vae, text.pop("text_encoder"), text.pop("tokenizer"), scheduler, source, dev, dt,
                    family, motion_adapter, **text, **two, swaps=swaps, residency=residency)
