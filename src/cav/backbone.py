"""Load a text-to-video model in the diffusers layout; the only module that knows diffusers pipeline classes.

A *base* is one of:
- ``toy``: the tiny model trained on the toy world and shipped inside the package (the embedded default);
- a local folder in the diffusers layout of ModelScope / Zeroscope (``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``);
- a hub id such as ``damo-vilab/text-to-video-ms-1.7b`` (needs network or a populated local cache).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CavError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    """The UNet config of a base, reading one small JSON file and no weights."""
    resolved = resolve_base(base)
    local = Path(resolved) / "unet" / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(resolved, "unet/config.json")).read_text())
    except Exception as exc:  # network or cache errors: one clear line
        raise CavError(f"could not read unet/config.json of '{base}' ({type(exc).__name__}): pass a local folder") from None


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
    try:
        index = json.loads((Path(source) / "model_index.json").read_text()) if Path(source).is_dir() else {}
        unet_cls = index.get("unet", [None, "UNet3DConditionModel"])[1]
        if unet_cls != "UNet3DConditionModel":
            raise CavError(
                f"base '{base}' has a {unet_cls}, not a UNet3DConditionModel: cav supports ModelScope/Zeroscope-layout models"
            )
        unet = UNet3DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dt)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dt)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dt)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
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
