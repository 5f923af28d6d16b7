"""Base families: one record (``Family``) per kind of text-to-video base, one row per family in ``FAMILIES``.

Everything cav knows about a family is a field of its row: the class of its denoiser and the folder it lives in
(``unet/``; a DiT's ``transformer/``), the add-on that turns an image model into one (AnimateDiff's motion adapter),
the pipeline that samples from it, its text condition (``conditioning``), where each adapter goes for each placement
(``adapters/targets.py``), how *image mode* runs (the paper's temporal bypass: ``bypass.py``), its training
objective and how it inverts (``objectives.py``), its export formats, the tiny model tests build, and the model the
speed benchmark builds. The modules named hold the mechanisms; the rows say which one a family uses and with which
facts. The rest of cav passes a ``Family`` along (``Backbone.family``) and never branches on its name; the name is
only what adapters record (``cav.json``) and what users read, turned back into a row by ``get``.

Adding a family is adding a row (and a mechanism only where it is genuinely new).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from .adapters import animatediff_export
from .adapters.targets import BLOCK, DiTPlacement, DiTTargets, UNetTargets
from .bypass import LayerBypass
from .conditioning import ClipCondition, SdxlCondition, UmT5Condition
from .errors import CavError
from .latents import FRAMES
from .objectives import DDPM, FLOW, Objective
from .toy import factory
from .wan import family as wan_family
from .wan import formats as wan_formats

ASSETS = Path(__file__).parent / "assets"


class Targets(Protocol):
    """Where a family's adapters go (``adapters.targets.UNetTargets`` for the UNet families, ``DiTTargets`` for
    Wan)."""

    names: tuple[str, ...]  # the placements the family's model has

    def regex(self, kind: str, placement: str, family: str, blocks=None) -> str: ...

    def heads(self, placement: str) -> float | None: ...  # the share of heads a placement cuts the T-LoRA to


class ImageMode(Protocol):
    """How a family's model runs as an image model (``bypass.LayerBypass`` for the UNet families,
    ``wan.family.FoldFrames`` for Wan)."""

    def __call__(self, model, enabled: bool = True) -> AbstractContextManager: ...

    def modules(self, model) -> list: ...


@dataclass(frozen=True)
class AddOn:
    """A second part that turns an image model into the family's video model (AnimateDiff's ``MotionAdapter``):
    the image model's class, the add-on's diffusers class and the flag that passes it."""

    image_class: str
    addon_class: str
    flag: str
    example: str  # a published add-on of the family, named in messages


@dataclass(frozen=True)
class ExportFormat:
    """A file layout another tool loads a T-LoRA from (`cav export --format NAME`)."""

    name: str
    convert: Callable  # (peft state, rank, alpha) -> state in the target layout
    filename: str
    describe: str
    note: str = "lora_alpha/r is folded into the up weights: load with alpha (strength) 1.0"  # the file's cav_note
    # two-expert bases: the file name's suffix per expert component (a T-LoRA of ``transformer`` is written as
    # ``<stem>_high_noise.safetensors``), the names the community loads the pair by
    expert_suffixes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Tiny:
    """The family's tiny random model for tests, in its diffusers folder layout (``make(dir) -> dir``), and, when the
    family has an add-on, the tiny image model and add-on (``parts(root) -> (image dir, add-on dir)``); ``size`` is
    the pixel size and frame count tests train and sample at."""

    make: Callable[[Path], Path]
    parts: Callable[[Path], tuple[Path, Path]] | None = None
    size: int = 16
    frames: int = 4


@dataclass(frozen=True)
class Rig:
    """What the speed benchmark builds for the family: its denoiser (``size`` "full" or "tiny" -> module, called on
    the meta device) and its full-size text encoder's config (the VAE is Stable Diffusion's, the tokenizer CLIP's);
    or, with ``parts``, the family's own VAE, text encoder, tokenizer and scheduler (``parts(size)`` -> dict of
    ``vae`` / ``text_encoder`` builders and ``tokenizer`` / ``scheduler`` objects). ``frames``: the pixel frames of
    the rig's clip when the benchmark's latent frame count does not fit the family's VAE (None: that count)."""

    label: str
    model: Callable[[str], object]
    full_text: Callable[[], dict] | None = None
    parts: Callable[[str], dict] | None = None
    frames: int | None = None


def _load_image_lora(*args, **kwargs):
    """``adapters.image_lora.load_image_lora``, imported on first use (it imports ``adapters.lora``, which imports
    this module: a top-level import would make importing ``adapters.lora`` first fail)."""
    from .adapters.image_lora import load_image_lora

    return load_image_lora(*args, **kwargs)


