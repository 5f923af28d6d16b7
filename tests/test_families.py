"""Every base family in one suite: what holds for all of them is checked once per row of ``families.FAMILIES``
(on the tiny model the row's ``tiny`` builds, loaded by path as real models are); what only one family's mechanism
needs (SDXL's packed condition, AnimateDiff's image model + motion adapter, the MotionLoRA layout) follows, named
after it."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import config_folder

from cav import api, backbone, families
from cav.adapters import animatediff_export, lora
from cav.adapters.textual_inversion import TextualInversion
from cav.api import ASSETS
from cav.cli import main
from cav.conditioning import pack
from cav.config import TrainConfig
from cav.data.video import read_video
from cav.bypass import LayerBypass
from cav.families import ANIMATEDIFF, ANIMATEDIFF_SDXL, ANIMATEDIFF_EXPORT, UNET3D, WAN
from cav.stages import encode_prompt
from cav.toy.factory import (TinyAnimateDiffSpec, TinySdxlSpec, build_image_unet, build_motion_adapter,
                             build_sdxl_unet, make_tiny_motion_adapter)

PROMPT = "a red square moving right"
ROWS = list(families.FAMILIES.values())
ANIMATED = [f for f in ROWS if f.addon]  # families whose base can also be an image model + an add-on
# the image-mode tests that look at bypassed layers apply to the rows whose image mode bypasses layers; Wan's folds
# frames into the batch (no layer is bypassed, and a 1-frame video is already image mode): its own tests below
BYPASSED = [f for f in ROWS if isinstance(f.image_mode, LayerBypass)]
# the MotionLoRA layout's test; Wan's ComfyUI export has its own test below
MOTION_LORA_EXPORT = [f for f in ROWS if ANIMATEDIFF_EXPORT in f.exports]
WITH_TI = [f for f in ROWS if f.condition.textual_inversion]  # token rows (Wan's prompt vectors: test_wan_ti.py)


def _stock_loads_loras(family) -> bool:
    """Whether stock diffusers' LoRA loader can put a LoRA into the family's model class (diffusers 0.42.1: not
    into ``UNet3DConditionModel``, which lacks ``load_lora_adapter``)."""
    import diffusers

    return hasattr(getattr(diffusers, family.model_class), "load_lora_adapter")


STOCK_LORA = [f for f in ROWS if _stock_loads_loras(f)]
NAMES = lambda f: f.name  # noqa: E731 (test ids)


def train_args(family) -> list[str]:
    """The tiny schedule every family's run uses, at the family's tiny size."""
    return ["--frames", str(family.tiny.frames), "--size", str(family.tiny.size), "--steps", "2", "--absorber-steps", "2",
            "--sample-steps", "2", "--ti-tokens", "2", "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet"]


TRAIN = train_args(ANIMATEDIFF)  # both AnimateDiff rows train at 16 px


def _run(capsys, *argv):
    capsys.readouterr()  # only this command's output (building a fixture's model or run may print progress)
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _one_line_error(code, err, *words):
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err


def _video(path, size=16):
    return read_video(path, frames=None, size=(size, size))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_video):
    """``built(kind, family)``: the family's tiny ``model``, its image model + add-on ``parts``, or a trained
    ``run`` on it; each made once per module."""
    cache = {}

    def get(kind: str, family):
        key = (kind, family.name)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{kind}-{family.name}")
            if kind == "model":
                cache[key] = family.tiny.make(root / f"tiny-{family.name}")
            elif kind == "parts":
                cache[key] = family.tiny.parts(root)
            else:
                out = root / "run"
                assert main(["train", str(tiny_video), "--prompt", PROMPT, "--base", str(get("model", family)),
                             "--out", str(out), *train_args(family)]) == 0
                cache[key] = out
        return cache[key]
    return get


# ============================================================================ every family
@pytest.mark.parametrize("family", ROWS, ids=NAMES)
def test_family_detection(built, family):
    assert backbone.family_of(built("model", family)) is family
    if family.addon:
        image, addon = built("parts", family)
        assert backbone.family_of(image, str(addon)) is family


@pytest.mark.parametrize("family", ROWS, ids=NAMES)
def test_image_mode_makes_frames_independent(built, family):
    """In image mode an f-frame batch is f independent one-frame images (the paper's T2I mode)."""
    unet = backbone.load(built("model", family), "cpu").unet
    x, cond = _inputs(unet, frames=4)
    with torch.no_grad(), family.image_mode(unet):
        together = unet(x, T10, encoder_hidden_states=cond).sample
        separate = torch.cat([unet(x[:, :, i:i + 1], T10, encoder_hidden_states=cond).sample for i in range(4)],
                             dim=2)
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)


T10 = torch.tensor([10])  # a timestep every family's model takes (a DiT takes no plain int)


def _inputs(unet, frames, batch=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, unet.config.in_channels, frames, 8, 8, generator=g)
    width = unet.config.get("cross_attention_dim") or unet.config.get("text_dim")  # UNet / Wan text width
    cond = torch.randn(batch, 5, width, generator=g)
    return x, cond


@pytest.mark.parametrize("family", BYPASSED, ids=NAMES)
def test_image_mode_removes_temporal_layers_and_restores_bit_for_bit(built, family):
    unet = backbone.load(built("model", family), "cpu").unet
    modules = family.image_mode.modules(unet)
    # give the temporal layers non-trivial weights (their output projections start at zero in diffusers)
    with torch.no_grad():
        for _, m in modules:
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    classes = {cls.split(":")[1] for cls, _ in family.image_mode.layers}
    assert {type(m).__name__ for _, m in modules} == classes  # every temporal layer class the row names is there
    x, cond = _inputs(unet, frames=4)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=cond).sample
        with family.image_mode(unet):
            bypassed = unet(x, 10, encoder_hidden_states=cond).sample
            single = unet(x[:, :, :1], 10, encoder_hidden_states=cond).sample
        after = unet(x, 10, encoder_hidden_states=cond).sample
        stock_single = unet(x[:, :, :1], 10, encoder_hidden_states=cond).sample
    assert not torch.allclose(before, bypassed, atol=1e-4)
    # stock diffusers still runs temporal layers on one frame; image mode does not
    assert not torch.allclose(single, stock_single, atol=1e-5)
    assert torch.equal(before, after)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, state_before[k])
    assert all("forward" not in vars(m) for _, m in family.image_mode.modules(unet))


@pytest.mark.parametrize("family", ROWS, ids=NAMES)
def test_image_mode_restores_after_exception(built, family):
    unet = backbone.load(built("model", family), "cpu").unet
    try:
        with family.image_mode(unet):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all("forward" not in vars(m) for _, m in family.image_mode.modules(unet))
    assert "forward" not in vars(unet)


