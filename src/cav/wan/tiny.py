"""Tiny Wan models built in code, saved in the stock Wan diffusers layout (tests, demos; nothing from a hub).

The layout is the one of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: ``model_index.json`` (``WanPipeline``),
``transformer/`` = ``WanTransformer3DModel``, ``vae/`` = ``AutoencoderKLWan``, ``text_encoder/`` =
``UMT5EncoderModel``, ``tokenizer/``, ``scheduler/`` (UniPC with flow sigmas, as published). Written by
``WanPipeline.save_pretrained`` itself, so ``WanPipeline.from_pretrained(folder)`` opens it with no cav code.

The tokenizer is a word-level ``tokenizers`` model wrapped as a fast tokenizer: umT5's own tokenizer is a
256 k-piece SentencePiece model that cannot be built offline, and the pipeline only needs ids, padding and the
end-of-sequence token (umT5 ids: pad 0, eos 1, unk 2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..toy.factory import BASE_WORDS


@dataclass
class TinyWanSpec:
    """Sizes of a tiny Wan (transformer ~40 K parameters at the defaults, near diffusers' own Wan test config)."""

    heads: int = 2
    head_dim: int = 12           # Wan's RoPE splits a head into t / h / w parts: 12 → 4 + 4 + 4
    layers: int = 2
    ffn_dim: int = 32
    text_dim: int = 16           # umT5 d_model = the transformer's text_dim
    text_layers: int = 1
    text_heads: int = 2
    z_dim: int = 4               # latent channels
    vae_base_dim: int = 3
    max_length: int = 16         # tokens per prompt (the pipeline's max_sequence_length must not exceed it)
    flow_shift: float = 3.0      # Wan 2.1 480p's published scheduler shift
    words: tuple[str, ...] = field(default=tuple(BASE_WORDS))


# A non-trivial latent normalisation, so tests see the pipeline's (z - mean) / std convention at work.
_LATENT_MEAN = (0.1, -0.2, 0.05, 0.0)
_LATENT_STD = (1.5, 0.8, 1.2, 1.0)
A14B_BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V-A14B's published model_index.json


def build_tokenizer(spec: TinyWanSpec):
    """A lower-casing word-level tokenizer with umT5's special ids; every prompt ends with ``</s>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in dict.fromkeys(w.lower() for w in spec.words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=spec.max_length)


def build_transformer(spec: TinyWanSpec, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=spec.z_dim, out_channels=spec.z_dim, text_dim=spec.text_dim, freq_dim=32, ffn_dim=spec.ffn_dim,
        num_layers=spec.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_components(spec: TinyWanSpec | None = None, seed: int = 0, experts: int = 1) -> dict:
    """Random-weight components of a ``WanPipeline``: one expert (Wan 2.1 / TI2V-5B style) or two (A14B style:
    ``transformer`` for high noise, ``transformer_2`` for low noise, switched at ``boundary_ratio``)."""
    if experts not in (1, 2):
        raise ValueError(f"a Wan pipeline has 1 or 2 experts, not {experts}")
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    spec = spec or TinyWanSpec()
    tokenizer = build_tokenizer(spec)
    transformer = build_transformer(spec, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=spec.vae_base_dim, z_dim=spec.z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=list(_LATENT_MEAN[:spec.z_dim]),
                           latents_std=list(_LATENT_STD[:spec.z_dim]))
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=spec.text_dim, d_kv=spec.text_dim // spec.text_heads,
        d_ff=spec.text_dim * 2, num_layers=spec.text_layers, num_heads=spec.text_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=spec.flow_shift, num_train_timesteps=1000)
    parts = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
             "scheduler": scheduler}
    if experts == 2:
        parts.update(transformer_2=build_transformer(spec, seed + 3), boundary_ratio=A14B_BOUNDARY_RATIO)
    return parts


def make_tiny_wan(directory: str | Path, spec: TinyWanSpec | None = None, seed: int = 0, experts: int = 1) -> Path:
    """Write a random tiny Wan model (``experts=2``: A14B layout) to ``directory`` with
    ``WanPipeline.save_pretrained``."""
    from diffusers import WanPipeline

    spec = spec or TinyWanSpec()
    directory = Path(directory)
    pipe = WanPipeline(**build_components(spec, seed, experts))
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / "cav_model.json").write_text(json.dumps({"tiny_wan_spec": asdict(spec), "experts": experts}, indent=2))
    return directory


__all__ = ["TinyWanSpec", "build_tokenizer", "build_transformer", "build_components", "make_tiny_wan"]
