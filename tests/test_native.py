"""A user's first run on their own clip: without --recipe a base starts from its own recipe (one rule, pinned here
for every family and known base), a size or frame count far from the base's native settings is warned about, and
the dry run and the start of a run state what will run with a wall time measured on this machine."""

import json
import logging
import shutil

import pytest
from conftest import config_folder
from safetensors.torch import load_file

from cav import backbone, estimate, native
from cav.api import ASSETS
from cav.cli import main
from cav.config import TrainConfig, load_recipe
from cav.families import FAMILIES

PROMPT = "a red square moving right on a navy background"
MS_HUB_ID = "damo-vilab/text-to-video-ms-1.7b"
XL_HUB_ID, XL_ADAPTER = "stabilityai/stable-diffusion-xl-base-1.0", "guoyww/animatediff-motion-adapter-sdxl-beta"


def _dry(capsys, *argv):
    code = main(["train", "--dry-run", "--json", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


# ------------------------------------------------------------------------------------------ the bases
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One base of every kind, config files only (no weights): what recognizing a base reads."""
    root = tmp_path_factory.mktemp("bases")
    ms = dict(unet="modelscope_unet_config.json", vae="modelscope_vae_config.json",
              text_encoder="modelscope_text_encoder_config.json")
    made = {"modelscope": config_folder(root / "text-to-video-ms-1.7b", "TextToVideoSDPipeline",
                                        "UNet3DConditionModel", **ms),
            "zeroscope": config_folder(root / "zeroscope_v2_576w", "TextToVideoSDPipeline", "UNet3DConditionModel",
                                       **ms),
            "toy-world": config_folder(root / "my-toy", "TextToVideoSDPipeline", "UNet3DConditionModel", **ms)}
    # a model of `cav toy train-base` records the recipe it was trained with (here: 64x64, 4 frames)
    (made["toy-world"] / "cav_model.json").write_text(json.dumps({"recipe": {"frames": 4, "size": 64}}))
    shared = dict(text_encoder="sd15_text_encoder_config.json", vae="modelscope_vae_config.json")
    made["sd15"] = config_folder(root / "stable-diffusion-v1-5", "StableDiffusionPipeline", "UNet2DConditionModel",
                                 unet="sd15_unet_config.json", **shared)
    made["animatediff"] = config_folder(root / "animatediff", "AnimateDiffPipeline", "UNetMotionModel", **shared)
    made["adapter"] = root / "motion-adapter"
    made["adapter"].mkdir()
    shutil.copy(ASSETS / "animatediff_motion_adapter_v1_5_2_config.json", made["adapter"] / "config.json")
    return made


# (base, motion adapter, the recipe it starts from): every row of native.BASES and every family
RULE = [
    ("toy", None, "toy"),  # the embedded toy model: its cav_model.json records its training recipe
    ("toy-world", None, "toy"),  # a model trained by `cav toy train-base`, anywhere
    ("tiny", None, "modelscope"),  # a random toy.factory model records no training recipe: a UNet3D like any other
    ("modelscope", None, "modelscope"),
    (MS_HUB_ID, None, "modelscope"),  # the hub id, read offline from the configs cav ships
    ("zeroscope", None, "zeroscope"),  # ModelScope's configs, Zeroscope's name
    ("sd15", "adapter", "animatediff"),  # Stable Diffusion 1.5 + a motion adapter
    ("animatediff", None, "animatediff"),  # an AnimateDiff folder (unet/ = UNetMotionModel)
    (XL_HUB_ID, XL_ADAPTER, "animatediff-sdxl"),  # SDXL + the SDXL motion adapter (shipped configs, offline)
    ("toy-wan", None, "toy-wan"),  # the toy world's Wan (src/cav/toy/wan_model): 32 px, 9 frames
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None, "wan"),  # a published Wan: the family's own recipe
]


def _base(name, bases, tiny_model):
    return str(tiny_model) if name == "tiny" else str(bases.get(name, name))


@pytest.mark.parametrize("base,adapter,recipe", RULE)
def test_base_to_recipe_rule(base, adapter, recipe, bases, tiny_model):
    row, data = native.starting_recipe(_base(base, bases, tiny_model), adapter and _base(adapter, bases, tiny_model))
    assert row.recipe == recipe
    expected = load_recipe(recipe)
    assert data == {k: v for k, v in expected.items() if k not in ("base", "motion_adapter")}


def test_every_family_and_shipped_base_recipe_has_a_row():
    """Every family of families.FAMILIES has a last-resort row (the rule has no gap), and each row's recipe
    ships."""
    last_resort = {r.family: r.recipe for r in native.BASES if r.family and not r.name and not r.marker}
    assert set(last_resort) == set(FAMILIES)
    assert {r.recipe for r in native.BASES} == {"toy", "zeroscope", "modelscope", "animatediff", "animatediff-sdxl", "wan",
                                                 "toy-wan"}
    for row in native.BASES:
        TrainConfig.from_dict({**load_recipe(row.recipe), "prompt": "x"})


@pytest.mark.parametrize("base,adapter,size,frames", [
    ("toy", None, (32, 32), 8),
    ("toy-world", None, (64, 64), 4),  # what its own cav_model.json records
    ("tiny", None, (16, 16), 16),  # UNet sample_size 8 x its VAE's factor 2; the modelscope recipe's frames
    (MS_HUB_ID, None, (256, 256), 16),  # sample_size 32 x 8
    ("zeroscope", None, (320, 576), 24),  # by name: the zeroscope recipe's (its configs say 256)
    ("sd15", "adapter", (512, 512), 16),
    (XL_HUB_ID, XL_ADAPTER, (1024, 1024), 16),
])
def test_native_settings(base, adapter, size, frames, bases, tiny_model):
    nat = native.native(_base(base, bases, tiny_model), adapter and _base(adapter, bases, tiny_model))
    assert (nat.size, nat.frames) == (size, frames)


def test_far_from_native_is_a_warning_that_names_the_native_settings():
    assert native.warning(TrainConfig.of(prompt="x", size=(32, 32), frames=8)) is None
    assert native.warning(TrainConfig.of(prompt="x", size=(64, 64), frames=16)) is None  # twice is not far
    text = native.warning(TrainConfig.of(prompt="x", size=(256, 256), frames=16))  # the paper's ModelScope settings
    assert text.startswith("cav: warning: --size 256x256 is far") and "\n" not in text
    assert "(32x32, 8 frames;" in text and "--size 32 --frames 8" in text
    text = native.warning(TrainConfig.of(prompt="x", size=(32, 32), frames=2))
    assert "--frames 2 is far" in text


# ------------------------------------------------------------------------------------------ the CLI
def test_no_recipe_on_the_toy_base_runs_the_toy_settings(capsys):
    plan, err = _dry(capsys, "--prompt", "a car turning", "--no-estimate")
    toy = load_recipe("toy")
    assert plan["recipe"].startswith("toy, the base's own")
    assert plan["size"] == toy["size"] and plan["frames"] == toy["frames"] and plan["device"] == "cpu"
    assert plan["dtype"] == "fp32" and plan["warning"] is None and err == ""
    steps = {r["stage"]: r["steps"] for r in plan["schedule"]}
    assert steps == {"absorbers": toy["absorber_steps"], "t_lora": toy["steps"], "samples": toy["sample_steps"]}
    assert plan["estimate"] == {"skipped": "--no-estimate"}


def test_flags_override_the_base_recipe_and_a_given_recipe_replaces_it(capsys):
    plan, _ = _dry(capsys, "--prompt", "x", "--steps", "7", "--size", "48", "--no-estimate")
    assert plan["size"] == [48, 48] and plan["frames"] == 8 and {"stage": "t_lora", "steps": 7} in plan["schedule"]
    plan, err = _dry(capsys, "--prompt", "x", "--recipe", "modelscope", "--no-estimate")
    assert plan["base"] == MS_HUB_ID and plan["size"] == [256, 256] and plan["recipe"] == "modelscope (--recipe)"
    assert plan["warning"] is None and err == ""
    plan, err = _dry(capsys, "--prompt", "x", "--recipe", "modelscope", "--base", "toy", "--no-estimate")
    assert plan["size"] == [256, 256] and plan["frames"] == 16  # the recipe's settings on the toy base: warned
    assert err.strip() == plan["warning"] and "(32x32, 8 frames;" in err


def test_the_dry_run_carries_a_measured_estimate(capsys):
    # the toy recipe at 2 frames and batch 1: the same measurement, cheaper
    argv = ["--prompt", "x", "--frames", "2", "--t-lora-batch", "1", "--absorber-batch", "1", "--checkpoint-every",
            "100"]
    plan, _ = _dry(capsys, *argv)
    rows = {r["stage"]: r for r in plan["schedule"]}
    assert rows["samples"]["videos"] == 3  # checkpoints at 100, 200, 300: one validation prompt each
    for name in ("absorbers", "t_lora"):
        assert rows[name]["seconds_per_step"] > 0 and rows[name]["seconds"] == pytest.approx(
            rows[name]["steps"] * rows[name]["seconds_per_step"], rel=0.01, abs=0.1)
    assert rows["samples"]["seconds"] > 0
    est = plan["estimate"]
    assert est["total_seconds"] == pytest.approx(sum(r["seconds"] for r in rows.values()), abs=0.2)
    assert est["how"].startswith("an estimate:") and "this machine (cpu" in est["how"] and est["measured_seconds"] > 0
    assert main(["train", "--dry-run", *argv]) == 0  # the text says the same
    text = capsys.readouterr().out
    assert "will run: 2 frames at 32x32 on cpu in fp32" in text and "total" in text and "an estimate:" in text


def test_estimate_is_skipped_cleanly_where_it_cannot_run(bases, capsys):
    plan, _ = _dry(capsys, "--prompt", "x", "--base", MS_HUB_ID)  # not in the cache here: no download for a plan
    assert "not on this machine" in plan["estimate"]["skipped"] and plan["schedule"]
    plan, _ = _dry(capsys, "--prompt", "x", "--base", bases["modelscope"])  # 1.4 B parameters on a CPU
    assert "too large to time quickly on a CPU" in plan["estimate"]["skipped"]
    cfg = TrainConfig.of(prompt="x", base=str(bases["toy-world"]), size=(64, 64), frames=4)  # configs, no weights
    timed = estimate.measure_steps(cfg, backbone.resolve_device("cpu"), 1000)
    assert timed["skipped"].startswith("the measurement failed (") and "\n" not in timed["skipped"]


# ------------------------------------------------------------------------------------------ a run's start
def _train(video, model, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(model), "--out", str(out), "--frames", "3",
            "--size", "32", "--steps", "2", "--absorber-steps", "1", "--sample-steps", "1", "--ti-tokens", "2",
            "--absorber-batch", "2", *extra]


def test_a_run_states_what_will_run_and_measuring_changes_nothing(tmp_path, tiny_video, tiny_model, capsys,
                                                                   caplog):
    with caplog.at_level(logging.WARNING, logger="cav"):
        assert main(_train(tiny_video, tiny_model, tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert "recipe: modelscope, the base's own" in out and "will run: 3 frames at 32x32 on cpu in fp32" in out
    assert "an estimate:" in out and out.index("will run") < out.index("done:")
    # 3 frames is far from the 16 of ModelScope's family (32x32 is twice the tiny model's own 16x16: not far)
    assert [r.getMessage()[:37] for r in caplog.records] == ["cav: warning: --frames 3 is far from "]
    assert main(_train(tiny_video, tiny_model, tmp_path / "b", "--no-estimate", "--quiet")) == 0
    assert "will run" not in capsys.readouterr().out
    a, b = (load_file(tmp_path / r / "t_lora" / "adapter_model.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the same seed, the same adapter