@pytest.mark.parametrize("family", ROWS, ids=NAMES)
def test_train_then_generate_reproduces_the_checkpoint_sample(built, family, tmp_path):
    run_dir, size = built("run", family), family.tiny.size
    ti = family in WITH_TI  # the family recipe trains textual inversion too (Wan's: the S-LoRA alone)
    for rel in ("t_lora/adapter_model.safetensors", "t_lora/pytorch_lora_weights.safetensors",
                "absorbers/s_lora/pytorch_lora_weights.safetensors", "checkpoints/step-000002/samples/sample-0.mp4",
                "samples/contact_sheet.png") + (("absorbers/textual_inversion.safetensors",) if ti else ()):
        assert (run_dir / rel).is_file(), rel
    meta = json.loads((run_dir / "t_lora" / "cav.json").read_text())
    assert meta["family"] == family.name and meta["kind"] == "temporal"
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines) and len(lines) == 4
    out = tmp_path / "gen.mp4"
    ckpt = run_dir / "checkpoints" / "step-000001"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(ckpt), "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(_video(out, size), _video(ckpt / "samples" / "sample-0.mp4", size))
    composed = tmp_path / "composed.mp4"  # two T-LoRAs, the S-LoRA as an image LoRA and the TI tokens together
    tokens = ["--textual-inversion", str(run_dir / "absorbers" / "textual_inversion.safetensors")] if ti else []
    assert main(["generate", "--prompt", "a <cav> moving right", "--adapter", f"{run_dir}:0.7",
                 "--adapter", f"{ckpt}:0.3", "--image-lora", str(run_dir), *tokens, "--out", str(composed),
                 "--quiet"]) == 0
    assert not np.array_equal(_video(composed, size), _video(out, size))


@pytest.mark.parametrize("family", ROWS, ids=NAMES)
def test_resume_ends_with_the_same_t_lora(built, family, tiny_video, tmp_path):
    from safetensors.torch import load_file

    run_dir = built("run", family)
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    for rel in ("checkpoints/step-000002", "t_lora", "samples"):
        shutil.rmtree(copy / rel)
    assert main(["train", str(tiny_video), "--resume", "--out", str(copy), "--quiet"]) == 0
    a = load_file(str(run_dir / "t_lora" / lora.WEIGHTS))
    b = load_file(str(copy / "t_lora" / lora.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ROWS, ids=NAMES)
def test_adapters_of_another_family_are_refused(built, family, tmp_path, capsys):
    """A T-LoRA or image LoRA of another family is refused by name on generate, and so is an export format the
    run's family does not list."""
    other = next(f for f in ROWS if f is not family)
    run_dir, out = built("run", other), tmp_path / "x.mp4"
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--base", built("model", family), "--adapter", run_dir,
                     "--out", out)
    assert code == 2 and other.name in err and family.name in err and "\n" not in err
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--base", built("model", family), "--image-lora",
                     run_dir, "--out", out)
    assert code == 2 and other.name in err and "\n" not in err
    assert not out.exists()
    for fmt in families.export_formats():
        if all(f.name != fmt for f in other.exports):
            code, err = _run(capsys, "export", run_dir, "--format", fmt)
            assert code == 2 and other.name in err and "\n" not in err


@pytest.mark.parametrize("family", STOCK_LORA, ids=NAMES)
def test_stock_diffusers_loads_t_lora_and_s_lora(built, family):
    """Stock diffusers (the family's pipeline class, ``load_lora_weights`` + ``set_adapters``; no cav code on that
    side) samples what cav samples with the run's T-LoRA and S-LoRA on; with both at weight 0 it samples another
    video. Both sides run the pipeline's own loop (guidance on, so the unconditional branch is covered too)."""
    import diffusers

    from cav.sampling import fresh_noise, latent_shape

    model, run_dir, size = built("model", family), built("run", family), family.tiny.size
    stock = getattr(diffusers, family.pipeline_class).from_pretrained(str(model), **dict(family.pipeline_extra))
    stock.load_lora_weights(str(run_dir / "t_lora"), adapter_name="motion")
    stock.load_lora_weights(str(run_dir / "absorbers" / "s_lora"), adapter_name="look")
    stock.set_adapters(["motion", "look"], adapter_weights=[1.0, 1.0])
    stock.set_progress_bar_config(disable=True)

    bb = backbone.load(model, "cpu")
    api.load_adapters(bb, [(str(run_dir), 1.0)], [(str(run_dir), 1.0)])
    frames = family.tiny.frames
    latents = fresh_noise(latent_shape(bb, frames, (size, size)), [0])
    call = dict(prompt=PROMPT, num_frames=frames, height=size, width=size, num_inference_steps=2, guidance_scale=7.5,
                latents=latents, output_type="latent")
    with torch.no_grad():
        ours = bb.pipeline()(**call).frames
        theirs = stock(**call).frames
        stock.set_adapters(["motion", "look"], adapter_weights=[0.0, 0.0])
        off = stock(**call).frames
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (theirs - off).abs().max() > 1e-4  # the adapters change the output


@pytest.mark.parametrize("family", ANIMATED, ids=NAMES)
def test_image_model_plus_addon_trains_and_generate_rebuilds_it(built, family, tiny_video, tmp_path):
    """An image model + the family's add-on trains as the family; `cav generate` rebuilds that base (the image
    model + add-on) from the adapter's metadata."""
    image, addon = built("parts", family)
    out = tmp_path / "run"
    assert main(["train", str(tiny_video), "--prompt", PROMPT, "--base", str(image), family.addon.flag, str(addon),
                 "--out", str(out), "--absorbers", "none", *train_args(family)]) == 0
    meta = json.loads((out / "t_lora" / "cav.json").read_text())
    assert meta["family"] == family.name and meta["motion_adapter"] == str(addon)
    gen = tmp_path / "gen.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(out), "--out", str(gen), "--quiet"]) == 0
    assert np.array_equal(_video(gen), _video(out / "samples" / "sample-0.mp4"))


