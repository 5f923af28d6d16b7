"""SDXL AnimateDiff bases: a tiny SDXL image UNet (``addition_embed_type`` "text_time", SDXL's three levels), two tiny
CLIP text encoders (the second with a projection) and a tiny motion adapter without mid block, saved in the
``AnimateDiffSDXLPipeline`` / ``StableDiffusionXLPipeline`` layouts and loaded by path."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from cav import api, backbone
from cav.adapters import lora, motion_lora
from cav.adapters.textual_inversion import TextualInversion
from cav.api import ASSETS
from cav.families import ANIMATEDIFF_SDXL
from cav.cli import main
from cav.config import TrainConfig
from cav.conditioning import pack
from cav.stages import encode_prompt
from cav.toy.factory import (TinySdxlSpec, build_motion_adapter, build_sdxl_unet, make_tiny_motion_adapter,
                             make_tiny_sdxl_animatediff, make_tiny_sdxl_image_model, make_tiny_sdxl_motion_adapter)

from test_animatediff import PROMPT, TRAIN, _run, _video  # the SD 1.5 tests' schedule and helpers


def _one_line_error(code, err, *words):
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    return make_tiny_sdxl_animatediff(tmp_path_factory.mktemp("adxl") / "tiny-animatediff-sdxl")


@pytest.fixture(scope="module")
def xl_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return make_tiny_sdxl_image_model(root / "tiny-sdxl"), make_tiny_sdxl_motion_adapter(root / "tiny-adapter-xl")


@pytest.fixture(scope="module")
def run_dir(xl_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "xl-run"
    assert main(["train", str(tiny_video), "--prompt", PROMPT, "--base", str(xl_model), "--out", str(out), *TRAIN]) == 0
    return out


# ------------------------------------------------------------------------------------------ family layer
def test_family_and_text_condition(xl_model, xl_parts):
    """Both forms are the SDXL family; training's condition is the pipeline's own prompt encoding (hidden states of
    both encoders + the pooled embedding), packed, and the UNet hook hands it over as the pipeline does."""
    sd, adapter = xl_parts
    assert backbone.family_of(xl_model).name == "animatediff-sdxl"
    assert backbone.family_of(sd, str(adapter)).name == "animatediff-sdxl"
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
    cfg = TrainConfig(prompt=PROMPT, frames=4, size=[16, 16], absorbers="none", t_lora_prompt_dropout=0.5,
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
    assert len(ANIMATEDIFF_SDXL.image_mode.modules(motion)) == 3 * 1 + 3 * 2  # down: 1 per layer, up: layers + 1, no mid block


# ------------------------------------------------------------------------------------------ end to end
def test_train_then_generate_reproduces_the_checkpoint_sample(run_dir, tmp_path):
    meta = json.loads((run_dir / "t_lora" / "cav.json").read_text())
    assert meta["family"] == "animatediff-sdxl" and meta["kind"] == "temporal"
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines) and len(lines) == 4
    out = tmp_path / "gen.mp4"
    ckpt = run_dir / "checkpoints" / "step-000001"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(ckpt), "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(_video(out), _video(ckpt / "samples" / "sample-0.mp4"))
    composed = tmp_path / "composed.mp4"  # two T-LoRAs, the S-LoRA as an image LoRA and the TI tokens together
    assert main(["generate", "--prompt", "a <cav> moving right", "--adapter", f"{run_dir}:0.7", "--adapter",
                 f"{ckpt}:0.3", "--image-lora", str(run_dir), "--textual-inversion",
                 str(run_dir / "absorbers" / "textual_inversion.safetensors"), "--out", str(composed), "--quiet"]) == 0
    assert not np.array_equal(_video(composed), _video(out))


def test_textual_inversion_goes_into_both_encoders(run_dir, xl_model):
    from safetensors import safe_open

    file = run_dir / "absorbers" / "textual_inversion.safetensors"
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


def test_image_model_plus_motion_adapter_and_given_absorbers(xl_parts, run_dir, tiny_video, tmp_path):
    """An SDXL image model + motion adapter; an SDXL embedding (clip_l + clip_g) given with --ti-from and an SDXL
    image LoRA with --s-lora-from skip stage 1 and are kept unchanged (the TI in both encoders)."""
    from safetensors.torch import load_file, save_file

    sd, adapter = xl_parts
    given = {"clip_l": torch.randn(3, 16), "clip_g": torch.randn(3, 16)}
    emb = tmp_path / "subject_xl.safetensors"
    save_file(given, str(emb))
    out = tmp_path / "run"
    assert main(["train", str(tiny_video), "--prompt", "a <cav> moving right", "--base", str(sd), "--motion-adapter",
                 str(adapter), "--ti-from", str(emb), "--s-lora-from", str(run_dir / "absorbers" / "s_lora"),
                 "--out", str(out), *TRAIN]) == 0
    meta = json.loads((out / "t_lora" / "cav.json").read_text())
    assert meta["family"] == "animatediff-sdxl" and meta["motion_adapter"] == str(adapter)
    assert not any(json.loads(x)["stage"] == "absorbers" for x in (out / "log.jsonl").read_text().splitlines())
    saved = load_file(str(out / "absorbers" / "textual_inversion.safetensors"))
    assert saved.keys() == given.keys() and all(torch.equal(saved[k], given[k]) for k in given)
    lora_in = load_file(str(run_dir / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS))
    lora_out = load_file(str(out / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS))
    assert lora_in.keys() == lora_out.keys() and all(torch.equal(lora_in[k], lora_out[k]) for k in lora_in)
    gen = tmp_path / "gen.mp4"  # base + motion adapter from the adapter's metadata; the validation prompt
    assert main(["generate", "--prompt", "a object moving right", "--adapter", str(out), "--out", str(gen),
                 "--quiet"]) == 0
    assert np.array_equal(_video(gen), _video(out / "samples" / "sample-0.mp4"))


# ------------------------------------------------------------------------------------------ other tools
def test_stock_diffusers_loads_t_lora_and_s_lora(run_dir, xl_model):
    from diffusers import AnimateDiffSDXLPipeline

    # no cav code from here on (the folder's unet/ already holds the motion modules: no adapter to pass)
    pipe = AnimateDiffSDXLPipeline.from_pretrained(str(xl_model), motion_adapter=None)
    pipe.load_lora_weights(str(run_dir / "t_lora"), adapter_name="motion")
    pipe.load_lora_weights(str(run_dir / "absorbers" / "s_lora"), adapter_name="look")
    pipe.set_adapters(["motion", "look"], adapter_weights=[1.0, 1.0])
    hidden, _, pooled, _ = pipe.encode_prompt(prompt=[PROMPT], device="cpu", num_videos_per_prompt=1,
                                              do_classifier_free_guidance=False)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}

    bb = backbone.load(xl_model, "cpu")
    api.load_adapters(bb, [(str(run_dir), 1.0)], [(str(run_dir), 1.0)])
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        ours = bb.unet(x, t, encoder_hidden_states=encode_prompt(bb, PROMPT)).sample
        per_frame = hidden.repeat_interleave(4, dim=0)
        stock = pipe.unet(x, t, encoder_hidden_states=per_frame, added_cond_kwargs=added).sample
        pipe.set_adapters(["motion", "look"], adapter_weights=[0.0, 0.0])
        off = pipe.unet(x, t, encoder_hidden_states=per_frame, added_cond_kwargs=added).sample
    assert torch.allclose(ours, stock, atol=1e-6)
    assert (stock - off).abs().max() > 1e-6


def test_export_animatediff_round_trip(run_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    target = tmp_path / "motion_lora_xl.safetensors"
    assert _run(capsys, "export", run_dir, "--format", "animatediff", "--out", target)[0] == 0
    exported = load_file(str(target))
    peft_state = load_file(str(run_dir / "t_lora" / lora.WEIGHTS))
    assert all(re.fullmatch(r"(down|up)_blocks\.\d\.motion_modules\.\d\.temporal_transformer\.transformer_blocks\.0\."
                            r"attention_blocks\.[01]\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight", k)
               for k in exported) and len(exported) == len(peft_state)
    back = motion_lora.from_animatediff(exported, rank=4, alpha=1.0)
    assert back.keys() == peft_state.keys() and all(torch.allclose(back[k], v, rtol=1e-6, atol=0)
                                                    for k, v in peft_state.items())
    with safe_open(str(target), "pt") as fh:
        assert fh.metadata()["cav_family"] == "animatediff-sdxl"


# ------------------------------------------------------------------------------------------ dry run
def _config_folder(root, pipeline: str, unet: str | None):
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
def full_size(tmp_path_factory):
    """SDXL base 1.0 + the SDXL beta motion adapter: config files only, and the AnimateDiff folder they make."""
    root = tmp_path_factory.mktemp("full-xl")
    sd = _config_folder(root / "stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "sdxl_unet_config.json")
    adapter = root / "animatediff-motion-adapter-sdxl-beta"
    adapter.mkdir()
    shutil.copy(ASSETS / "animatediff_motion_adapter_sdxl_beta_config.json", adapter / "config.json")
    ad = _config_folder(root / "animatediff-sdxl", "AnimateDiffSDXLPipeline", None)
    unet, _ = backbone.empty_unet(sd, str(adapter))
    (ad / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
    return sd, adapter, ad


def test_dry_run_counts_equal_what_peft_injects(full_size, capsys):
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel
    from peft import LoraConfig, inject_adapter_in_model

    sd, adapter, ad = full_size
    code = main(["train", "--dry-run", "--json", "--prompt", "x", "--recipe", "animatediff-sdxl", "--base", str(sd),
                 "--motion-adapter", str(adapter)])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    counts = {s["name"]: s["trainable_params"] for s in plan["stages"]}
    assert plan["family"] == "animatediff-sdxl" and plan["unet_params"] == 2_567_463_684 + 236_779_200
    assert counts["textual_inversion"] == 4 * (768 + 1280)  # four tokens in CLIP-L and in OpenCLIP-G
    assert api.plan(TrainConfig(prompt="x", base=str(ad)))["stages"] == plan["stages"]  # the AnimateDiff folder
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


# ------------------------------------------------------------------------------------------ bad inputs
def test_sd15_motion_adapter_on_an_sdxl_image_model(xl_parts, full_size, tiny_video, tmp_path, capsys):
    sd, _ = xl_parts
    sd15_adapter = make_tiny_motion_adapter(tmp_path / "tiny-adapter-sd15")  # the SD 1.5 tiny adapter's channels
    code, err = _run(capsys, "train", tiny_video, "--prompt", PROMPT, "--base", sd, "--motion-adapter", sd15_adapter,
                     "--out", tmp_path / "run", *TRAIN)
    _one_line_error(code, err, "channels", "sdxl-beta")
    assert not (tmp_path / "run").exists()
    full_sd, _, _ = full_size  # the real configs: v1-5-2 on SDXL base 1.0, refused before any weight is read
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
