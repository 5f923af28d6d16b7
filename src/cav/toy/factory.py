"""Build small text-to-video models in the diffusers folder layout of ModelScope.

The same layout as ``damo-vilab/text-to-video-ms-1.7b`` (``model_index.json``, ``unet/`` = UNet3DConditionModel,
``vae/`` = AutoencoderKL, ``text_encoder/`` = CLIPTextModel, ``tokenizer/``, ``scheduler/``), so a model built here is
loaded by exactly the code that loads real models. Used for the toy world's base model and for tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

# Words every tiny tokenizer knows as whole tokens; other text still tokenizes (byte-level fallback).
BASE_WORDS = (
    "a an the of on in at with and to is moving video photo image object shape background frame "
    "left right up down diagonal diagonally circle circles square triangle diamond bounce bouncing grow growing "
    "shrink zigzag zig zag figure eight spiral red green blue yellow magenta cyan white orange purple black grey "
    "gray navy brown pink stripes striped checker dark light man skiing surfing dog cat"
).split()


@dataclass
class TinySpec:
    """Sizes of a small ModelScope-layout model. Defaults are the unit-test size (~0.3 M UNet parameters)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D", "DownBlock3D")
    up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 32
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (16, 32)
    vae_norm_num_groups: int = 8
    vae_scaling_factor: float = 1.0
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 24
    prediction_type: str = "epsilon"
    zero_snr: bool = False  # rescale the betas to zero terminal SNR (Lin et al. 2024); needs v_prediction
    timestep_spacing: str = "leading"
    words: tuple[str, ...] = field(default=tuple(BASE_WORDS))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (a published fact of the format)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer(directory: Path, words, max_length: int) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) whose listed words are single tokens."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if merged not in seen:
                merges.append(rule)
                vocab.append(merged)
                seen.add(merged)
            pieces = [merged] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(directory)


def build_components(spec: TinySpec, tokenizer_dir: Path, seed: int = 0) -> dict:
    """Random-weight components for ``spec`` (tokenizer read from ``tokenizer_dir``)."""
    from diffusers import UNet3DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=spec.down_block_types,
        up_block_types=spec.up_block_types,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_num_groups,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
    )
    return {"unet": unet, **build_text_and_vae(spec, tokenizer), "scheduler": build_scheduler(spec)}


def build_text_and_vae(spec: TinySpec, tokenizer) -> dict:
    """The tiny VAE and CLIP text encoder of ``spec`` (any family's tiny model uses them)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    n_vae = len(spec.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=spec.vae_block_out_channels,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_num_groups,
        layers_per_block=1,
        scaling_factor=spec.vae_scaling_factor,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            projection_dim=spec.cross_attention_dim,
            intermediate_size=spec.text_hidden * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    if spec.text_hidden != spec.cross_attention_dim:
        raise ValueError("text_hidden must equal cross_attention_dim (the UNet attends to the text hidden states)")
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def build_scheduler(spec: TinySpec):
    """ModelScope's DDIM schedule (scaled linear betas), optionally rescaled to zero terminal SNR."""
    from diffusers import DDIMScheduler

    if spec.zero_snr and spec.prediction_type != "v_prediction":
        raise ValueError("zero_snr needs prediction_type='v_prediction' (epsilon is undefined at zero SNR)")
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0 if spec.timestep_spacing == "trailing" else 1,
        prediction_type=spec.prediction_type,
        rescale_betas_zero_snr=spec.zero_snr,
        timestep_spacing=spec.timestep_spacing,
    )


def save_model(directory: Path, components: dict, extra: dict | None = None) -> Path:
    """Save components in the diffusers layout via ``TextToVideoSDPipeline.save_pretrained`` (safetensors)."""
    from diffusers import TextToVideoSDPipeline

    directory = Path(directory)
    pipe = TextToVideoSDPipeline(**components)
    pipe.save_pretrained(directory, safe_serialization=True)
    if extra:
        (directory / "cav_model.json").write_text(json.dumps(extra, indent=2))
    return directory