@dataclass(frozen=True, eq=False, kw_only=True)
class Family:
    """One kind of text-to-video base (see the module doc). Rows are singletons: equal only to themselves."""

    name: str
    # the shipped recipe (configs/<recipe>.yaml) a base of this family starts from when no name or marker of
    # ``native.BASES`` says more, and the family in words for the messages that name it
    recipe: str
    what: str
    # the model: its denoiser's diffusers class and subfolder, its VAE, and the add-on form (image model + add-on)
    model_class: str
    model_folder: str = "unet"  # also the pipeline's name for it
    vae_class: str = "AutoencoderKL"
    latents: object = FRAMES  # how the VAE makes the denoiser's latents and what shapes it takes (``latents.py``)
    addon: AddOn | None = None
    frame_limit_key: str | None = None  # the config key (model's or add-on's) that bounds the frame count
    # sampling: the diffusers pipeline and the constructor arguments it needs besides the modules
    pipeline_class: str
    pipeline_extra: tuple[tuple[str, object], ...] = ()
    # the text condition: how it is built and passed (``conditioning``); per frame (B·F, L, D) or per video
    condition: object
    per_frame_condition: bool = False
    # the method: where each adapter goes for each placement, how image mode runs, how it trains/samples/inverts
    targets: Targets
    image_mode: ImageMode  # ``image_mode(model)`` is a context manager; ``image_mode.modules(model)`` its layers
    objective: Objective
    # around it: export layouts, the tests' tiny model, the speed benchmark's model
    exports: tuple[ExportFormat, ...] = ()
    # how an image LoRA file of the base's image model is read (``--s-lora-from``; None: not supported yet) and the
    # diffusers class whose ``save_lora_weights`` writes an adapter's diffusers-layout copy
    image_lora: Callable | None = _load_image_lora
    lora_writer: str = "diffusers.loaders:StableDiffusionLoraLoaderMixin"
    tiny: Tiny
    rig: Rig | None = None
    # the dry run's training-memory estimate, ``memory(cfg, read) -> dict`` with ``read(name)`` a JSON file of the
    # base (None: the family has no estimate; the UNet families' memory is measured by `cav bench speed`)
    memory: Callable | None = None
    # ``--offload-frozen`` on the denoiser: ``block_swap(denoiser, device, residency, name)`` keeps its blocks'
    # frozen weights off the device between their uses (``backbone.load(swap_blocks=True)`` makes it at load, for
    # the whole run; ``residency``: the ledger the model's swaps share) and returns its handle (``edit``, ``detach``);
    # None: the flag moves only the VAE and text encoders off the device, as on the UNet rows
    block_swap: Callable | None = None
    # ``denoiser_setup(denoiser, dtype)``, called on each denoiser as it loads (Wan: fp32 cross-attention reads its
    # text padding as one biased slot, ``wan.slots``); None: nothing
    denoiser_setup: Callable | None = None

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


# ----------------------------------------------------------------------------------------------- mechanisms' data
_MOTION_MODULES = rf"{BLOCK}motion_modules\.\d+\.transformer_blocks\.\d+\."
_SPATIAL = rf"{BLOCK}attentions\.\d+\.transformer_blocks\.\d+\."
UNET3D_TARGETS = UNetTargets(
    temporal_block=rf"(?:transformer_in|{BLOCK}temp_attentions\.\d+)\.transformer_blocks\.\d+\.",
    spatial_block=_SPATIAL,
    # ``TemporalConvLayer`` (``temp_convs.*``: four GroupNorm-SiLU-[Dropout]-Conv3d stacks, kernel (3, 1, 1)); only
    # the Conv3d is a LoRA target
    temporal_convs=rf"{BLOCK}temp_convs\.\d+\.(?:conv1\.2|conv[234]\.3)")
# AnimateDiff's motion modules (SD 1.5 and SDXL) are its only temporal layers: no temporal convolutions
MOTION_TARGETS = UNetTargets(temporal_block=_MOTION_MODULES, spatial_block=_SPATIAL)

UNET3D_BYPASS = LayerBypass((  # transformer_in, temp_attentions.* (an output object), temp_convs.* (a tensor)
    ("diffusers.models.transformers.transformer_temporal:TransformerTemporalModel", "output"),
    ("diffusers.models.resnet:TemporalConvLayer", "tensor")))