@pytest.mark.parametrize("family", MOTION_LORA_EXPORT, ids=NAMES)
def test_export_round_trip_and_original_merge(built, family, tmp_path, capsys):
    """Each format the family lists: the layout's keys, the converter's inverse gives the peft state back, the file
    records the family, and the original loader's rule (W += up @ down, alpha folded in) equals the T-LoRA at
    weight 1."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = built("run", family)
    for fmt in family.exports:
        target = tmp_path / fmt.filename
        assert _run(capsys, "export", run_dir, "--format", fmt.name, "--out", target)[0] == 0
        exported = load_file(str(target))
        peft_state = load_file(str(run_dir / "t_lora" / lora.WEIGHTS))
        assert len(exported) == len(peft_state)
        assert all(re.fullmatch(r"(down_blocks\.\d|up_blocks\.\d|mid_block)\.motion_modules\.\d\.temporal_transformer"
                                r"\.transformer_blocks\.0\.attention_blocks\.[01]\.processor\.to_(q|k|v|out)_lora\."
                                r"(down|up)\.weight", k) for k in exported)
        back = animatediff_export.from_animatediff(exported, rank=4, alpha=1.0)
        assert back.keys() == peft_state.keys()
        for k, v in peft_state.items():
            assert torch.allclose(back[k], v, rtol=1e-6, atol=0), k
        with safe_open(str(target), "pt") as fh:
            assert fh.metadata()["cav_family"] == family.name

        # The original loader's rule: W += alpha · up @ down on each projection (alpha 1) = the T-LoRA at weight 1.
        model = built("model", family)
        merged = backbone.load(model, "cpu")
        modules = dict(merged.unet.named_modules())
        with torch.no_grad():
            for key, down in exported.items():
                if ".down." in key:
                    up = exported[key.replace(".down.", ".up.")]
                    modules[animatediff_export.diffusers_module(key)].weight += up @ down
        ours = backbone.load(model, "cpu")
        api.load_adapters(ours, [(str(run_dir), 1.0)])
        x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([300])
        cond = encode_prompt(ours, PROMPT)
        with torch.no_grad():
            assert torch.allclose(merged.unet(x, t, encoder_hidden_states=cond).sample,
                                  ours.unet(x, t, encoder_hidden_states=cond).sample, atol=1e-5)
        code, err = _run(capsys, "export", run_dir, "--format", fmt.name, "--out", target)
        assert code == 2 and "already exists" in err and "\n" not in err


# ============================================================================ one family's mechanism
@pytest.fixture(scope="module")
def ad_model(built):
    return built("model", ANIMATEDIFF)


@pytest.fixture(scope="module")
def sd_parts(built):
    return built("parts", ANIMATEDIFF)


@pytest.fixture(scope="module")
def ad_run(built):
    return built("run", ANIMATEDIFF)


@pytest.fixture(scope="module")
def xl_model(built):
    return built("model", ANIMATEDIFF_SDXL)


@pytest.fixture(scope="module")
def xl_parts(built):
    return built("parts", ANIMATEDIFF_SDXL)


@pytest.fixture(scope="module")
def xl_run(built):
    return built("run", ANIMATEDIFF_SDXL)


def test_unet3d_image_mode_covers_transformer_in_temp_attentions_and_temp_convs(built):
    unet = backbone.load(built("model", UNET3D), "cpu").unet
    modules = UNET3D.image_mode.modules(unet)
    names = {n.split(".")[0] if n == "transformer_in" else n.split(".")[2] for n, _ in modules}
    assert {"transformer_in", "temp_attentions", "temp_convs"} <= names


# ---------------------------------------------------------------------------- AnimateDiff (SD 1.5)
def test_bypassed_motion_unet_is_the_image_unet_frame_by_frame():
    from diffusers import UNetMotionModel

    spec = TinyAnimateDiffSpec()
    image = build_image_unet(spec).eval()
    motion = UNetMotionModel.from_unet2d(image, build_motion_adapter(spec)).eval()
    b, f = 2, 3
    x = torch.randn(b, 4, f, 8, 8)
    cond = torch.randn(b * f, 24, 32)  # one condition per frame, as AnimateDiffPipeline passes it
    t = torch.tensor([10, 500])
    with torch.no_grad():
        with ANIMATEDIFF.image_mode(motion):
            video = motion(x, t, encoder_hidden_states=cond).sample
        frames = image(x.permute(0, 2, 1, 3, 4).reshape(b * f, 4, 8, 8), t.repeat_interleave(f),
                       encoder_hidden_states=cond).sample
        unbypassed = motion(x, t, encoder_hidden_states=cond).sample
    frames = frames.reshape(b, f, 4, 8, 8).permute(0, 2, 1, 3, 4)
    assert torch.allclose(video, frames, atol=1e-5, rtol=1e-5), (video - frames).abs().max()
    assert (unbypassed - frames).abs().max() > 1e-3  # the motion modules do act when not bypassed
    n_motion = sum(1 for n, _ in motion.named_modules() if re.fullmatch(r".*motion_modules\.\d+", n))
    assert len(ANIMATEDIFF.image_mode.modules(motion)) == n_motion > 0


def test_t_lora_targets_only_motion_attention(ad_model):
    bb = backbone.load(ad_model, "cpu")
    lora.add_lora(bb.unet, "t", lora.lora_config("temporal", "cav", 4, 1.0, bb.family))
    lora.add_lora(bb.unet, "s", lora.lora_config("spatial", "cav", 1, 0.5, bb.family))
    adapted = {name: set(m.lora_A) for name, m in bb.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    temporal = {n for n, a in adapted.items() if "t" in a}
    spatial = {n for n, a in adapted.items() if "s" in a}
    projections = {n for n, _ in bb.unet.named_modules()
                   if re.fullmatch(r".*motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)", n)}
    assert temporal == projections and len(temporal) == 8 * len(ANIMATEDIFF.image_mode.modules(bb.unet))
    assert all(".attentions." in n and "motion_modules" not in n for n in spatial) and spatial
    assert any(n.startswith("mid_block.motion_modules") for n in temporal)


@pytest.fixture(scope="module")
def sd15_full_size(tmp_path_factory):
    """SD 1.5 + motion adapter v1-5-2 config files only (no weights), and the AnimateDiff folder they make."""
    root = tmp_path_factory.mktemp("full")
    sd, adapter, ad = root / "stable-diffusion-v1-5", root / "animatediff-motion-adapter-v1-5-2", root / "animatediff"
    # the plan checks sizes against the VAE: SD 1.5's VAE is the one ModelScope ships (8x, 4 blocks)
    shared = dict(text_encoder="sd15_text_encoder_config.json", vae="modelscope_vae_config.json")
    config_folder(sd, "StableDiffusionPipeline", "UNet2DConditionModel", unet="sd15_unet_config.json", **shared)
    config_folder(ad, "AnimateDiffPipeline", "UNetMotionModel", **shared)
    adapter.mkdir()
    shutil.copy(ASSETS / "animatediff_motion_adapter_v1_5_2_config.json", adapter / "config.json")
    unet, _ = backbone.empty_unet(sd, str(adapter))
    (ad / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
    return sd, adapter, ad


def test_animatediff_dry_run_counts_equal_what_peft_injects(sd15_full_size, capsys):
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel
    from peft import LoraConfig, inject_adapter_in_model

    sd, adapter, ad = sd15_full_size
    code = main(["train", "--dry-run", "--json", "--prompt", "x", "--base", str(sd), "--motion-adapter", str(adapter)])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    counts = {s["name"]: s["trainable_params"] for s in plan["stages"]}
    assert plan["family"] == "animatediff" and plan["unet_params"] > 1_000_000_000  # SD 1.5 UNet + motion modules
    assert counts["textual_inversion"] == 4 * 768  # four CLIP-L token embeddings
    assert api.plan(TrainConfig.of(prompt="x", base=str(ad)))["stages"] == plan["stages"]

    # Independently: peft on the full-size UNetMotionModel (meta device) with the motion-module projections listed
    with init_empty_weights():
        unet = UNetMotionModel.from_config(json.loads((ad / "unet" / "config.json").read_text()))
    names = [n for n, _ in unet.named_modules() if re.fullmatch(
        r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\."
        r"(to_q|to_k|to_v|to_out\.0)", n)]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=1.0, target_modules=names), unet, low_cpu_mem_usage=True)
    injected = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    assert counts["t_lora"] == injected == 1_208_320  # 21 motion modules × 8 projections, 8·C each at rank 4
    stages = {s["name"]: s["modules"] for s in plan["stages"]}
    assert stages["t_lora"] == len(names) == 168


def test_motion_adapter_whose_channels_do_not_fit(sd_parts, tmp_path, tiny_video, capsys):
    sd, _ = sd_parts
    wrong = make_tiny_motion_adapter(tmp_path / "wrong-adapter", block_out_channels=(16, 32))
    code, err = _run(capsys, "train", tiny_video, "--prompt", PROMPT, "--base", sd, "--motion-adapter", wrong,
                     "--out", tmp_path / "run", *TRAIN)
    assert code == 2 and "channels" in err and "\n" not in err and "Traceback" not in err
    code, err = _run(capsys, "train", "--dry-run", "--prompt", PROMPT, "--base", sd, "--motion-adapter", wrong)
    assert code == 2 and "channels" in err and "\n" not in err


def test_image_model_without_motion_adapter_and_adapter_on_a_video_base(sd_parts, ad_model, tmp_path, capsys):
    sd, adapter = sd_parts
    code, err = _run(capsys, "train", "--dry-run", "--prompt", PROMPT, "--base", sd)
    assert code == 2 and "--motion-adapter" in err and "\n" not in err
    code, err = _run(capsys, "train", "--dry-run", "--prompt", PROMPT, "--base", ad_model, "--motion-adapter", adapter)
    assert code == 2 and "image model" in err and "\n" not in err


def _image_lora(unet, folder, seed=3):
    """An image LoRA of ``unet`` (random, non-zero) saved in diffusers' LoRA layout, as SD 1.5 LoRAs are shared."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=2, lora_alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    inject_adapter_in_model(config, unet, adapter_name="x")
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.2)
    state = get_peft_model_state_dict(unet, adapter_name="x")
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder), unet_lora_layers=state, weight_name="subject_lora.safetensors",
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 2.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    return folder / "subject_lora.safetensors"