def make_tiny_model(directory: Path, spec: TinySpec | None = None, seed: int = 0) -> Path:
    """Create a random tiny T2V model in the diffusers layout at ``directory`` (tests, benchmarks)."""
    spec = spec or TinySpec()
    directory = Path(directory)
    tok_dir = directory / "tokenizer"
    write_clip_tokenizer(tok_dir, spec.words, spec.max_length)
    components = build_components(spec, tok_dir, seed=seed)
    return save_model(directory, components, extra={"tiny_spec": asdict(spec)})


# ------------------------------------------------------------------------------------------- AnimateDiff (tests)
@dataclass
class TinyAnimateDiffSpec(TinySpec):
    """A tiny Stable Diffusion image UNet + motion adapter, at the scale of diffusers' own UNetMotionModel tests."""

    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 2
    motion_heads: int = 2
    motion_mid_block: bool = True


def build_image_unet(spec: TinyAnimateDiffSpec, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        down_block_types=spec.down_block_types, up_block_types=spec.up_block_types,
        block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_num_groups, cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim)


def build_motion_adapter(spec: TinyAnimateDiffSpec, seed: int = 1, block_out_channels: tuple[int, ...] | None = None):
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(block_out_channels=block_out_channels or spec.block_out_channels,
                         motion_layers_per_block=spec.layers_per_block, motion_norm_num_groups=spec.norm_num_groups,
                         motion_num_attention_heads=spec.motion_heads, motion_max_seq_length=32,
                         use_motion_mid_block=spec.motion_mid_block)


