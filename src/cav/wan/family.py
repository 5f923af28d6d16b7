"""What the Wan row of ``families.FAMILIES`` holds beyond the shared mechanisms: its image mode (frames folded into
the batch: ``image_mode``), its latents (the causal video VAE: ``latents``) and its shape rule (``published``).

Kept apart from those modules because a row is built when cav is imported: everything here imports diffusers'
Wan modules only when first used (importing them costs seconds).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class FoldFrames:
    """Image mode of a Wan transformer: every frame of a (B, C, F, h, w) input is its own 1-frame video (frames
    folded into the batch, timestep and prompt repeated per frame; ``cav.wan.image_mode``). Self-attention is the
    only layer of a Wan block that mixes frames, and with RoPE positions a lone frame is the clip under a
    frame-local mask (``tests/test_wan_image_mode.py``), so this is the paper's "temporal layers bypassed"."""

    @contextmanager
    def __call__(self, model, enabled: bool = True):
        """Inside, ``model(...)`` runs frame by frame; on exit the model is exactly as before (nothing is patched
        but the instance's ``forward``, an attribute that shadows the class's)."""
        if not enabled:
            yield model
            return
        model.forward = self._folded(model)
        try:
            yield model
        finally:
            del model.forward

    @staticmethod
    def _folded(model):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        from .image_mode import _fold_timestep, fold_frames, unfold_frames

        forward = type(model).forward

        def folded(hidden_states, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
            b, _, f = hidden_states.shape[:3]
            if f == 1:
                return forward(model, hidden_states, timestep, encoder_hidden_states, *args,
                               return_dict=return_dict, **kwargs)
            out = forward(model, fold_frames(hidden_states), _fold_timestep(timestep, b, f),
                          encoder_hidden_states.repeat_interleave(f, dim=0), *args, return_dict=False, **kwargs)[0]
            out = unfold_frames(out, f)
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)
        return folded

    @staticmethod
    def modules(model) -> list:
        """The layers whose cross-frame path image mode removes: every block's self-attention."""
        return [(n, m) for n, m in model.named_modules() if n.endswith("attn1") and n.startswith("blocks.")]