def test_bypassed_unet_with_given_image_lora_is_the_image_model_with_it(sd_parts, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cav.adapters.image_lora import load_image_lora

    sd, adapter = sd_parts
    file = _image_lora(build_image_unet(TinyAnimateDiffSpec()), tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd))  # stock: the image model with the LoRA
    pipe.load_lora_weights(str(file), adapter_name="subject")
    bb = backbone.load(sd, "cpu", motion_adapter=str(adapter))
    load_image_lora(bb.unet, file, "s_lora", bb.family)
    x, cond, t = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 24, 32), torch.tensor([200])
    with torch.no_grad(), ANIMATEDIFF.image_mode(bb.unet):
        video = bb.unet(x, t, encoder_hidden_states=cond).sample
        frames = pipe.unet(x[0].permute(1, 0, 2, 3), t.repeat(3), encoder_hidden_states=cond.expand(3, -1, -1)).sample
    assert torch.allclose(video[0].permute(1, 0, 2, 3), frames, atol=1e-5)


def test_s_lora_from_and_ti_from_skip_stage_one(sd_parts, tiny_video, tmp_path):
    from safetensors.torch import load_file, save_file

    sd, adapter = sd_parts
    file = _image_lora(build_image_unet(TinyAnimateDiffSpec()), tmp_path)
    emb = tmp_path / "subject.safetensors"
    save_file({"<subject>": torch.randn(3, 32)}, str(emb))
    out = tmp_path / "run"
    assert main(["train", str(tiny_video), "--prompt", "a <cav> moving right", "--base", str(sd), "--motion-adapter",
                 str(adapter), "--s-lora-from", str(file), "--ti-from", str(emb), "--out", str(out), *TRAIN]) == 0
    stages = {json.loads(x)["stage"] for x in (out / "log.jsonl").read_text().splitlines()}
    assert stages == {"t_lora"}  # no stage 1
    assert torch.equal(load_file(str(out / "absorbers" / "textual_inversion.safetensors"))["<cav>"],
                       load_file(str(emb))["<subject>"])
    given = load_file(str(file))
    saved = load_file(str(out / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS))
    assert given.keys() == saved.keys() and all(torch.equal(given[k], saved[k]) for k in given)
    plan = api.plan(TrainConfig.of(prompt="x", base=str(sd), motion_adapter=str(adapter), s_lora_from=str(file)))
    assert [s["name"] for s in plan["stages"]] == ["t_lora"]


def test_image_lora_of_another_base_family(sd_parts, tiny_video, tmp_path, capsys):
    sd, adapter = sd_parts
    other = build_image_unet(TinyAnimateDiffSpec(block_out_channels=(64, 128), cross_attention_dim=48, text_hidden=48))
    file = _image_lora(other, tmp_path)
    code, err = _run(capsys, "train", tiny_video, "--prompt", PROMPT, "--base", sd, "--motion-adapter", adapter,
                     "--s-lora-from", file, "--out", tmp_path / "run", *TRAIN)
    assert code == 2 and "another base family" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "t_lora").exists()


def test_kohya_layout_image_lora_loads_like_the_diffusers_one(sd_parts, tmp_path):
    from safetensors.torch import load_file, save_file

    from cav.adapters.image_lora import load_image_lora

    sd, adapter = sd_parts
    file = _image_lora(build_image_unet(TinyAnimateDiffSpec()), tmp_path)
    kohya = {}
    for key, tensor in load_file(str(file)).items():  # unet.<module>.lora_A.weight → lora_unet_<module_>.lora_down.weight
        module, part = key.removeprefix("unet.").split(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(2.0)  # alpha 2 at rank 2: scale 1, as in the diffusers file's metadata
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    x, cond, t = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 24, 32), torch.tensor([600])
    outs = []
    for f in (file, tmp_path / "kohya.safetensors"):
        bb = backbone.load(sd, "cpu", motion_adapter=str(adapter))
        load_image_lora(bb.unet, f, "s_lora", bb.family)
        with torch.no_grad():
            outs.append(bb.unet(x, t, encoder_hidden_states=cond).sample)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    with torch.no_grad():
        plain = backbone.load(sd, "cpu", motion_adapter=str(adapter)).unet(x, t, encoder_hidden_states=cond).sample
    assert (plain - outs[1]).abs().max() > 1e-3  # the LoRA was really applied


# ---------------------------------------------------------------------------- AnimateDiff SDXL
def test_sdxl_text_condition(xl_model):
    """Training's condition is the pipeline's own prompt encoding (hidden states of
    both encoders + the pooled embedding), packed, and the UNet hook hands it over as the pipeline does."""
    bb = backbone.load(xl_model, "cpu")
    pipe = bb.pipeline()
    assert type(pipe).__name__ == "AnimateDiffSDXLPipeline"
    hidden, _, pooled, _ = pipe.encode_prompt(prompt=[PROMPT], device="cpu", num_videos_per_prompt=1,
                                              do_classifier_free_guidance=False)
    cond = encode_prompt(bb, PROMPT)
    assert torch.equal(cond, pack(hidden, pooled)) and cond.shape == (1, 24 + 1, 32)
    _, uncond = bb.condition.pipeline_encode(pipe, [PROMPT], "cpu", True, None)  # what guidance samples against
    assert torch.equal(bb.condition.unconditional(bb), uncond) and not uncond.any()  # (prompt dropout trains it)
    x, t = torch.randn(1, 4, 3, 8, 8), torch.tensor([500])
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}  # 8×8 latent, 2× VAE
    with torch.no_grad():
        ours = bb.unet(x, t, encoder_hidden_states=cond).sample
        stock = bb.unet(x, t, encoder_hidden_states=hidden.repeat_interleave(3, dim=0), added_cond_kwargs=added).sample
    assert torch.equal(ours, stock)