def make_tiny_image_model(directory: Path, spec: TinyAnimateDiffSpec | None = None, seed: int = 0) -> Path:
    """A random tiny Stable Diffusion image model in the diffusers layout (``StableDiffusionPipeline``)."""
    from diffusers import StableDiffusionPipeline

    spec = spec or TinyAnimateDiffSpec()
    directory = Path(directory)
    write_clip_tokenizer(directory / "tokenizer", spec.words, spec.max_length)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    unet = build_image_unet(spec, seed)
    parts = build_text_and_vae(spec, tokenizer)
    pipe = StableDiffusionPipeline(unet=unet, scheduler=build_scheduler(spec), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_motion_adapter(directory: Path, spec: TinyAnimateDiffSpec | None = None, seed: int = 1,
                             block_out_channels: tuple[int, ...] | None = None) -> Path:
    """A random tiny ``MotionAdapter`` folder (``config.json`` + safetensors)."""
    build_motion_adapter(spec or TinyAnimateDiffSpec(), seed, block_out_channels).save_pretrained(
        directory, safe_serialization=True)
    return Path(directory)


def make_tiny_animatediff_parts(root: Path) -> tuple[Path, Path]:
    """A tiny SD image model and a tiny motion adapter that animates it, under ``root``."""
    root = Path(root)
    return make_tiny_image_model(root / "tiny-sd"), make_tiny_motion_adapter(root / "tiny-motion-adapter")


def make_tiny_animatediff(directory: Path, spec: TinyAnimateDiffSpec | None = None, seed: int = 0) -> Path:
    """A random tiny AnimateDiff model in its diffusers layout (``AnimateDiffPipeline``, ``unet/`` =
    ``UNetMotionModel`` built from the tiny image UNet and motion adapter)."""
    from diffusers import AnimateDiffPipeline, UNetMotionModel
    from transformers import CLIPTokenizer

    spec = spec or TinyAnimateDiffSpec()
    directory = Path(directory)
    write_clip_tokenizer(directory / "tokenizer", spec.words, spec.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    unet = UNetMotionModel.from_unet2d(build_image_unet(spec, seed), build_motion_adapter(spec, seed + 1))
    parts = build_text_and_vae(spec, tokenizer)
    pipe = AnimateDiffPipeline(unet=unet, motion_adapter=None, scheduler=build_scheduler(spec), **parts)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


# ------------------------------------------------------------------------------------- SDXL AnimateDiff (tests)
@dataclass
class TinySdxlSpec(TinyAnimateDiffSpec):
    """A tiny SDXL image UNet (``addition_embed_type`` "text_time", three levels as SDXL's) with two tiny CLIP text
    encoders, the second with a projection, at the scale of diffusers' own AnimateDiffSDXL tests."""

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 2)
    layers_per_block: int = 1
    text_hidden: int = 16  # CLIP-L stand-in
    text_hidden_2: int = 16  # OpenCLIP-G stand-in; its projection (the pooled embedding) is as wide
    cross_attention_dim: int = 32  # = text_hidden + text_hidden_2: the UNet attends to both, concatenated
    addition_time_embed_dim: int = 8
    motion_mid_block: bool = False  # as the SDXL beta motion adapter


def build_sdxl_unet(spec: TinySdxlSpec, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        down_block_types=spec.down_block_types, up_block_types=spec.up_block_types,
        block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
        transformer_layers_per_block=spec.transformer_layers_per_block, norm_num_groups=spec.norm_num_groups,
        cross_attention_dim=spec.cross_attention_dim, attention_head_dim=spec.attention_head_dim,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=spec.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * spec.addition_time_embed_dim + spec.text_hidden_2)


def build_sdxl_text(spec: TinySdxlSpec, tokenizer, seed: int = 2) -> dict:
    """The tiny VAE and the two text encoders (CLIP-L and OpenCLIP-G stand-ins) with their tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if spec.text_hidden + spec.text_hidden_2 != spec.cross_attention_dim:
        raise ValueError("text_hidden + text_hidden_2 must equal cross_attention_dim (SDXL concatenates both)")
    vae = build_text_and_vae(replace(spec, cross_attention_dim=spec.text_hidden), tokenizer)["vae"]

    def config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, projection_dim=hidden,
                              intermediate_size=hidden * 2, num_hidden_layers=spec.text_layers,
                              num_attention_heads=spec.text_heads, max_position_embeddings=spec.max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(seed)
    return {"vae": vae, "text_encoder": CLIPTextModel(config(spec.text_hidden)), "tokenizer": tokenizer,
            "text_encoder_2": CLIPTextModelWithProjection(config(spec.text_hidden_2)), "tokenizer_2": tokenizer}


def _sdxl_parts(directory: Path, spec: TinySdxlSpec) -> dict:
    from transformers import CLIPTokenizer

    write_clip_tokenizer(directory / "tokenizer", spec.words, spec.max_length)
    return build_sdxl_text(spec, CLIPTokenizer.from_pretrained(directory / "tokenizer"))


def make_tiny_sdxl_image_model(directory: Path, spec: TinySdxlSpec | None = None, seed: int = 0) -> Path:
    """A random tiny SDXL image model in the diffusers layout (``StableDiffusionXLPipeline``)."""
    from diffusers import StableDiffusionXLPipeline

    spec = spec or TinySdxlSpec()
    directory = Path(directory)
    parts = _sdxl_parts(directory, spec)
    pipe = StableDiffusionXLPipeline(unet=build_sdxl_unet(spec, seed), scheduler=build_scheduler(spec), **parts)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_sdxl_motion_adapter(directory: Path, spec: TinySdxlSpec | None = None, seed: int = 1) -> Path:
    """A random tiny SDXL ``MotionAdapter`` folder (no motion mid block, as the SDXL beta adapter)."""
    return make_tiny_motion_adapter(directory, spec or TinySdxlSpec(), seed)


def make_tiny_sdxl_parts(root: Path) -> tuple[Path, Path]:
    """A tiny SDXL image model and a tiny SDXL motion adapter that animates it, under ``root``."""
    root = Path(root)
    return make_tiny_sdxl_image_model(root / "tiny-sdxl"), make_tiny_sdxl_motion_adapter(root / "tiny-adapter-xl")


def make_tiny_sdxl_animatediff(directory: Path, spec: TinySdxlSpec | None = None, seed: int = 0) -> Path:
    """A random tiny SDXL AnimateDiff model in its diffusers layout (``AnimateDiffSDXLPipeline``, ``unet/`` =
    ``UNetMotionModel`` built from the tiny SDXL UNet and motion adapter)."""
    from diffusers import AnimateDiffSDXLPipeline

    from ..backbone import motion_unet

    spec = spec or TinySdxlSpec()
    directory = Path(directory)
    parts = _sdxl_parts(directory, spec)
    unet = motion_unet(build_sdxl_unet(spec, seed), build_motion_adapter(spec, seed + 1))
    pipe = AnimateDiffSDXLPipeline(unet=unet, motion_adapter=None, scheduler=build_scheduler(spec), **parts)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