class WanLatents:
    """Wan's causal video VAE: a clip of 4k+1 frames → k+1 latent frames (``encode_clip``, the motion stage), a
    frame alone → one latent frame, read as a first frame (``encode_frames``, image mode); normalised by the VAE's
    ``latents_mean`` / ``latents_std`` as ``WanPipeline`` expects (``cav.wan.latents``)."""

    @staticmethod
    def spatial_factor(vae_config) -> int:
        return int(vae_config["scale_factor_spatial"])

    @staticmethod
    def latent_frames(vae_config, frames: int) -> int:
        return (frames - 1) // int(vae_config["scale_factor_temporal"]) + 1

    @torch.no_grad()
    def encode_frames(self, bb, frames: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Latents (N, C, h, w) of frames (N, 3, H, W) in [-1, 1], each frame encoded alone."""
        from .latents import encode_frames

        out = []
        for i in range(0, frames.shape[0], chunk):
            video = frames[i:i + chunk].to(bb.vae.device, bb.vae.dtype).permute(1, 0, 2, 3).unsqueeze(0)
            out.append(encode_frames(bb.vae, video)[0].permute(1, 0, 2, 3))
        return torch.cat(out).to(bb.device, bb.dtype)

    @torch.no_grad()
    def encode_clip(self, bb, frames: torch.Tensor) -> torch.Tensor:
        """Latents (1, C, (F − 1)/4 + 1, h, w) of a clip (F, 3, H, W) in [-1, 1], encoded as one video."""
        from .latents import encode_video

        video = frames.to(bb.vae.device, bb.vae.dtype).permute(1, 0, 2, 3).unsqueeze(0)
        return encode_video(bb.vae, video).to(bb.device, bb.dtype)

    @staticmethod
    def decode(bb, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → the video tensor in [-1, 1], as ``WanPipeline`` decodes."""
        from .latents import decode

        return decode(bb.vae, latents)

    @staticmethod
    def check_shape(base, size, frames: int, model_config, vae_config, motion_adapter=None) -> None:
        """4k+1 frames; height and width multiples of the patch × the VAE's factor (``cav.wan.published``)."""
        from .published import check_frames, check_size, size_multiple

        check_frames(int(frames), int(vae_config["scale_factor_temporal"]))
        h, w = (int(s) for s in size)
        check_size(h, w, size_multiple(dict(model_config), int(vae_config["scale_factor_spatial"])))

    @staticmethod
    def default_size(bb) -> tuple[int, int]:
        """A Wan config names no size: the family recipe's."""
        from ..config import load_recipe

        h, w = load_recipe(bb.family.recipe)["size"]
        return (int(h), int(w))


def to_comfyui(state: dict, rank: int, alpha: float) -> dict:
    """A T-LoRA's peft state → ComfyUI's Wan layout (original module names, one ``.alpha`` per module:
    ``cav.wan.formats.to_comfyui``), which diffusers' own Wan converter also reads."""
    from .formats import to_comfyui as convert

    return convert(state, alpha)


def load_image_lora(transformer, path, name: str, family) -> dict:
    """``--s-lora-from`` on Wan: a Wan image LoRA file (or a folder / run holding one) in diffusers' or ComfyUI's
    layout, checked against the transformer from its header first (``cav.wan.formats.check_lora_file``), then read
    by diffusers' own Wan loader (``cav.wan.formats.load_lora_file``) as adapter ``name``."""
    from ..adapters.image_lora import resolve_image_lora
    from ..adapters.lora import read_meta
    from ..errors import CavError
    from .formats import load_lora_file

    file = resolve_image_lora(path)
    meta = read_meta(file.parent)
    trained_on = meta.get("family")
    if trained_on and trained_on != family.name:
        raise CavError(f"image LoRA '{path}' was trained on a {trained_on} base, but this base is {family.name}: "
                       "pass a LoRA of this base")
    load_lora_file(transformer, file, name)
    return meta


def make_tiny(directory):
    """The tests' tiny Wan (``cav.wan.tiny.make_tiny_wan``)."""
    from .tiny import make_tiny_wan

    return make_tiny_wan(directory)


FOLD_FRAMES = FoldFrames()
WAN_LATENTS = WanLatents()


def swap_blocks(transformer, device, residency=None, name: str = "blocks"):
    """``Family.block_swap`` of the Wan row: ``offload.swap_transformer_blocks`` onto ``device`` (its blocks'
    frozen weights live on the CPU between their uses, ``residency`` the model's ledger); the handle's ``detach()``
    puts them all back."""
    from . import offload

    return offload.swap_transformer_blocks(transformer, device, residency=residency, name=name)


def collapse_text_padding(transformer, dtype) -> None:
    """``Family.denoiser_setup`` of the Wan row: an fp32 transformer's cross-attention reads the zero-padded text
    slots as one slot whose logit carries their log-count (``slots.collapse_in_fp32``: the same attention, fewer
    keys)."""
    from .slots import collapse_in_fp32

    collapse_in_fp32(transformer, dtype)


# ------------------------------------------------------------------------------------ the speed benchmark's rig
RIG_BASE = "wan2.1-t2v-1.3b"  # the shipped record (``published``) the full-size rig builds
RIG_TEXT_LAYERS = 1  # umT5-XXL's width (the transformer's text_dim) and block, 1 of its 24 layers: see rig_parts
RIG_LABEL = (f"WanTransformer3DModel (Wan 2.1 T2V 1.3B; text: umT5-XXL width, {RIG_TEXT_LAYERS} of 24 layers, "
             "word-level tokenizer)")


def rig_model(size: str):
    """``Family.rig.model`` of the Wan row: the published 1.3B transformer (``published``), or the tests' tiny one."""
    from diffusers import WanTransformer3DModel

    from . import published, tiny

    if size == "full":
        return WanTransformer3DModel.from_config(published.published(RIG_BASE)["transformer"])
    return tiny.build_transformer(tiny.TinyWanSpec())


def rig_parts(size: str) -> dict:
    """``Family.rig.parts`` of the Wan row. Full: Wan 2.1's VAE and UniPC flow scheduler from the shipped configs of
    the 1.3B hub id, and umT5-XXL's encoder cut to ``RIG_TEXT_LAYERS`` layer(s) over the tiny word-level vocabulary:
    the whole encoder (5.7 B parameters, 22.7 GB in fp32) does not fit beside the transformer in a small machine's
    memory, and a T-LoRA step never runs it (the prompt is encoded once, cached), so only its output width (4096,
    what the transformer reads) matters to the step. Tiny: the tests' tiny Wan parts."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from . import published, shipped, tiny

    spec = tiny.TinyWanSpec()
    tokenizer = tiny.build_tokenizer(spec)
    if size != "full":
        return {"vae": lambda: tiny.build_components(spec)["vae"],
                "text_encoder": lambda: tiny.build_components(spec)["text_encoder"], "tokenizer": tokenizer,
                "scheduler": tiny.build_components(spec)["scheduler"]}
    hub = published.published(RIG_BASE)["hub_id"]
    vae = shipped.read(hub, "vae/config.json")
    text = {**shipped.UMT5_XXL, "num_layers": RIG_TEXT_LAYERS, "vocab_size": len(tokenizer)}
    return {"vae": lambda: AutoencoderKLWan.from_config(vae),
            "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**text)), "tokenizer": tokenizer,
            "scheduler": UniPCMultistepScheduler.from_config(shipped.read(hub, "scheduler/scheduler_config.json"))}