def test_prompt_dropout_trains_the_branch_guidance_uses(xl_model):
    """With --t-lora-prompt-dropout the dropped copies get the unconditional branch's condition of SDXL sampling
    (zeros), and the hook still hands the UNet a pooled embedding (zeros) and time ids for them."""
    from cav.stages import t_lora_stage

    bb = backbone.load(xl_model, "cpu")
    cfg = TrainConfig.of(prompt=PROMPT, frames=4, size=[16, 16], absorbers="none", t_lora_prompt_dropout=0.5,
                      t_lora_batch=4)
    stage = t_lora_stage(bb, cfg, torch.rand(4, 3, 16, 16) * 2 - 1, None)
    latents, cond = stage.batch(torch.Generator().manual_seed(1))
    full = encode_prompt(bb, PROMPT)[0]
    dropped = [not c.any() for c in cond]
    assert all(d or torch.equal(c, full) for c, d in zip(cond, dropped)) and 0 < sum(dropped) < 4
    with torch.no_grad():
        assert torch.isfinite(bb.unet(latents, torch.tensor([500] * 4), encoder_hidden_states=cond).sample).all()


def test_bypassed_sdxl_motion_unet_is_the_image_unet_frame_by_frame():
    from diffusers import UNetMotionModel

    spec = TinySdxlSpec()
    image = build_sdxl_unet(spec).eval()
    motion = backbone.motion_unet(image, build_motion_adapter(spec)).eval()
    stock = UNetMotionModel.from_unet2d(image, build_motion_adapter(spec))  # diffusers 0.42.1 skips add_embedding,
    assert not torch.equal(stock.add_embedding.linear_1.weight, image.add_embedding.linear_1.weight)  # so cav copies it
    b, f = 2, 3
    x = torch.randn(b, 4, f, 8, 8)
    cond = torch.randn(b * f, 24, 32)  # per frame, as AnimateDiffSDXLPipeline passes it
    added = {"text_embeds": torch.randn(b, 16), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b)}
    per_frame = {k: v.repeat_interleave(f, dim=0) for k, v in added.items()}  # the image UNet sees B·F images
    t = torch.tensor([10, 500])
    with torch.no_grad():
        with ANIMATEDIFF_SDXL.image_mode(motion):
            video = motion(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        frames = image(x.permute(0, 2, 1, 3, 4).reshape(b * f, 4, 8, 8), t.repeat_interleave(f),
                       encoder_hidden_states=cond, added_cond_kwargs=per_frame).sample
        unbypassed = motion(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    frames = frames.reshape(b, f, 4, 8, 8).permute(0, 2, 1, 3, 4)
    assert torch.allclose(video, frames, atol=1e-5, rtol=1e-5), (video - frames).abs().max()
    assert (unbypassed - frames).abs().max() > 1e-3
    # down: 1 per layer, up: layers + 1, no mid block
    assert len(ANIMATEDIFF_SDXL.image_mode.modules(motion)) == 3 * 1 + 3 * 2


def test_textual_inversion_goes_into_both_encoders(xl_run, xl_model):
    from safetensors import safe_open

    file = xl_run / "absorbers" / "textual_inversion.safetensors"
    with safe_open(str(file), "pt") as fh:
        assert fh.metadata()["token"] == "<cav>"
        rows = {k: fh.get_tensor(k) for k in fh.keys()}
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"clip_l": (2, 16), "clip_g": (2, 16)}
    fresh = backbone.load(xl_model, "cpu")
    init = fresh.tokenizer("object", add_special_tokens=False).input_ids[0]
    for key, (_, _, enc) in zip(("clip_l", "clip_g"), fresh.text_parts()):  # both trained away from the init word
        assert (rows[key] - enc.get_input_embeddings().weight[init]).abs().min() > 0, key
    ti = TextualInversion.from_file(fresh.text_parts(), file, placeholder=None)  # as `cav generate` loads it
    assert ti.tokens == ["<cav>", "<cav>_1"]
    for key, (_, tok, enc) in zip(("clip_l", "clip_g"), fresh.text_parts()):
        ids = tok.convert_tokens_to_ids(ti.tokens)
        assert torch.equal(enc.get_input_embeddings().weight[ids], rows[key])


def test_image_model_plus_motion_adapter_and_given_absorbers(xl_parts, xl_run, tiny_video, tmp_path):
    """An SDXL image model + motion adapter; an SDXL embedding (clip_l + clip_g) given with --ti-from and an SDXL
    image LoRA with --s-lora-from skip stage 1 and are kept unchanged (the TI in both encoders)."""
    from safetensors.torch import load_file, save_file

    sd, adapter = xl_parts
    given = {"clip_l": torch.randn(3, 16), "clip_g": torch.randn(3, 16)}
    emb = tmp_path / "subject_xl.safetensors"
    save_file(given, str(emb))
    out = tmp_path / "run"
    assert main(["train", str(tiny_video), "--prompt", "a <cav> moving right", "--base", str(sd), "--motion-adapter",
                 str(adapter), "--ti-from", str(emb), "--s-lora-from", str(xl_run / "absorbers" / "s_lora"),
                 "--out", str(out), *TRAIN]) == 0
    meta = json.loads((out / "t_lora" / "cav.json").read_text())
    assert meta["family"] == "animatediff-sdxl" and meta["motion_adapter"] == str(adapter)
    assert not any(json.loads(x)["stage"] == "absorbers" for x in (out / "log.jsonl").read_text().splitlines())
    saved = load_file(str(out / "absorbers" / "textual_inversion.safetensors"))
    assert saved.keys() == given.keys() and all(torch.equal(saved[k], given[k]) for k in given)
    lora_in = load_file(str(xl_run / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS))
    lora_out = load_file(str(out / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS))
    assert lora_in.keys() == lora_out.keys() and all(torch.equal(lora_in[k], lora_out[k]) for k in lora_in)
    gen = tmp_path / "gen.mp4"  # base + motion adapter from the adapter's metadata; the validation prompt
    assert main(["generate", "--prompt", "a object moving right", "--adapter", str(out), "--out", str(gen),
                 "--quiet"]) == 0
    assert np.array_equal(_video(gen), _video(out / "samples" / "sample-0.mp4"))


def _sdxl_config_folder(root, pipeline: str, unet: str | None):
    """An SDXL diffusers folder with config files only (no weights), as dry runs read."""
    comps = {"unet": unet, "vae": "sdxl_vae_config.json", "text_encoder": "sdxl_text_encoder_config.json",
             "text_encoder_2": "sdxl_text_encoder_2_config.json", "tokenizer": None, "tokenizer_2": None,
             "scheduler": None}
    for comp, asset in comps.items():
        (root / comp).mkdir(parents=True, exist_ok=True)
        if asset:
            shutil.copy(ASSETS / asset, root / comp / "config.json")
    unet_class = "UNetMotionModel" if unet is None else "UNet2DConditionModel"
    index = {"_class_name": pipeline, "unet": ["diffusers", unet_class],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def sdxl_full_size(tmp_path_factory):
    """SDXL base 1.0 + the SDXL beta motion adapter: config files only, and the AnimateDiff folder they make."""
    root = tmp_path_factory.mktemp("full-xl")
    sd = _sdxl_config_folder(root / "stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "sdxl_unet_config.json")
    adapter = root / "animatediff-motion-adapter-sdxl-beta"
    adapter.mkdir()
    shutil.copy(ASSETS / "animatediff_motion_adapter_sdxl_beta_config.json", adapter / "config.json")
    ad = _sdxl_config_folder(root / "animatediff-sdxl", "AnimateDiffSDXLPipeline", None)
    unet, _ = backbone.empty_unet(sd, str(adapter))
    (ad / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
    return sd, adapter, ad


def test_sdxl_dry_run_counts_equal_what_peft_injects(sdxl_full_size, capsys):
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel
    from peft import LoraConfig, inject_adapter_in_model

    sd, adapter, ad = sdxl_full_size
    code = main(["train", "--dry-run", "--json", "--prompt", "x", "--recipe", "animatediff-sdxl", "--base", str(sd),
                 "--motion-adapter", str(adapter)])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    counts = {s["name"]: s["trainable_params"] for s in plan["stages"]}
    assert plan["family"] == "animatediff-sdxl" and plan["unet_params"] == 2_567_463_684 + 236_779_200
    assert counts["textual_inversion"] == 4 * (768 + 1280)  # four tokens in CLIP-L and in OpenCLIP-G
    assert api.plan(TrainConfig.of(prompt="x", base=str(ad)))["stages"] == plan["stages"]  # the AnimateDiff folder
    assert main(["train", "--dry-run", "--json", "--prompt", "x", "--recipe", "animatediff-sdxl"]) == 0  # hub ids:
    assert json.loads(capsys.readouterr().out)["stages"] == plan["stages"]  # their configs ship, no network needed

    with init_empty_weights():
        unet = UNetMotionModel.from_config(json.loads((ad / "unet" / "config.json").read_text()))
    names = [n for n, _ in unet.named_modules() if re.fullmatch(
        r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\."
        r"(to_q|to_k|to_v|to_out\.0)", n)]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=1.0, target_modules=names), unet, low_cpu_mem_usage=True)
    injected = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    # 15 motion modules (down 3×2, up 3×3, no mid) × 8 projections, 8·C parameters each at rank 4
    assert counts["t_lora"] == injected == 64 * 5 * (320 + 640 + 1280) == 716_800
    assert {s["name"]: s["modules"] for s in plan["stages"]}["t_lora"] == len(names) == 120


def test_sd15_motion_adapter_on_an_sdxl_image_model(xl_parts, sdxl_full_size, tiny_video, tmp_path, capsys):
    sd, _ = xl_parts
    sd15_adapter = make_tiny_motion_adapter(tmp_path / "tiny-adapter-sd15")  # the SD 1.5 tiny adapter's channels
    code, err = _run(capsys, "train", tiny_video, "--prompt", PROMPT, "--base", sd, "--motion-adapter", sd15_adapter,
                     "--out", tmp_path / "run", *TRAIN)
    _one_line_error(code, err, "channels", "sdxl-beta")
    assert not (tmp_path / "run").exists()
    full_sd, _, _ = sdxl_full_size  # the real configs: v1-5-2 on SDXL base 1.0, refused before any weight is read
    v152 = tmp_path / "animatediff-motion-adapter-v1-5-2"
    v152.mkdir()
    shutil.copy(ASSETS / "animatediff_motion_adapter_v1_5_2_config.json", v152 / "config.json")
    code, err = _run(capsys, "train", "--dry-run", "--prompt", "x", "--recipe", "animatediff-sdxl", "--base", full_sd,
                     "--motion-adapter", v152)
    _one_line_error(code, err, "[320, 640, 1280, 1280]", "[320, 640, 1280]")


def test_one_encoder_embedding_on_sdxl(xl_model, tiny_video, tmp_path, capsys):
    from safetensors.torch import save_file

    emb = tmp_path / "sd15_emb.safetensors"
    save_file({"<thing>": torch.randn(2, 16)}, str(emb))
    code, err = _run(capsys, "train", tiny_video, "--prompt", PROMPT, "--base", xl_model, "--ti-from", emb,
                     "--out", tmp_path / "run", *TRAIN)
    _one_line_error(code, err, "clip_l", "SDXL")


def test_sampling_starts_pass_the_sdxl_condition(xl_model, tiny_video):
    """The starts that run the UNet outside the pipeline (DDIM inversion, the denoising tail of an image start) hand
    it the pipeline's own prompt encoding in the packed form; the hook unpacks it."""
    from cav import sampling

    bb = backbone.load(xl_model, "cpu")
    ref = _video(tiny_video)[:4]
    prior = sampling.noise_prior_start(bb, ref, [0], steps=2, prior=0.5, invert=True)
    image = sampling.image_start(bb, ref[0], 4, [0], steps=2, strength=0.5, invert=True)
    for start in (prior, image):
        video = sampling.sample_video(bb, PROMPT, frames=4, size=(16, 16), steps=2, guidance=7.5, seed=0, start=start)
        assert video.shape == (4, 16, 16, 3)
    plain = sampling.sample_video(bb, PROMPT, frames=4, size=(16, 16), steps=2, guidance=7.5, seed=0)
    assert not np.array_equal(plain, video)


# ---------------------------------------------------------------------------------------------------- Wan
@pytest.fixture(scope="module")
def wan_model(built):
    return built("model", WAN)


@pytest.fixture(scope="module")
def wan_run(built):
    return built("run", WAN)


def test_wan_image_mode_is_each_frame_alone_and_the_frame_local_clip(wan_model):
    """Wan's image mode (frames folded into the batch) = each frame run as its own 1-frame video = the whole clip
    under a frame-local self-attention mask; it differs from video mode and leaves the model as it was."""
    from cav.wan.image_mode import frame_local

    unet = backbone.load(wan_model, "cpu").unet
    x, cond = _inputs(unet, frames=3)
    t = torch.tensor([500.0])
    with torch.no_grad():
        video = unet(x, t, encoder_hidden_states=cond).sample
        with WAN.image_mode(unet):
            folded = unet(x, t, encoder_hidden_states=cond).sample
        alone = torch.cat([unet(x[:, :, i:i + 1], t, encoder_hidden_states=cond).sample for i in range(3)], dim=2)
        with frame_local(unet, 3, 8, 8):
            masked = unet(x, t, encoder_hidden_states=cond).sample
        again = unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(folded, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, masked, atol=1e-5, rtol=1e-5)
    assert (folded - video).abs().max() > 1e-3
    assert torch.equal(video, again) and "forward" not in vars(unet)
    assert [n for n, _ in WAN.image_mode.modules(unet)] == ["blocks.0.attn1", "blocks.1.attn1"]


def test_wan_latents_clip_as_video_frames_alone(wan_model):
    """The motion stage sees the clip as Wan's VAE encodes a video ((F − 1)/4 + 1 latent frames), image mode each
    frame alone (read as a first frame: frame 0 alone = the clip's latent frame 0); both normalised as the pipeline
    expects; sampling's latent shape has the same frame count."""
    from cav.sampling import latent_shape
    from cav.wan.latents import encode_video

    bb = backbone.load(wan_model, "cpu")
    frames = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clip, alone = bb.encode_clip(frames), bb.encode_frames(frames)
    assert clip.shape == (1, 4, 2, 2, 2) and alone.shape == (5, 4, 2, 2)
    assert latent_shape(bb, 5, (16, 16)) == (1, 4, 2, 2, 2)
    torch.testing.assert_close(clip, encode_video(bb.vae, frames.permute(1, 0, 2, 3)[None]))
    torch.testing.assert_close(alone[0], clip[0, :, 0], atol=1e-5, rtol=1e-5)
    assert (alone[4] - clip[0, :, 1]).abs().max() > 1e-4  # a later frame alone is not its group's latent


def test_wan_condition_is_the_pipelines(wan_model):
    """cav's umT5 condition = ``WanPipeline.encode_prompt``'s (512 zero-padded slots); the unconditional branch =
    the empty prompt's, which the pipeline guides against without a negative prompt."""
    from diffusers import WanPipeline

    bb = backbone.load(wan_model, "cpu")
    pipe = WanPipeline.from_pretrained(str(wan_model))
    with torch.no_grad():
        theirs, negative = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, device="cpu",
                                              max_sequence_length=512)  # what WanPipeline.__call__ passes
    ours = bb.encode_prompt(PROMPT)
    assert ours.shape == (1, 512, 16) and torch.equal(ours, theirs)
    assert torch.equal(bb.condition.unconditional(bb), negative)
    assert ours[0, 7:].abs().sum() == 0 and ours[0, :6].abs().sum() > 0  # 6 tokens + </s>, then zeros


def test_wan_flow_objective_noises_and_targets_as_flow_matching(wan_model):
    """The objective's batch: x_σ = (1 − σ)·x₀ + σ·ε, target ε − x₀, timestep 1000·σ, with σ drawn as
    ``cav.wan.flow.FlowObjective`` draws it under the scheduler's shift (noise first, then σ, from one generator)."""
    from cav.wan.flow import FlowObjective

    bb = backbone.load(wan_model, "cpu")
    x0 = torch.randn(3, 4, 2, 2, 2)
    noisy, t, target = WAN.objective.noised(bb.scheduler, x0, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=gen)
    sigma = FlowObjective(shift=3.0).sample_sigmas(3, generator=gen)
    torch.testing.assert_close(t, 1000 * sigma)
    torch.testing.assert_close(noisy, (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * eps)
    torch.testing.assert_close(target, eps - x0)
    _, window, _ = WAN.objective.noised(bb.scheduler, x0, torch.Generator().manual_seed(7), (200, 400))
    assert ((window >= 200) & (window < 400)).all()


def test_wan_flow_inversion_is_euler_up_the_samplers_grid(wan_model):
    """`--invert` on Wan: the family objective's inverse walks ``cav.wan.flow.invert``'s Euler update up the
    sampler's own sigma grid, and ``upto`` steps stop on the sigma where the sampler's step ``steps − upto``
    starts (where `--image --strength` continues)."""
    from cav.sampling import ddim_invert
    from cav.wan import flow

    bb = backbone.load(wan_model, "cpu")
    z0 = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    empty = bb.condition.unconditional(bb)
    sampler = WAN.objective.sampler(bb.scheduler.config)
    sampler.set_timesteps(4)

    def velocity(x, t):
        return bb.unet(x, t, encoder_hidden_states=empty, return_dict=False)[0]

    with torch.no_grad():
        ours = ddim_invert(bb, z0, 4)
        theirs = flow.invert(velocity, z0, sampler.sigmas)
        part = ddim_invert(bb, z0, 4, upto=1)
        first = flow.invert(velocity, z0, sampler.sigmas[-2:])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part, first, atol=1e-5, rtol=1e-5)


def test_wan_generate_starts_and_select(wan_run, tmp_path, capsys):
    """`cav select RUN` scores the run's checkpoints as any run's (a random tiny Wan's samples are noise: no score
    can be measured, which it says in one line, exit 2, nothing published), then `cav generate` from the
    reference's inversion, its noise prior, and an image at a strength (forward-noised and inverted): each runs
    through the flow objective and changes the video."""
    import imageio.v3 as iio

    code, err = _run(capsys, "select", wan_run, "--clip", tmp_path / "no-clip")
    _one_line_error(code, err, "no score to select on", "motion_fidelity")
    assert not (wan_run / "selected").exists()
    still = np.zeros((16, 16, 3), dtype=np.uint8)
    still[4:12, 4:12] = (230, 40, 40)
    image = tmp_path / "still.png"
    iio.imwrite(image, still)
    plain = tmp_path / "plain.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(wan_run), "--out", str(plain), "--quiet"]) == 0
    outs = {}
    for name, extra in {"invert": ["--reference", str(wan_run), "--invert"],
                        "prior": ["--reference", str(wan_run), "--noise-prior", "0.5"],
                        "image": ["--image", str(image), "--strength", "0.5"],
                        "image-inv": ["--image", str(image), "--strength", "0.5", "--invert"]}.items():
        outs[name] = tmp_path / f"{name}.mp4"
        assert main(["generate", "--prompt", PROMPT, "--adapter", str(wan_run), *extra, "--out", str(outs[name]),
                     "--quiet"]) == 0, name
        assert not np.array_equal(_video(outs[name]), _video(plain)), name
    assert not np.array_equal(_video(outs["image"]), _video(outs["image-inv"]))


def test_wan_export_comfyui_reads_back_through_diffusers(wan_run, wan_model, tmp_path, capsys):
    """`cav export RUN --format comfyui`: Wan's original names (``diffusion_model.blocks.N.self_attn.{q,k,v,o}``)
    with one alpha per module; diffusers' own Wan converter reads it back to the T-LoRA's modules and update
    (B·A·alpha/r); stock ``WanPipeline.load_lora_weights`` on that file samples what cav samples with the run."""
    from diffusers import WanPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cav.sampling import fresh_noise, latent_shape

    target = tmp_path / "wan.safetensors"
    assert _run(capsys, "export", wan_run, "--format", "comfyui", "--out", target)[0] == 0
    exported = load_file(str(target))
    assert all(re.fullmatch(r"diffusion_model\.blocks\.[01]\.self_attn\.[qkvo]\.(lora_[AB]\.weight|alpha)", k)
               for k in exported) and len(exported) == 2 * 4 * 3
    with safe_open(str(target), "pt") as fh:
        assert fh.metadata()["cav_family"] == "wan"
    peft_state = load_file(str(wan_run / "t_lora" / lora.WEIGHTS))
    back = _convert_non_diffusers_wan_lora_to_diffusers(dict(exported))
    for key in (k for k in peft_state if ".lora_A." in k):
        module = key.split(".lora_A.")[0]
        ours = peft_state[key.replace("lora_A", "lora_B")] @ peft_state[key] * (1.0 / 4)
        theirs = back[f"transformer.{module}.lora_B.weight"] @ back[f"transformer.{module}.lora_A.weight"]
        torch.testing.assert_close(theirs, ours, atol=1e-7, rtol=1e-5)
    size, frames = WAN.tiny.size, WAN.tiny.frames
    bb = backbone.load(wan_model, "cpu")
    api.load_adapters(bb, [(str(wan_run), 1.0)])
    stock = WanPipeline.from_pretrained(str(wan_model))
    stock.load_lora_weights(str(target), adapter_name="motion")
    stock.set_adapters(["motion"], adapter_weights=[1.0])
    stock.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_frames=frames, height=size, width=size, num_inference_steps=2,
                latents=fresh_noise(latent_shape(bb, frames, (size, size)), [0]), output_type="latent")
    with torch.no_grad():
        ours, theirs = bb.pipeline()(**call).frames, stock(**call).frames
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    code, err = _run(capsys, "export", wan_run, "--format", "comfyui", "--out", target)
    assert code == 2 and "already exists" in err and "\n" not in err
    assert _run(capsys, "export", wan_run)[0] == 0  # without --format: the family's own layout, ComfyUI's
    default = load_file(str(wan_run / "export" / WAN.exports[0].filename))
    assert default.keys() == exported.keys() and all(torch.equal(default[k], exported[k]) for k in default)


