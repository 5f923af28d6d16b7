"""Dry-run plans: counts on the full ModelScope UNet config (meta device) equal Table 1 of the seed."""

import json
import time

import pytest
from conftest import config_folder

from cav import api
from cav.config import TrainConfig


@pytest.fixture(scope="module")
def modelscope_configs(tmp_path_factory):
    """A ModelScope-layout folder with config files only (no weights), as `--dry-run` needs."""
    root = tmp_path_factory.mktemp("ms") / "text-to-video-ms-1.7b"
    config_folder(root, "TextToVideoSDPipeline", "UNet3DConditionModel", unet="modelscope_unet_config.json",
                  text_encoder="modelscope_text_encoder_config.json", vae="modelscope_vae_config.json")
    return root


def _counts(base, **kw):
    plan = api.plan(TrainConfig.of(prompt="x", base=str(base), **kw))
    return {s["name"]: s["trainable_params"] for s in plan["stages"]}, plan


# Table 1, "# Params" columns (Temp., Spat.): 831.5K; 207.5K (S-LoRA), 4K (TI), 211.5K (both = 207.5K + 4K).
@pytest.mark.parametrize("absorbers,spatial", [("none", None), ("s-lora", 207_488), ("ti", 4096), ("both", 211_584)])
def test_table1_ours(modelscope_configs, absorbers, spatial):
    counts, plan = _counts(modelscope_configs, absorbers=absorbers)
    assert counts["t_lora"] == 831_488  # 831.5K
    assert round(counts["t_lora"] / 1000, 1) == 831.5
    spat = sum(v for k, v in counts.items() if k != "t_lora") or None
    assert spat == spatial
    assert plan["unet_params"] > 1_000_000_000  # the full 1.4 B-parameter UNet, built on the meta device


@pytest.mark.parametrize("rank,temporal", [(2, 779_520), (4, 1_559_040)])
def test_table1_motiondirector(modelscope_configs, rank, temporal):
    counts, _ = _counts(modelscope_configs, absorbers="s-lora", placement="motiondirector", t_lora_rank=rank)
    assert counts["t_lora"] == temporal  # 779.5K and 1559K
    assert counts["s_lora"] == 274_560  # 274.5K


def test_dry_run_cli_json_is_fast(modelscope_configs, capsys):
    from cav.cli import main

    t0 = time.perf_counter()
    assert main(["train", "--dry-run", "--json", "--prompt", "a man skiing", "--base", str(modelscope_configs)]) == 0
    seconds = time.perf_counter() - t0
    out = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in out["stages"]] == ["s_lora", "textual_inversion", "t_lora"]
    assert all(isinstance(s["trainable_params"], int) and s["modules"] > 0 for s in out["stages"])
    assert seconds < 60


def test_module_counts(modelscope_configs):
    plan = api.plan(TrainConfig.of(prompt="x", base=str(modelscope_configs), absorbers="s-lora"))
    mods = {s["name"]: s["modules"] for s in plan["stages"]}
    # 16 temporal transformers + transformer_in, 8 projections each; 16 spatial transformers, 8 projections each
    assert mods == {"s_lora": 128, "t_lora": 136}


def test_every_recipe_loads():
    """Training recipes become a TrainConfig; ablation files validate every row's TrainConfig."""
    from cav.bench.ablation import load_settings
    from cav.config import load_recipe

    from cav.config import recipe_names, recipe_path

    root = recipe_path("toy").parent  # the recipes ship inside the package
    assert set(recipe_names()) >= {"toy", "modelscope", "zeroscope", "ablation/toy"}
    recipes = sorted(root.glob("*.yaml"))
    assert {p.name for p in recipes} >= {"modelscope.yaml", "zeroscope.yaml", "toy.yaml"}
    for path in recipes:
        cfg = TrainConfig.from_dict({**load_recipe(path), "prompt": "x"})
        assert cfg.motion.rank >= 1
    ablations = sorted((root / "ablation").glob("*.yaml"))
    assert ablations
    for path in ablations:
        for quick in (False, True):
            settings = load_settings(path, quick=quick)
            assert len(settings["rows"]) == (7 if path.stem == "toy" else len(settings["rows"])) >= 3
            assert settings["references"]
