"""How a base's UNet is conditioned on text: how the condition is built from prompts and passed to the UNet.

One class per kind (a family's row holds one: ``families.Family.condition``):

- ``clip`` (ModelScope, Zeroscope, SD 1.5 AnimateDiff): one CLIP text encoder; its last hidden states (B, L, D) are
  the UNet's ``encoder_hidden_states``.
- ``sdxl`` (SDXL AnimateDiff): two CLIP text encoders (CLIP-L, and OpenCLIP bigG with a projection), as diffusers'
  ``AnimateDiffSDXLPipeline.encode_prompt`` builds them: the penultimate hidden states of both, concatenated
  (B, L, D1 + D2), plus the second encoder's pooled, projected output (B, P), which the UNet takes in
  ``added_cond_kwargs`` together with the size "time ids" (original size, crop corner, target size).
- ``umt5`` (Wan): one umT5 encoder; as ``WanPipeline`` encodes a prompt: its last hidden states cut to the prompt's
  real tokens and zero-padded to 512 slots (the transformer cross-attends to all of them, without a mask).

cav's stages and trainer move one tensor per batch as the text condition (they expand it, cache it, swap in the empty
prompt's for dropout, hand it to the UNet). For ``sdxl`` that tensor *packs* the pooled embedding as ``ceil(P / D)``
extra rows after the L token rows; the forward pre-hook ``backbone.attach_condition`` registers on the UNet unpacks
it into ``added_cond_kwargs``, with time ids ``(H, W, 0, 0, H, W)`` from the sample's size — what the pipeline passes
when it samples at H×W with its default size arguments. A call that brings its own ``added_cond_kwargs`` (the
pipeline's own) is left alone. So no stage, trainer or sampler code knows which kind a base has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters.textual_inversion import TokenRows
from .wan.prompt_vectors import OutputVectors


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a base: its tokenizer and encoder (attribute names on ``Backbone`` and on the pipeline,
    and the base's subfolders), the transformers class of the encoder, and the key of its rows in a
    textual-inversion file (None: the one-tensor layout ``{token: rows}`` of single-encoder bases), and the
    transformers class of the tokenizer."""

    tokenizer: str
    encoder: str
    encoder_class: str
    ti_key: str | None = None
    tokenizer_class: str = "CLIPTokenizer"


class ClipCondition:
    """One CLIP text encoder; its last hidden states are the condition."""

    name = "clip"
    parts = (TextPart("tokenizer", "text_encoder", "CLIPTextModel"),)
    packed = False  # the condition tensor is exactly encoder_hidden_states
    encode_once = False  # the encoder stays loaded: TI trains token rows through it (``cav.textcache``: Wan only)
    textual_inversion = True  # new token rows in the encoder's embedding (``adapters.textual_inversion``)
    ti = TokenRows()  # the --absorbers ti absorber: those rows

    def encode(self, bb, prompts: list[str], grad: bool = False) -> torch.Tensor:
        """(B, L, D) hidden states of ``prompts``, padded to the tokenizer's max length."""
        ids = bb.tokenizer(prompts, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(bb.text_encoder.device)
        with torch.set_grad_enabled(grad):
            return bb.text_encoder(ids)[0].to(bb.device, bb.dtype)

    def pipeline_encode(self, pipe, prompts: list[str], device, guidance: bool, negatives) -> tuple:
        """(condition, unconditional condition or None) exactly as the family's pipeline encodes them."""
        return pipe.encode_prompt(prompts, device, 1, guidance, negatives)

    def unconditional(self, bb) -> torch.Tensor:
        """The condition of guidance's unconditional branch without a negative prompt: the empty prompt's."""
        return self.encode(bb, [""])

    def unpack(self, unet_config, sample: torch.Tensor, cond: torch.Tensor, vae_factor: int):
        return cond, None


class SdxlCondition:
    """SDXL's two text encoders: concatenated penultimate hidden states + the pooled embedding and time ids."""

    name = "sdxl"
    parts = (TextPart("tokenizer", "text_encoder", "CLIPTextModel", "clip_l"),
             TextPart("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection", "clip_g"))
    packed = True
    encode_once = False
    textual_inversion = True
    ti = TokenRows()
    TIME_IDS = 6  # original (h, w), crop corner (top, left), target (h, w)

    def encode(self, bb, prompts: list[str], grad: bool = False) -> torch.Tensor:
        hidden, pooled = [], None
        with torch.set_grad_enabled(grad):
            for part in self.parts:
                tok, enc = getattr(bb, part.tokenizer), getattr(bb, part.encoder)
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(enc.device)
                out = enc(ids, output_hidden_states=True)
                if out[0].ndim == 2:  # the projected pooled output (text_embeds) of the encoder with projection
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
            packed = pack(torch.cat(hidden, dim=-1), pooled)
        return packed.to(bb.device, bb.dtype)

    def pipeline_encode(self, pipe, prompts: list[str], device, guidance: bool, negatives) -> tuple:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_videos_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negatives)
        return pack(cond, pooled), (pack(uncond, uncond_pooled) if guidance else None)

    def unconditional(self, bb) -> torch.Tensor:
        """Zeros, hidden states and pooled embedding alike: without a negative prompt ``AnimateDiffSDXLPipeline``
        (``force_zeros_for_empty_prompt``, its default, which ``Backbone.pipeline`` keeps) guides against zeros, not
        against the empty prompt's encoding."""
        return torch.zeros_like(self.encode(bb, [""]))

    def unpack(self, unet_config, sample: torch.Tensor, cond: torch.Tensor, vae_factor: int):
        """(encoder_hidden_states, added_cond_kwargs) of a packed condition, for a sample (B, C, F, h, w)."""
        width = pooled_width(unet_config)
        rows = math.ceil(width / cond.shape[-1])
        hidden, extra = cond[:, :-rows], cond[:, -rows:]
        pooled = extra.reshape(cond.shape[0], -1)[:, :width]
        h, w = sample.shape[-2] * vae_factor, sample.shape[-1] * vae_factor
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=cond.device).expand(cond.shape[0], -1)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids}