def test_wan_bad_inputs_are_one_line(wan_model, tiny_video, tmp_path, run_cli):
    """A frame count Wan's VAE cannot take, a size the patch × VAE cannot tile, temporal convolutions a DiT lacks,
    --experts on a one-expert base: one line each, exit 2, before the run folder exists."""
    out = tmp_path / "run"
    base = ["train", tiny_video, "--prompt", PROMPT, "--base", wan_model, "--out", out, "--steps", "1",
            "--absorber-steps", "1", "--quiet"]
    for extra, words in ((["--frames", "4", "--size", "16"], ("--frames 4", "4k+1", "--frames 1 or 5")),
                         (["--frames", "5", "--size", "24"], ("24", "multiple of 16")),
                         (["--frames", "5", "--size", "16", "--placement", "motiondirector+tconv"],
                          ("temporal convolutions", "placement cav")),
                         (["--frames", "5", "--size", "16", "--experts", "low"],
                          ("--experts low", "two-expert base", "drop --experts"))):
        code, err = run_cli(base + extra)
        _one_line_error(code, err, *words)
        assert not out.exists()


def test_wan_several_clips_validation_inversion_and_weight_grid(wan_model, tiny_video, blue_video, tmp_path):
    """On Wan as on UNet3D: a run on two clips (each its own S-LoRA and spatial prompt) whose validation sample
    starts from the flow inversion of its reference, which `cav generate` makes again exactly; and a weight × seed
    grid."""
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", tiny_video, blue_video, "--prompt", PROMPT, "--spatial-prompt", "a red square",
                                  "--spatial-prompt", "a blue square", "--base", wan_model, "--out", out,
                                  "--validation-invert", *train_args(WAN)]]) == 0
    assert (out / "absorbers" / "s_lora").is_dir() and (out / "absorbers" / "clip-1" / "s_lora").is_dir()
    again = tmp_path / "again.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(out), "--invert", "--reference", str(out),
                 "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(_video(again), _video(out / "samples" / "sample-0.mp4"))
    grid = tmp_path / "grid.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(out), "--weights", "0,1", "--seeds", "0,1",
                 "--out", str(grid), "--quiet"]) == 0
    assert (tmp_path / "grid-sheet.png").is_file()
    assert not np.array_equal(_video(tmp_path / "grid-w1-s0.mp4"), _video(tmp_path / "grid-w1-s1.mp4"))


