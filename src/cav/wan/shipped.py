"""The published Wan bases by their diffusers hub ids, offline: the small JSON files a ``--dry-run`` reads.

``SHIPPED_CONFIGS`` maps each hub id to the prefix of its files in ``cav/assets/`` in the layout of
``backbone.SHIPPED_CONFIGS`` (``<prefix>_<file with / → _>``: ``wan2_1_t2v_1_3b_transformer_config.json``), so the two
tables merge as they are. Per base: ``model_index.json``, ``transformer/config.json`` (A14B also
``transformer_2/config.json``), ``vae/config.json``, ``text_encoder/config.json`` (umT5-XXL) and
``scheduler/scheduler_config.json``. No tokenizer: a dry run counts parameters and never tokenizes.

The files are rebuilt from the installed diffusers / transformers classes on the meta device (``build_assets``), the
way diffusers' own Wan conversion made the ``Wan-AI/*-Diffusers`` repositories: the transformer from the record in
``configs/<name>.json`` (checked by parameter count), the Wan 2.1 VAE = ``AutoencoderKLWan``'s defaults (the
conversion builds it with no arguments; 2.1 bases and A14B), the Wan 2.2 VAE (TI2V-5B) = ``WAN22_VAE``, umT5-XXL =
``UMT5_XXL``, the scheduler = UniPC with flow sigmas and the conversion's shift (3.0 for T2V, 5.0 for TI2V). Each
model's parameter count on the meta device is in ``COUNTS`` and compared with a published figure in
``tests/test_wan_plan_shipped.py``. ``scripts/wan_ship_configs.py`` rewrites the files; a test checks they are equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CavError
from . import published

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _prefix(name: str) -> str:
    """Asset prefix of a published record: ``wan2.1-t2v-1.3b`` → ``wan2_1_t2v_1_3b``."""
    return re.sub(r"[^a-z0-9]+", "_", name)


# hub id → (asset prefix, published record in configs/): the records name their hub ids
HUB_BASES = {published.published(n)["hub_id"]: (_prefix(n), n) for n in published.names()}
SHIPPED_CONFIGS = {hub: prefix for hub, (prefix, _) in HUB_BASES.items()}  # merges into backbone.SHIPPED_CONFIGS

# google/umt5-xxl's published dimensions; Wan runs its encoder only (UMT5EncoderModel)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                scalable_attention=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# Wan 2.2's VAE (TI2V-5B): 4×16×16 compression (a 2×2 pixel patch before the encoder), 48 latent channels
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_temporal=4, scale_factor_spatial=16, clip_output=False,
    latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                  0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                  -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                  -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                  0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744])
FLOW_SHIFT = {False: 3.0, True: 5.0}  # the conversion's UniPC shift: T2V, TI2V (expand_timesteps)
FILES = ("model_index.json", "transformer/config.json", "transformer_2/config.json", "vae/config.json",
         "text_encoder/config.json", "scheduler/scheduler_config.json")


def published_name(hub_id: str) -> str | None:
    """The record name (``wan2.1-t2v-1.3b``) of a published hub id, else None."""
    row = HUB_BASES.get(hub_id)
    return row[1] if row else None


def asset_path(hub_id: str, name: str) -> Path:
    """Where ``name`` (e.g. ``transformer/config.json``) of ``hub_id`` is shipped (as ``backbone._read_json`` looks)."""
    return ASSETS / f"{SHIPPED_CONFIGS[hub_id]}_{name.replace('/', '_')}"


def read(hub_id: str, name: str) -> dict:
    """A shipped JSON file of a published Wan hub id."""
    if hub_id not in HUB_BASES:
        raise CavError(f"'{hub_id}' is not a published Wan base cav ships configs for: use one of "
                       f"{', '.join(HUB_BASES)} or a downloaded folder")
    path = asset_path(hub_id, name)
    if not path.is_file():
        have = ", ".join(n for n in FILES if asset_path(hub_id, n).is_file())
        raise CavError(f"{hub_id} has no {name} (shipped: {have})")
    return json.loads(path.read_text())


def _config(model) -> dict:
    """A model's config as ``save_pretrained`` writes it, without the version stamp of the installed library."""
    cfg = model.config if isinstance(model.config, dict) else model.config.to_dict()
    return {k: v for k, v in dict(cfg).items()
            if k not in ("_diffusers_version", "transformers_version", "_name_or_path", "dtype", "torch_dtype")
            and not k.startswith("_use_default_values")}


def _accepted(cls, config: dict) -> dict:
    """The keys ``cls.__init__`` takes (a published file may hold one a newer diffusers dropped: clip_output)."""
    import inspect

    return {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters}


def text_encoder_config() -> dict:
    """umT5-XXL's ``config.json`` for the encoder Wan runs (the dimensions above, as the published file states)."""
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "is_encoder_decoder": True, **UMT5_XXL}


def build_models(name: str) -> dict:
    """The base's models on the meta device (no memory), built as the published folder builds them."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    row = published.published(name)
    with torch.device("meta"):
        models = {"transformer": WanTransformer3DModel.from_config(row["transformer"]),
                  "vae": AutoencoderKLWan(**_accepted(AutoencoderKLWan, vae_config(name))),
                  "text_encoder": UMT5EncoderModel(UMT5Config(**text_encoder_config()))}
        if row["experts"] == 2:
            models["transformer_2"] = WanTransformer3DModel.from_config(row["transformer"])
    models["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000,
                                                  flow_shift=FLOW_SHIFT[bool(row["expand_timesteps"])])
    return models


def vae_config(name: str) -> dict:
    """The VAE's published settings beyond ``AutoencoderKLWan``'s defaults (which are Wan 2.1's VAE)."""
    return dict(WAN22_VAE) if published.published(name)["vae"]["z_dim"] == 48 else {}


def model_index(name: str) -> dict:
    """``model_index.json`` as ``WanPipeline.save_pretrained`` writes it for the published components."""
    row = published.published(name)
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if row["version"] == "2.2":  # the 2.2 pipeline registers its expert slot and switches (2.1's index predates them)
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"] if row["experts"] == 2 else [None, None],
                     boundary_ratio=row["boundary_ratio"], expand_timesteps=row["expand_timesteps"])
    return index


def build_assets(name: str) -> dict[str, dict]:
    """File name → JSON content of every shipped file of record ``name``."""
    models = build_models(name)
    files = {"model_index.json": model_index(name)}
    for part in ("transformer", "transformer_2", "vae"):
        if part in models:
            files[f"{part}/config.json"] = _config(models[part])
    files["vae/config.json"].update(vae_config(name))  # incl. keys this diffusers' class no longer takes (clip_output)
    files["text_encoder/config.json"] = text_encoder_config()
    files["scheduler/scheduler_config.json"] = _config(models["scheduler"])
    return files


def write_assets() -> list[Path]:
    written = []
    for hub_id, (_, name) in HUB_BASES.items():
        for file, content in build_assets(name).items():
            path = asset_path(hub_id, file)
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
            written.append(path)
    return written


__all__ = ["HUB_BASES", "SHIPPED_CONFIGS", "UMT5_XXL", "WAN22_VAE", "FLOW_SHIFT", "FILES", "published_name",
           "vae_config", "text_encoder_config",
           "asset_path", "read", "build_models", "model_index", "build_assets", "write_assets"]
