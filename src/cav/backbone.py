"""Load a text-to-video model in the diffusers layout; the only module that knows diffusers pipeline classes.

A *base* is one of:
- ``toy``: the tiny model trained on the toy world and shipped inside the package (the embedded default);
- a local folder in the diffusers layout of ModelScope / Zeroscope (``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``);
- a hub id such as ``damo-vilab/text-to-video-ms-1.7b`` (needs network or a populated local cache).
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

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ASSETS = Path(__file__).parent / "assets"
# hub ids whose config files ship in ``assets/`` as <prefix>_<component>_config.json (plans and checks work offline)
SHIPPED_CONFIGS = {"damo-vilab/text-to-video-ms-1.7b": "modelscope"}
HUB_TIMEOUT_S = 5.0  # one request to the hub before a download; its absence is reported instead of retried
PIPELINE_MULTIPLE = 8  # diffusers' TextToVideoSDPipeline.check_inputs: height and width divisible by 8
FRAME_LIMIT_KEY = "motion_max_seq_length"  # a UNet config key that bounds frames (UNet3D has none: no positional
#                                            embeddings in its temporal attention)
_DOWNLOAD_HINT = "download the model where the hub is reachable (`hf download {repo} --local-dir DIR`) and pass --base DIR"


def resolve_base(base: str | Path) -> str:
    """Map ``toy`` to the shipped model; check a local folder's layout; pass a hub id through."""
    base = str(base)
    if base == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise CavError(
                f"the embedded toy model is missing from {TOY_MODEL_DIR}: reinstall cav or train it with `cav toy train-base`"
            )
        return str(TOY_MODEL_DIR)
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise CavError(
                f"base '{base}' is not a diffusers text-to-video folder (no model_index.json): "
                "pass a folder like text-to-video-ms-1.7b, a hub id, or `toy`"
            )
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise CavError(f"base '{base}' misses component folder(s) {', '.join(missing)}: download the complete model")
        return str(path)
    if _HUB_ID.match(base) and not base.startswith((".", "/")):
        return base
    raise CavError(f"base '{base}' does not exist: pass an existing folder, a hub id (owner/name), or `toy`")


def read_unet_config(base: str | Path) -> dict:
    """The UNet config of a base, reading one small JSON file and no weights (see ``read_config``)."""
    return read_config(base, "unet")


def read_config(base: str | Path, component: str) -> dict:
    """``config.json`` of one component (unet, vae, text_encoder) of a base, without weights.

    Looked up where it is known locally first, so plans and checks work offline: the base's folder, the configs
    shipped in the package for known hub ids (``SHIPPED_CONFIGS``), the Hugging Face cache; only then the hub, with
    one quick request that fails fast (``check_hub``) when the hub cannot be reached.
    """
    resolved = resolve_base(base)
    name = f"{component}/config.json"
    if Path(resolved).is_dir():
        local = Path(resolved) / name
        if not local.is_file():
            raise CavError(f"base '{base}' has no {name}: download the complete model")
        return json.loads(local.read_text())
    shipped = ASSETS / f"{SHIPPED_CONFIGS.get(resolved)}_{component}_config.json"
    if resolved in SHIPPED_CONFIGS and shipped.is_file():
        return json.loads(shipped.read_text())
    return json.loads(Path(hub_file(resolved, name)).read_text())


def hub_file(repo: str, filename: str) -> str:
    """Local path of one file of a hub model: from the Hugging Face cache, else downloaded (after ``check_hub``)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    check_hub(repo)
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # noqa: BLE001 - missing file, network drop: one clear line
        raise CavError(f"could not download {filename} of '{repo}' ({type(exc).__name__}): {_DOWNLOAD_HINT.format(repo=repo)}") from None


def check_hub(repo: str) -> None:
    """One request with a short timeout: does the hub answer and hold ``repo``? Fails fast instead of retrying."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError):
        raise CavError(f"base '{repo}' is not a model on the Hugging Face hub (or it is private or gated): "
                       "check the id, or log in with `hf auth login`") from None
    except Exception as exc:  # noqa: BLE001 - offline, DNS, timeout, HF_HUB_OFFLINE: all mean "not reachable"
        raise CavError(f"base '{repo}' is not in the Hugging Face cache and the hub cannot be reached "
                       f"({type(exc).__name__}): {_DOWNLOAD_HINT.format(repo=repo)}") from None