class UmT5Condition:
    """Wan's umT5 encoder, as ``WanPipeline._get_t5_prompt_embeds`` encodes: the cleaned prompt tokenized to
    ``LENGTH`` slots, the encoder's last hidden states kept for the real tokens and zeros after them."""

    name = "umt5"
    parts = (TextPart("tokenizer", "text_encoder", "UMT5EncoderModel", tokenizer_class="AutoTokenizer"),)
    packed = False
    encode_once = True  # a training run encodes its texts at its start and releases umT5 (``cav.textcache``)
    textual_inversion = False  # no token rows: umT5 is too costly to backpropagate through
    ti = OutputVectors()  # the --absorbers ti absorber: learned vectors in its output (``cav.wan.prompt_vectors``)
    LENGTH = 512  # WanPipeline's default max_sequence_length

    def encode(self, bb, prompts: list[str], grad: bool = False) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = bb.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.LENGTH,
                              truncation=True, add_special_tokens=True, return_attention_mask=True,
                              return_tensors="pt")
        device = bb.text_encoder.device
        mask = tokens.attention_mask
        lengths = mask.gt(0).sum(dim=1).long()
        with torch.set_grad_enabled(grad):
            hidden = bb.text_encoder(tokens.input_ids.to(device), mask.to(device)).last_hidden_state
            hidden = hidden.to(bb.device, bb.dtype)
            keep = (torch.arange(self.LENGTH, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None])
            return hidden.masked_fill(~keep[..., None], 0)

    def pipeline_encode(self, pipe, prompts: list[str], device, guidance: bool, negatives) -> tuple:
        cond, uncond = pipe.encode_prompt(prompts, negatives, do_classifier_free_guidance=guidance,
                                          num_videos_per_prompt=1, max_sequence_length=self.LENGTH, device=device)
        return cond, (uncond if guidance else None)

    def unconditional(self, bb) -> torch.Tensor:
        """The empty prompt's encoding: ``WanPipeline`` guides against ``""`` when no negative prompt is given."""
        return bb.encode_prompt("")  # = self.encode(bb, [""]), from the run's text cache when it has one

    def unpack(self, unet_config, sample: torch.Tensor, cond: torch.Tensor, vae_factor: int):
        return cond, None


def pooled_width(unet_config) -> int:
    """Width P of the pooled text embedding an SDXL UNet takes: its added-embedding input less the time ids'."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k: getattr(unet_config, k)
    time_ids = SdxlCondition.TIME_IDS * int(get("addition_time_embed_dim"))
    return int(get("projection_class_embeddings_input_dim")) - time_ids


def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states and (B, P) pooled embedding → one (B, L + ceil(P / D), D) tensor (zero padded)."""
    b, _, d = hidden.shape
    rows = math.ceil(pooled.shape[-1] / d)
    pad = pooled.new_zeros(b, rows * d - pooled.shape[-1])
    return torch.cat([hidden, torch.cat([pooled.to(hidden.dtype), pad.to(hidden.dtype)], -1).view(b, rows, d)], 1)