MOTION_BYPASS = LayerBypass((  # the motion modules (down/mid/up ``motion_modules.*``), which return a tensor
    ("diffusers.models.unets.unet_motion_model:AnimateDiffTransformer3D", "tensor"),))

# Wan (``WanTransformer3DModel``, every published size): ``blocks.N.attn1`` is self-attention over every token of
# every frame, the only layer that mixes frames; ``attn2`` cross-attention to the prompt; ``ffn`` per token
_WAN_PROJ = r"(?:to_q|to_k|to_v|to_out\.0)"
_WAN_SELF = rf"attn1\.{_WAN_PROJ}"
_WAN_ABSORBER = rf"(?:attn1|attn2)\.{_WAN_PROJ}"  # the S-LoRA: self- and cross-attention (image mode: one frame)
_WAN_MOTIONDIRECTOR = rf"(?:{_WAN_SELF}|ffn\.net\.(?:0\.proj|2))"
TEMPORAL_HEADS_FRACTION = 0.25  # temporal-heads: the quarter of all heads with the most attention across frames
WAN_TARGETS = DiTTargets({
    "cav": DiTPlacement(_WAN_SELF, _WAN_ABSORBER),  # all of the cross-frame path, as the UNets' temporal attention
    "qk": DiTPlacement(r"attn1\.(?:to_q|to_k)", _WAN_ABSORBER),  # where tokens look, not what they carry
    # MotionDirector's baseline: self-attention + FFN, its S-LoRA on the same modules (as cav has always placed it)
    "motiondirector": DiTPlacement(_WAN_MOTIONDIRECTOR, _WAN_MOTIONDIRECTOR),
    "temporal-heads": DiTPlacement(_WAN_SELF, _WAN_ABSORBER, heads=TEMPORAL_HEADS_FRACTION),
})

MOTION_ADAPTER = AddOn("UNet2DConditionModel", "MotionAdapter", "--motion-adapter",
                       "guoyww/animatediff-motion-adapter-v1-5-2")
MOTION_ADAPTER_SDXL = AddOn("UNet2DConditionModel", "MotionAdapter", "--motion-adapter",
                            "guoyww/animatediff-motion-adapter-sdxl-beta")
COMFYUI_WAN_EXPORT = ExportFormat("comfyui", wan_family.to_comfyui, "wan_motion_lora_comfyui.safetensors",
                                  "ComfyUI's Wan LoRA layout (diffusion_model.blocks.N.self_attn.q …, with alpha)",
                                  "each module's .alpha holds lora_alpha: load with strength 1.0",
                                  tuple(wan_formats.EXPERT_SUFFIXES.items()))
# SDXL motion modules are named as SD 1.5's in the original AnimateDiff code (sdxl branch), so both export to it
ANIMATEDIFF_EXPORT = ExportFormat("animatediff", animatediff_export.to_animatediff, "animatediff_motion_lora.safetensors",
                                  "the original AnimateDiff MotionLoRA key layout")
FRAME_LIMIT_KEY = "motion_max_seq_length"  # AnimateDiff motion modules have positions for this many frames;
#                                            UNet3D has no such key: its temporal attention has no positions


def _wan_memory(cfg, read) -> dict:
    """``wan.plan.run_memory``, imported on first use (``wan.plan`` imports ``adapters.lora``: see above)."""
    from .wan.plan import run_memory

    return run_memory(cfg, read)


def _asset(name: str) -> dict:
    return json.loads((ASSETS / name).read_text())


# ------------------------------------------------------------------------------------ speed-benchmark models
# ModelScope text-to-video-ms-1.7b's text encoder: OpenCLIP ViT-H/14's text tower
MODELSCOPE_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                       num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
TINY_UNET3D = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=8,
                   cross_attention_dim=32, attention_head_dim=8, in_channels=4, out_channels=4, sample_size=8)


def _sd15_text() -> dict:
    """SD 1.5's CLIP-L text encoder config (the keys the benchmark builds it from)."""
    return {k: v for k, v in _asset("sd15_text_encoder_config.json").items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "hidden_act", "projection_dim")}


def _rig_unet3d(size: str):
    """ModelScope's UNet3D from the shipped config (full), or the benchmark's tiny one."""
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel.from_config(_asset("modelscope_unet_config.json") if size == "full"
                                            else dict(TINY_UNET3D))


