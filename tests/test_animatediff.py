"""AnimateDiff bases: a tiny UNetMotionModel (diffusers' own test scale) with a tiny CLIP text encoder and VAE,
saved in the AnimateDiff diffusers layout and loaded by path; or a tiny SD image model plus a motion adapter."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import config_folder
import torch

from cav import api, backbone
from cav.adapters import lora, motion_lora
from cav.api import ASSETS
from cav.families import ANIMATEDIFF
from cav.cli import main
from cav.config import TrainConfig
from cav.data.video import read_video
from cav.toy.factory import (TinyAnimateDiffSpec, build_image_unet, build_motion_adapter, make_tiny_animatediff,
                             make_tiny_image_model, make_tiny_motion_adapter)

PROMPT = "a red square moving right"
TRAIN = ["--frames", "4", "--size", "16", "--steps", "2", "--absorber-steps", "2", "--sample-steps", "2",
         "--ti-tokens", "2", "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _video(path):
    return read_video(path, frames=None, size=(16, 16))


@pytest.fixture(scope="module")
def ad_model(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("ad") / "tiny-animatediff")


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return make_tiny_image_model(root / "tiny-sd"), make_tiny_motion_adapter(root / "tiny-motion-adapter")


@pytest.fixture(scope="module")
def run_dir(ad_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ad-run"
    assert main(["train", str(tiny_video), "--prompt", PROMPT, "--base", str(ad_model), "--out", str(out), *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def unet3d_run(tiny_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "unet3d-run"
    assert main(["train", str(tiny_video), "--prompt", PROMPT, "--base", str(tiny_model), "--out", str(out),
                 "--frames", "4", "--size", "32", "--steps", "1", "--absorber-steps", "1", "--absorbers", "s-lora",
                 "--sample-steps", "1", "--quiet"]) == 0
    return out


# ------------------------------------------------------------------------------------------ family layer
def test_family_detection(ad_model, sd_parts, tiny_model):
    sd, adapter = sd_parts
    assert backbone.family_of(ad_model).name == "animatediff"
    assert backbone.family_of(sd, str(adapter)).name == "animatediff"
    assert backbone.family_of(tiny_model).name == "unet3d"


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


# ------------------------------------------------------------------------------------------ end to end
def test_train_then_generate_reproduces_the_checkpoint_sample(run_dir, tmp_path):
    for rel in ("t_lora/adapter_model.safetensors", "t_lora/pytorch_lora_weights.safetensors",
                "absorbers/s_lora/pytorch_lora_weights.safetensors", "absorbers/textual_inversion.safetensors",
                "checkpoints/step-000002/samples/sample-0.mp4", "samples/contact_sheet.png"):
        assert (run_dir / rel).is_file(), rel
    meta = json.loads((run_dir / "t_lora" / "cav.json").read_text())
    assert meta["family"] == "animatediff" and meta["kind"] == "temporal"
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines) and len(lines) == 4
    out = tmp_path / "gen.mp4"
    ckpt = run_dir / "checkpoints" / "step-000001"
    assert main(["generate", "--prompt", PROMPT.replace("<cav>", "object"), "--adapter", str(ckpt),
                 "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(_video(out), _video(ckpt / "samples" / "sample-0.mp4"))
    composed = tmp_path / "composed.mp4"  # two T-LoRAs, the S-LoRA as an image LoRA and the TI tokens together
    assert main(["generate", "--prompt", "a <cav> moving right", "--adapter", f"{run_dir}:0.7", "--adapter",
                 f"{ckpt}:0.3", "--image-lora", str(run_dir), "--textual-inversion",
                 str(run_dir / "absorbers" / "textual_inversion.safetensors"), "--out", str(composed), "--quiet"]) == 0
    assert not np.array_equal(_video(composed), _video(out))


def test_resume_ends_with_the_same_t_lora(run_dir, tiny_video, tmp_path):
    from safetensors.torch import load_file

    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    for rel in ("checkpoints/step-000002", "t_lora", "samples"):
        shutil.rmtree(copy / rel)
    assert main(["train", str(tiny_video), "--resume", "--out", str(copy), "--quiet"]) == 0
    a = load_file(str(run_dir / "t_lora" / lora.WEIGHTS))
    b = load_file(str(copy / "t_lora" / lora.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_model_plus_motion_adapter(sd_parts, tiny_video, tmp_path):
    sd, adapter = sd_parts
    out = tmp_path / "run"
    assert main(["train", str(tiny_video), "--prompt", PROMPT, "--base", str(sd), "--motion-adapter", str(adapter),
                 "--out", str(out), "--absorbers", "none", *TRAIN]) == 0
    meta = json.loads((out / "t_lora" / "cav.json").read_text())
    assert meta["family"] == "animatediff" and meta["motion_adapter"] == str(adapter)
    gen = tmp_path / "gen.mp4"  # the adapter's own base (image model + motion adapter) comes from its metadata
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(out), "--out", str(gen), "--quiet"]) == 0
    assert np.array_equal(_video(gen), _video(out / "samples" / "sample-0.mp4"))


# ------------------------------------------------------------------------------------------ other tools
def test_stock_diffusers_loads_t_lora_and_s_lora(run_dir, ad_model):
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(str(ad_model))  # no cav code from here on
    pipe.load_lora_weights(str(run_dir / "t_lora"), adapter_name="motion")
    pipe.load_lora_weights(str(run_dir / "absorbers" / "s_lora"), adapter_name="look")
    pipe.set_adapters(["motion", "look"], adapter_weights=[1.0, 1.0])

    bb = backbone.load(ad_model, "cpu")
    api.load_adapters(bb, [(str(run_dir), 1.0)], [(str(run_dir), 1.0)])
    x, t, cond = torch.randn(1, 4, 4, 8, 8), torch.tensor([400]), torch.randn(1, 24, 32)
    with torch.no_grad():
        ours = bb.unet(x, t, encoder_hidden_states=cond).sample
        stock = pipe.unet(x, t, encoder_hidden_states=cond.repeat_interleave(4, dim=0)).sample
        pipe.set_adapters(["motion", "look"], adapter_weights=[0.0, 0.0])
        stock_off = pipe.unet(x, t, encoder_hidden_states=cond.repeat_interleave(4, dim=0)).sample
    assert torch.allclose(ours, stock, atol=1e-6)
    assert (stock - stock_off).abs().max() > 1e-6  # the adapters change the output


def test_export_animatediff_round_trip_and_original_merge(run_dir, ad_model, tmp_path, capsys):
    from safetensors.torch import load_file

    target = tmp_path / "motion_lora.safetensors"
    assert _run(capsys, "export", run_dir, "--format", "animatediff", "--out", target)[0] == 0
    exported = load_file(str(target))
    peft_state = load_file(str(run_dir / "t_lora" / lora.WEIGHTS))
    assert len(exported) == len(peft_state)
    assert all(re.fullmatch(r"(down_blocks\.\d|up_blocks\.\d|mid_block)\.motion_modules\.\d\.temporal_transformer\."
                            r"transformer_blocks\.0\.attention_blocks\.[01]\.processor\.to_(q|k|v|out)_lora\."
                            r"(down|up)\.weight", k) for k in exported)
    back = motion_lora.from_animatediff(exported, rank=4, alpha=1.0)
    assert back.keys() == peft_state.keys()
    for k, v in peft_state.items():
        assert torch.allclose(back[k], v, rtol=1e-6, atol=0), k

    # The original loader's rule: W += alpha · up @ down on each projection (alpha 1) = the T-LoRA at weight 1.
    merged = backbone.load(ad_model, "cpu")
    modules = dict(merged.unet.named_modules())
    with torch.no_grad():
        for key, down in exported.items():
            if ".down." in key:
                modules[motion_lora.diffusers_module(key)].weight += exported[key.replace(".down.", ".up.")] @ down
    ours = backbone.load(ad_model, "cpu")
    api.load_adapters(ours, [(str(run_dir), 1.0)])
    x, t, cond = torch.randn(1, 4, 4, 8, 8), torch.tensor([300]), torch.randn(1, 24, 32)
    with torch.no_grad():
        assert torch.allclose(merged.unet(x, t, encoder_hidden_states=cond).sample,
                              ours.unet(x, t, encoder_hidden_states=cond).sample, atol=1e-5)
    code, err = _run(capsys, "export", run_dir, "--out", target)
    assert code == 2 and "already exists" in err and "\n" not in err


# ------------------------------------------------------------------------------------------ dry run
@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
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


def test_dry_run_counts_equal_what_peft_injects(full_size, capsys):
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel
    from peft import LoraConfig, inject_adapter_in_model

    sd, adapter, ad = full_size
    code = main(["train", "--dry-run", "--json", "--prompt", "x", "--base", str(sd), "--motion-adapter", str(adapter)])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    counts = {s["name"]: s["trainable_params"] for s in plan["stages"]}
    assert plan["family"] == "animatediff" and plan["unet_params"] > 1_000_000_000  # SD 1.5 UNet + motion modules
    assert counts["textual_inversion"] == 4 * 768  # four CLIP-L token embeddings
    assert api.plan(TrainConfig(prompt="x", base=str(ad)))["stages"] == plan["stages"]

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


# ------------------------------------------------------------------------------------------ bad inputs
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


def test_adapters_of_another_family_are_refused(unet3d_run, ad_model, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--base", ad_model, "--adapter", unet3d_run, "--out", out)
    assert code == 2 and "unet3d" in err and "animatediff" in err and "\n" not in err
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--base", ad_model, "--image-lora", unet3d_run,
                     "--out", out)
    assert code == 2 and "unet3d" in err and "\n" not in err
    code, err = _run(capsys, "export", unet3d_run, "--format", "animatediff")
    assert code == 2 and "unet3d" in err and "\n" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ given absorbers
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
    plan = api.plan(TrainConfig(prompt="x", base=str(sd), motion_adapter=str(adapter), s_lora_from=str(file)))
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