def hub_cached(repo: str) -> bool:
    """Whether the Hugging Face cache holds ``repo``'s model_index.json (then loading needs no network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)


# ------------------------------------------------------------------------------------------- shape constraints
def shape_unit(unet_config: dict, vae_config: dict) -> tuple[int, str]:
    """The pixel multiple every height and width must be, and why (for messages).

    Three constraints, all read from the configs: the VAE halves the frame ``len(block_out_channels) - 1`` times;
    every down block of the UNet but the last halves the latent again (a latent that does not divide evenly is
    resized on the way up, so its skip features no longer line up with the pixels the model was trained on); and
    diffusers' TextToVideoSDPipeline, which makes every sample, refuses sizes that are not multiples of 8.
    """
    vae = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet = 2 ** (len(unet_config["down_block_types"]) - 1)
    unit = math.lcm(vae * unet, PIPELINE_MULTIPLE)
    n = len(unet_config["down_block_types"])
    why = (f"the VAE shrinks frames {vae}x and the UNet's {n} down blocks {unet}x more"
           f"{'; sampling needs multiples of 8' if unit != vae * unet else ''}")
    return unit, why


def check_shape(base: str | Path, size, frames: int, *, unet_config: dict | None = None,
                vae_config: dict | None = None) -> None:
    """Refuse, before any work, a size or frame count the base cannot take (read from its config files alone, or
    from the configs given, e.g. a loaded model's). ``size`` is (height, width) in pixels. The message names the
    nearest valid sizes."""
    unet_config = read_config(base, "unet") if unet_config is None else unet_config
    vae_config = read_config(base, "vae") if vae_config is None else vae_config
    unit, why = shape_unit(unet_config, vae_config)
    h, w = (int(s) for s in size)
    if h % unit or w % unit or min(h, w) < unit:
        options = _nearby(h, w, unit)
        raise CavError(f"--size {h}x{w} does not fit base '{base}': height and width must be multiples of {unit} "
                       f"({why}): use {' or '.join(options)}")
    limit = unet_config.get(FRAME_LIMIT_KEY)
    if limit is not None and frames > int(limit):
        raise CavError(f"--frames {frames} is more than base '{base}' takes ({FRAME_LIMIT_KEY} {limit}): "
                       f"use --frames {limit} or fewer")


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
    reported: set = field(default_factory=set, repr=False, compare=False)  # prompts already warned about (cut)

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self):
        """A diffusers ``TextToVideoSDPipeline`` over these very modules (no copies)."""
        from diffusers import DDIMScheduler, TextToVideoSDPipeline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = TextToVideoSDPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=DDIMScheduler.from_config(self.scheduler.config),
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load(base: str | Path = "toy", device: str = "auto", dtype: str = "auto") -> Backbone:
    """Load a base model (see module doc) with frozen weights on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_base(base)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = {}
    if not Path(source).is_dir():  # a hub id: from the cache without network when it is there, else fail fast
        if hub_cached(source):
            kw = {"local_files_only": True}
        else:
            check_hub(source)
    try:
        index = json.loads((Path(source) / "model_index.json").read_text()) if Path(source).is_dir() else {}
        unet_cls = index.get("unet", [None, "UNet3DConditionModel"])[1]
        if unet_cls != "UNet3DConditionModel":
            raise CavError(
                f"base '{base}' has a {unet_cls}, not a UNet3DConditionModel: cav supports ModelScope/Zeroscope-layout models"
            )
        unet = UNet3DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dt, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dt, **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dt, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except CavError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CavError(f"could not load base '{base}': {first[:200]} — check the folder is a complete diffusers T2V model") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(dev)
    return Backbone(unet, vae, text_encoder, tokenizer, scheduler, source, dev, dt)