def _rig_animatediff(size: str):
    """SD 1.5's UNet + the v1-5-2 motion adapter from the shipped configs (full), or the tests' tiny AnimateDiff."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    if size == "full":
        image = UNet2DConditionModel.from_config(_asset("sd15_unet_config.json"))
        adapter = MotionAdapter.from_config(_asset("animatediff_motion_adapter_v1_5_2_config.json"))
    else:
        spec = factory.TinyAnimateDiffSpec(cross_attention_dim=32)  # the width of bench.speed.TINY_TEXT
        image, adapter = factory.build_image_unet(spec), factory.build_motion_adapter(spec)
    return UNetMotionModel.from_unet2d(image, adapter, load_weights=False)


# ------------------------------------------------------------------------------------------------------ rows
UNET3D = Family(  # ModelScope, Zeroscope
    name="unet3d", recipe="modelscope", what="a UNet3D model, ModelScope's family", model_class="UNet3DConditionModel", pipeline_class="TextToVideoSDPipeline",
    condition=ClipCondition(), targets=UNET3D_TARGETS, image_mode=UNET3D_BYPASS, objective=DDPM,
    tiny=Tiny(factory.make_tiny_model, size=32),
    rig=Rig("UNet3D (ModelScope)", _rig_unet3d, lambda: dict(MODELSCOPE_TEXT)))
ANIMATEDIFF = Family(  # SD 1.5 + a motion adapter, or its AnimateDiff folder
    name="animatediff", recipe="animatediff",
    what="an AnimateDiff model, Stable Diffusion 1.5 with motion modules", model_class="UNetMotionModel", pipeline_class="AnimateDiffPipeline",
    pipeline_extra=(("motion_adapter", None),), condition=ClipCondition(), per_frame_condition=True,
    targets=MOTION_TARGETS, image_mode=MOTION_BYPASS, objective=DDPM, addon=MOTION_ADAPTER,
    frame_limit_key=FRAME_LIMIT_KEY, exports=(ANIMATEDIFF_EXPORT,),
    tiny=Tiny(factory.make_tiny_animatediff, factory.make_tiny_animatediff_parts),
    rig=Rig("UNetMotionModel (SD 1.5 + motion adapter v1-5-2)", _rig_animatediff, _sd15_text))
ANIMATEDIFF_SDXL = Family(  # SDXL + the SDXL motion adapter, or its AnimateDiffSDXL folder
    name="animatediff-sdxl", recipe="animatediff-sdxl", what="an SDXL AnimateDiff model", model_class="UNetMotionModel", pipeline_class="AnimateDiffSDXLPipeline",
    pipeline_extra=(("motion_adapter", None),), condition=SdxlCondition(), per_frame_condition=True,
    targets=MOTION_TARGETS, image_mode=MOTION_BYPASS, objective=DDPM, addon=MOTION_ADAPTER_SDXL,
    frame_limit_key=FRAME_LIMIT_KEY, exports=(ANIMATEDIFF_EXPORT,),
    tiny=Tiny(factory.make_tiny_sdxl_animatediff, factory.make_tiny_sdxl_parts))

WAN = Family(  # Wan 2.1 / 2.2 text-to-video DiTs (one expert, or A14B's two: --experts)
    name="wan", recipe="wan", what="a Wan text-to-video DiT", model_class="WanTransformer3DModel",
    model_folder="transformer", vae_class="AutoencoderKLWan", latents=wan_family.WAN_LATENTS,
    pipeline_class="WanPipeline", condition=UmT5Condition(), targets=WAN_TARGETS,
    image_mode=wan_family.FOLD_FRAMES, objective=FLOW, exports=(COMFYUI_WAN_EXPORT,),
    image_lora=wan_family.load_image_lora,
    lora_writer="diffusers:WanPipeline",
    tiny=Tiny(wan_family.make_tiny, size=16, frames=5), memory=_wan_memory,
    block_swap=wan_family.swap_blocks,
    denoiser_setup=wan_family.collapse_text_padding,
    rig=Rig(wan_family.RIG_LABEL, wan_family.rig_model, parts=wan_family.rig_parts, frames=5))

FAMILIES = {f.name: f for f in (UNET3D, ANIMATEDIFF, ANIMATEDIFF_SDXL, WAN)}
LEGACY = UNET3D  # what an adapter without a recorded family was trained on (runs from before families existed)


def get(name: str) -> Family:
    """The row of a family name (as adapters record it)."""
    if name not in FAMILIES:
        raise CavError(f"unknown base family '{name}': use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def export_formats() -> dict[str, ExportFormat]:
    """Every export format, by name (collected from the rows)."""
    return {fmt.name: fmt for family in FAMILIES.values() for fmt in family.exports}
