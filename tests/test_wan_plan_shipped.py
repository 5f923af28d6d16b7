"""The published Wan bases resolve offline by hub id: shipped JSON files in backbone's layout, checked by counts."""

import json

import pytest
import torch

from cav import backbone
from cav.errors import CavError
from cav.wan import published, shipped

HUBS = list(shipped.HUB_BASES)
# published sizes (third-party listings of the original checkpoints, decimal units) / bytes per parameter
VAE_21 = 508e6 / 4        # Wan2.1_VAE.pth, fp32
VAE_22 = 2.82e9 / 4       # Wan2.2_VAE.pth, fp32
UMT5_XXL_ENCODER = 11.4e9 / 2  # models_t5_umt5-xxl-enc-bf16.pth, bf16 (the "5.7 B encoder")


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_shipped_files_are_what_the_generator_writes():
    for hub, (_, name) in shipped.HUB_BASES.items():
        built = shipped.build_assets(name)
        assert set(built) <= set(shipped.FILES)
        for file, content in built.items():
            assert shipped.read(hub, file) == json.loads(json.dumps(content)), (hub, file)


@pytest.mark.parametrize("hub", HUBS)
def test_backbone_reads_them_offline_once_merged(hub, monkeypatch):
    """The lead's merge is ``SHIPPED_CONFIGS.update(shipped.SHIPPED_CONFIGS)``: backbone's own reader then finds
    every file without the hub (a hub request fails the test)."""
    monkeypatch.setattr(backbone, "SHIPPED_CONFIGS", {**backbone.SHIPPED_CONFIGS, **shipped.SHIPPED_CONFIGS})
    monkeypatch.setattr(backbone, "hub_file", lambda *a, **k: pytest.fail("went to the hub"))
    name = shipped.published_name(hub)
    row = published.published(name)
    index = backbone._read_json(hub, "model_index.json", "base")
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert (index.get("transformer_2") == ["diffusers", "WanTransformer3DModel"]) == (row["experts"] == 2)
    transformer = backbone._read_json(hub, "transformer/config.json", "base")
    assert {k: transformer[k] for k in row["transformer"] if k != "_class_name"} == \
        {k: v for k, v in row["transformer"].items() if k != "_class_name"}
    assert backbone._read_json(hub, "text_encoder/config.json", "base")["d_model"] == transformer["text_dim"]
    vae = backbone._read_json(hub, "vae/config.json", "base")
    assert vae.get("z_dim", 16) == row["vae"]["z_dim"] == transformer["in_channels"]
    sched = backbone._read_json(hub, "scheduler/scheduler_config.json", "base")
    assert sched["flow_shift"] == (5.0 if row["expand_timesteps"] else 3.0)


@pytest.mark.parametrize("name,vae", [("wan2.1-t2v-1.3b", VAE_21), ("wan2.2-ti2v-5b", VAE_22)])
def test_vae_and_text_encoder_counts_match_the_published_checkpoints(name, vae):
    models = shipped.build_models(name)
    assert abs(_count(models["vae"]) / vae - 1) < 0.01
    assert abs(_count(models["text_encoder"]) / UMT5_XXL_ENCODER - 1) < 0.01
    assert _count(models["transformer"]) == published.parameter_count(name)


def test_a14b_index_is_what_wan_pipeline_registers():
    from diffusers import WanPipeline

    m = shipped.build_models("wan2.2-t2v-a14b")
    pipe = WanPipeline(tokenizer=None, text_encoder=m["text_encoder"], vae=m["vae"], scheduler=m["scheduler"],
                       transformer=m["transformer"], transformer_2=m["transformer_2"], boundary_ratio=0.875)
    registered = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(pipe.config).items()}
    registered["tokenizer"] = ["transformers", "T5TokenizerFast"]  # umT5's tokenizer (not built here)
    index = shipped.read("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "model_index.json")
    assert {k: v for k, v in index.items() if k != "_class_name"} == registered


def test_scheduler_and_vae_files_load_in_diffusers():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    sched = UniPCMultistepScheduler.from_config(shipped.read("Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                                                             "scheduler/scheduler_config.json"))
    assert sched.config.use_flow_sigmas and sched.config.prediction_type == "flow_prediction"
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(shipped.read("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae/config.json"))
    assert vae.config.scale_factor_spatial == 16 and len(vae.config.latents_mean) == 48


def test_unknown_hub_id_and_missing_file_are_one_line():
    with pytest.raises(CavError, match=r"^'a/b' is not a published Wan base .*: use one of"):
        shipped.read("a/b", "model_index.json")
    with pytest.raises(CavError, match=r"has no transformer_2/config.json \(shipped: model_index.json"):
        shipped.read("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer_2/config.json")