def test_toy_wan_names_the_shipped_toy_wan():
    """``--base toy-wan`` is the toy world's Wan shipped in the package (``src/cav/toy/wan_model``), a Wan base."""
    assert backbone.resolve_base("toy-wan") == str(backbone.TOY_MODELS["toy-wan"])
    assert backbone.family_of("toy-wan") is WAN


def test_wan_s_lora_from_diffusers_or_comfyui_layout(built, wan_model, wan_run, tiny_video, tmp_path, capsys):
    """`--s-lora-from` on Wan: a Wan image LoRA replaces stage 1 (the run's absorber is exactly the given one); the
    same LoRA in ComfyUI's layout acts the same (read by diffusers' own Wan loader); another family's is refused."""
    from safetensors.torch import load_file

    from cav.wan.formats import export_comfyui, save_diffusers

    given = wan_run / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", tiny_video, "--prompt", PROMPT, "--base", wan_model, "--out", out,
                                  "--s-lora-from", given, *train_args(WAN)]]) == 0
    assert {json.loads(x)["stage"] for x in (out / "log.jsonl").read_text().splitlines()} == {"t_lora"}
    a = load_file(str(wan_run / "absorbers" / "s_lora" / lora.WEIGHTS))
    b = load_file(str(out / "absorbers" / "s_lora" / lora.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src = backbone.load(wan_model, "cpu")  # the run's S-LoRA, made visible (two steps barely move it)
    WAN.image_lora(src.unet, given, "look", WAN)
    with torch.no_grad():
        for n, p in src.unet.named_parameters():
            if ".lora_B.look." in n:
                p.mul_(300)
    config = src.unet.peft_config["look"]
    files = [save_diffusers(src.unet, "look", config, tmp_path / "diffusers"),
             export_comfyui(src.unet, "look", config, tmp_path / "look_comfyui.safetensors")]
    x, cond = _inputs(src.unet, frames=1)
    t = torch.tensor([500.0])
    outputs = []
    for file in files:
        bb = backbone.load(wan_model, "cpu")
        with torch.no_grad():
            plain = bb.unet(x, t, encoder_hidden_states=cond).sample
        WAN.image_lora(bb.unet, file, "look", WAN)
        lora.activate(bb.unet, ["look"])
        with torch.no_grad():
            outputs.append(bb.unet(x, t, encoder_hidden_states=cond).sample)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)
    assert (outputs[0] - plain).abs().max() > 1e-3
    other = built("run", ANIMATEDIFF) / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS
    code, err = _run(capsys, "train", tiny_video, "--prompt", PROMPT, "--base", wan_model, "--out",
                     tmp_path / "bad", "--s-lora-from", other, *train_args(WAN))
    _one_line_error(code, err, "animatediff", "wan")


def test_select_on_a_toy_wan_run(tiny_video, tmp_path, capsys):
    """`cav select` on a run of the shipped toy Wan (its samples at 12 steps draw objects a tracker follows; at 4
    steps the base as of 10,665 steps draws none, and select refuses): it ranks the checkpoints by motion fidelity,
    says in `left_out` why the other scores are missing (no CLIP weights; the clip is not the toy world), and copies
    the chosen one to `selected/`; the run's own T-LoRA stays what `cav generate --adapter RUN` samples. (On run 3,
    a base whose samples held nothing to track, select refused in one line; that path is tested on UNet3D in
    tests/test_select_scores.py.)"""
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", tiny_video, "--prompt", PROMPT, "--base", "toy-wan", "--out", out,
                                  "--frames", "5", "--size", "32", "--steps", "4", "--absorber-steps", "1",
                                  "--sample-steps", "12", "--checkpoint-every", "2", "--quiet"]]) == 0
    code, err = _run(capsys, "select", out, "--clip", tmp_path / "no-clip")
    assert code == 0 and "Traceback" not in err, err
    selection = json.loads((out / "selection.json").read_text())
    assert selection["ranked_by"] == ["motion_fidelity"]
    assert [row["checkpoint"] for row in selection["table"]] == ["step-000002", "step-000004"]
    assert all(0.0 <= row["motion_fidelity"] <= 1.0 for row in selection["table"])
    assert any(line.startswith("text_alignment:") for line in selection["left_out"])
    assert any(line.startswith("toy_motion_error:") for line in selection["left_out"])
    assert selection["chosen"] in ("step-000002", "step-000004") and (out / "selected" / "t_lora").is_dir()
    gen = tmp_path / "gen.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(out), "--out", str(gen), "--quiet"]) == 0
    assert gen.is_file()
