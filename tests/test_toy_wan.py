"""The toy Wan trainer (cav.toy.wan_base) and its CLI (`cav toy train-base --family wan`, `cav toy check-base`):
end to end on a tiny config, exact resume, the stock pipeline opens it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cav.errors import CavError
from cav.cli import main as cli
from cav.toy.check import check_base
from cav.toy.wan_base import ToyWanSpec, WanRecipe, caption_words, train_wan_base

# Smallest shapes the layout allows: 2 VAE downsamplings (both temporal → 4× in time), 5 frames of 16 px.
SPEC = ToyWanSpec(heads=2, head_dim=12, layers=1, ffn_dim=16, text_dim=8, text_layers=1, text_heads=2, text_ff=16,
                  z_dim=4, vae_base_dim=4, vae_dim_mult=(1, 1, 1), temporal=4)
RECIPE = WanRecipe(frames=5, size=16, clips=40, vae_steps=2, vae_batch=1, steps=4, batch=2, warmup=2,
                   image_every=2, max_sequence_length=16, max_seconds=0, save_minutes=1e9)


def _weights(out):
    """Every trained tensor and the optimizer state of the transformer phase."""
    state = out / ".train_state"
    return {**load_file(str(state / "vae" / "modules.safetensors")),
            **{f"t.{k}": v for k, v in load_file(str(state / "transformer" / "modules.safetensors")).items()},
            **{f"o.{k}": v for k, v in load_file(str(state / "transformer" / "state.safetensors")).items()}}


def test_trains_end_to_end_and_stock_pipeline_generates(tmp_path):
    from diffusers import WanPipeline

    stats = train_wan_base(tmp_path / "run", RECIPE, SPEC, quiet=True)
    assert stats["transformer_step"] == 4 and stats["vae_step"] == 2
    assert [row["image"] for row in stats["log"]] == [False]  # step 1 logged; step 2 and 4 were image-mode batches
    assert np.isfinite(stats["vae_recon_mae"]) and np.isfinite(stats["vae_object_mae"])
    index = json.loads((tmp_path / "run" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    vae_config = json.loads((tmp_path / "run" / "vae" / "config.json").read_text())
    assert vae_config["latents_std"] != [1.0] * 4  # the measured latent statistics, not the placeholders
    tokenizer = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["padding"] is None and tokenizer["truncation"] is None  # not the last training call's

    pipe = WanPipeline.from_pretrained(tmp_path / "run")
    video = pipe("a red circle moving left on a navy background", num_frames=5, height=16, width=16,
                 num_inference_steps=2, guidance_scale=3.0, max_sequence_length=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()

    # check-base samples a Wan folder with the stock pipeline at its defaults (9 frames of 32 px, 512 text slots)
    check = check_base(str(tmp_path / "run"), n=2, heldout=1, steps=2, batch=2, quiet=True)
    assert check["videos"] == 2 and check["heldout_videos"] == 1 and check["base"] == str(tmp_path / "run")
    assert 0.0 <= check["colour_accuracy"] <= 1.0 and check["seen_motion_error"] >= 0


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    train_wan_base(tmp_path / "straight", RECIPE, SPEC, quiet=True)
    cut = tmp_path / "cut"
    train_wan_base(cut, replace(RECIPE, vae_steps=1, steps=0), SPEC, quiet=True)  # stopped inside the VAE phase
    train_wan_base(cut, replace(RECIPE, steps=2), SPEC, quiet=True)               # ... and inside the transformer's
    train_wan_base(cut, RECIPE, SPEC, quiet=True)
    a, b = _weights(tmp_path / "straight"), _weights(cut)
    assert a.keys() == b.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_a_resume_with_other_settings_and_bad_frames(tmp_path, capsys):
    train_wan_base(tmp_path / "run", replace(RECIPE, vae_steps=1, steps=0), SPEC, quiet=True)
    before = (tmp_path / "run" / ".train_state" / "run.json").read_text()
    with pytest.raises(CavError, match=r"^.* holds a run started with other settings \(lr\)"):
        train_wan_base(tmp_path / "run", replace(RECIPE, lr=1e-3), SPEC, quiet=True)
    assert (tmp_path / "run" / ".train_state" / "run.json").read_text() == before
    assert cli(["toy", "train-base", "--family", "wan", "--out", str(tmp_path / "other"), "--frames", "8"]) == 2
    assert "pass 4k+1 frames" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_tokenizer_knows_every_caption_word():
    from cav.toy.wan_base import build_components

    tok = build_components(SPEC)["tokenizer"]
    ids = tok(" ".join(caption_words())).input_ids
    assert 2 not in ids  # no <unk>


# the tiny SPEC as flags of `cav toy train-base --family wan`
SPEC_FLAGS = ["--heads", "2", "--head-dim", "12", "--layers", "1", "--ffn-dim", "16", "--text-dim", "8",
              "--text-layers", "1", "--text-heads", "2", "--text-ff", "16", "--z-dim", "4", "--vae-base-dim", "4"]


def test_cli_trains_the_toy_wan_and_checks_it(tmp_path, capsys):
    out = tmp_path / "wan"

    def train(steps, *extra):
        return cli(["toy", "train-base", "--family", "wan", "--out", str(out), "--quiet", "--frames", "5", "--size",
                    "16", "--clips", "40", "--vae-steps", "2", "--vae-batch", "1", "--steps", str(steps), "--batch",
                    "2", "--warmup", "2", "--max-sequence-length", "16", "--max-seconds", "0", *SPEC_FLAGS, *extra])

    def last_stats():
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert train(2) == 0
    stats = last_stats()
    assert stats["transformer_step"] == 2 and stats["vae_step"] == 2
    run = json.loads((out / ".train_state" / "run.json").read_text())
    assert run["recipe"]["frames"] == 5 and run["spec"]["layers"] == 1 and run["recipe"]["lr"] == WanRecipe().lr
    assert train(4) == 0 and last_stats()["transformer_step"] == 4  # a resume continues the same run
    assert train(2, "--restart") == 0 and last_stats()["transformer_step"] == 2  # --restart starts over

    assert cli(["toy", "check-base", "--base", str(out), "--videos", "1", "--heldout", "1", "--steps", "2",
                "--json", "--quiet"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["base"] == str(out) and check["videos"] == 1 and 0.0 <= check["shape_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--family", "wan", "--save-every", "5"], r"^cav: error: --save-every is a flag of the toy UNet, not of the "
                                               r"toy Wan: drop it or pass --family unet$"),
    (["--temporal", "1", "--flow-shift", "5"], r"^cav: error: --flow-shift is a flag of the toy Wan, not of the "
                                               r"toy UNet: drop it or pass --family wan$"),
    (["--family", "wan", "--device", "cuda"], r"^cav: error: --device cuda: the toy Wan's trainer runs on the CPU "
                                              r"only: pass --device cpu$"),
    (["--family", "wan", "--frames", "8"], r"^cav: error: --frames 8 does not fit a VAE with temporal compression "
                                           r"4: pass 4k\+1 frames \(e\.g\. 9\)$"),
    (["--family", "wan", "--vae-object-weight", "-1"], r"^cav: error: --vae-object-weight -1\.0 is negative: pass 0 "
                                                      r"\(no extra weight\) or more$"),
    (["--family", "wan", "--lr", "fast"], r"^cav: error: lr \(--lr\): 'fast' is not a number"),
])
def test_cli_refuses_bad_toy_wan_flags_in_one_line(tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "run"
    assert cli(["toy", "train-base", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(message, err), err
    assert not out.exists()


def test_check_base_names_a_missing_toy_wan(tmp_path, monkeypatch):
    from cav.toy import wan_base

    monkeypatch.setattr(wan_base, "TOY_WAN_DIR", tmp_path / "absent")
    with pytest.raises(CavError, match=r"^the toy Wan is missing from .*absent: train it with `cav toy train-base "
                                       r"--family wan --out DIR` and pass --base DIR$"):
        check_base("toy-wan", n=1, heldout=1)
    assert wan_base.toy_wan_folder("toy") is None and wan_base.toy_wan_folder(tmp_path) is None


def test_vae_init_starts_phase_one_from_another_folders_vae(tmp_path, capsys):
    from safetensors.torch import load_file as load

    train_wan_base(tmp_path / "a", replace(RECIPE, steps=0), SPEC, quiet=True)
    a = load(str(tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors"))
    # no VAE step: the VAE written is the init's, tensor for tensor (a random one differs)
    train_wan_base(tmp_path / "b", replace(RECIPE, vae_steps=0, steps=0, vae_init=str(tmp_path / "a")), SPEC,
                   quiet=True)
    b = load(str(tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors"))
    train_wan_base(tmp_path / "c", replace(RECIPE, vae_steps=0, steps=0), SPEC, quiet=True)
    c = load(str(tmp_path / "c" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # read at VAE step 0 only: a resume neither needs the folder nor reloads it
    tuned = replace(RECIPE, steps=0, vae_init=str(tmp_path / "c"))
    train_wan_base(tmp_path / "d", replace(tuned, vae_steps=1), SPEC, quiet=True)
    (tmp_path / "c" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    train_wan_base(tmp_path / "d", tuned, SPEC, quiet=True)
    assert json.loads((tmp_path / "d" / ".train_state" / "vae" / "state.json").read_text())["step"] == 2
    # an init used as it is (--vae-steps 0, then the transformer): its VAE is saved, a resume needs no folder either
    as_is = replace(RECIPE, vae_steps=0, vae_init=str(tmp_path / "a"))
    train_wan_base(tmp_path / "f", replace(as_is, steps=2), SPEC, quiet=True)
    train_wan_base(tmp_path / "g", replace(as_is, steps=4), SPEC, quiet=True)
    (tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    train_wan_base(tmp_path / "f", replace(as_is, steps=4), SPEC, quiet=True)
    assert _weights(tmp_path / "f").keys() == _weights(tmp_path / "g").keys()
    assert all(torch.equal(v, _weights(tmp_path / "g")[k]) for k, v in _weights(tmp_path / "f").items())
    # a folder without a VAE, or with one of other sizes: one line, nothing written
    with pytest.raises(CavError, match=r"^--vae-init .*absent: no VAE weights at .*: pass a toy Wan model or run "
                                       r"folder$"):
        train_wan_base(tmp_path / "e", replace(RECIPE, vae_init=str(tmp_path / "absent")), SPEC, quiet=True)
    with pytest.raises(CavError, match=r"^--vae-init .*b: its VAE has other sizes than this run's \(\d+ tensors "
                                       r"differ, e\.g\. .*\): pass the sizes it was trained with"):
        train_wan_base(tmp_path / "e", replace(RECIPE, vae_init=str(tmp_path / "b")), replace(SPEC, z_dim=2),
                       quiet=True)
    assert not (tmp_path / "e").exists()


def test_vae_init_grows_the_latent_channels_keeping_the_reconstructions(tmp_path):
    from diffusers import AutoencoderKLWan

    from cav.toy.wan_base import NEW_CHANNEL_LOGVAR, render_batch, training_specs
    from cav.wan.latents import encode_video

    train_wan_base(tmp_path / "small", replace(RECIPE, vae_steps=3, steps=0), SPEC, quiet=True)
    grown = replace(RECIPE, vae_steps=0, steps=0, vae_init=str(tmp_path / "small"))
    train_wan_base(tmp_path / "big", grown, replace(SPEC, z_dim=7), quiet=True)
    small, big = (AutoencoderKLWan.from_pretrained(tmp_path / name / "vae").eval() for name in ("small", "big"))
    assert (small.config.z_dim, big.config.z_dim) == (4, 7)
    x = render_batch(training_specs(RECIPE)[:3], RECIPE.frames, RECIPE.size)
    with torch.no_grad():
        post_s, post_b = small.encode(x).latent_dist, big.encode(x).latent_dist
        rec_s, rec_b = small.decode(post_s.mode()).sample, big.decode(post_b.mode()).sample
        # the decoder reads the new channels through zero columns: any value there changes nothing
        noisy = post_b.mode().clone()
        noisy[:, 4:] = torch.randn(noisy[:, 4:].shape, generator=torch.Generator().manual_seed(0))
        rec_noisy = big.decode(noisy).sample
    assert rec_b.shape == rec_s.shape and (rec_b - rec_s).abs().max() < 1e-5 and (rec_noisy - rec_s).abs().max() < 1e-5
    assert torch.allclose(post_b.mean[:, :4], post_s.mean, atol=1e-6) and not post_b.mean[:, 4:].any()
    assert torch.allclose(post_b.logvar[:, :4], post_s.logvar, atol=1e-6)
    assert torch.equal(post_b.logvar[:, 4:], torch.full_like(post_b.logvar[:, 4:], NEW_CHANNEL_LOGVAR))
    # the new channels are constant (mode 0): their std is floored, so the pipeline's normalisation stays finite
    std = big.config.latents_std
    assert std[:4] == pytest.approx(small.config.latents_std, rel=1e-4)
    assert std[4:] == pytest.approx([0.01 * max(std)] * 3) and min(std[:4]) > 0.01 * max(std)
    z = encode_video(big, x)
    assert torch.isfinite(z).all() and not z[:, 4:].any()


def test_latent_std_floor():
    from cav.toy.wan_base import latent_std_floor

    std = torch.tensor([2.0, 1e-9, 0.5, 0.0])
    assert latent_std_floor(std).tolist() == pytest.approx([2.0, 0.02, 0.5, 0.02])
    assert latent_std_floor(torch.zeros(3)).tolist() == pytest.approx([1e-6] * 3)
    kept = torch.tensor([1.3, 0.6, 2.4])
    assert torch.equal(latent_std_floor(kept), kept)


def test_latent_stats_floors_a_constant_channel():
    from cav.toy.wan_base import build_components, latent_stats, training_specs

    vae = build_components(SPEC)["vae"].eval()
    with torch.no_grad():  # mean channel 1 constant: its encoder row and bias 0, and quant_conv's row 1 too
        vae.encoder.conv_out.weight[1] = 0
        vae.encoder.conv_out.bias[1] = 0
        vae.quant_conv.weight[1] = 0
        vae.quant_conv.bias[1] = 0.3
    mean, std = latent_stats(vae, training_specs(RECIPE), RECIPE, clips=3)
    assert mean[1] == pytest.approx(0.3) and std[1] == pytest.approx(0.01 * max(std))
    assert all(s > 0.01 * max(std) for k, s in enumerate(std) if k != 1)


def test_cli_refuses_a_vae_init_it_cannot_grow_in_one_line(tmp_path, capsys):
    import re

    small = tmp_path / "small"
    train_wan_base(small, replace(RECIPE, vae_steps=1, steps=0), SPEC, quiet=True)
    capsys.readouterr()  # diffusers' save progress bars
    tiny = ["--frames", "5", "--size", "16", "--clips", "40", "--vae-batch", "1", "--steps", "0", "--heads", "2",
            "--head-dim", "12", "--layers", "1", "--ffn-dim", "16", "--text-dim", "8", "--text-layers", "1",
            "--text-heads", "2", "--text-ff", "16", "--max-sequence-length", "16"]
    for sizes in (["--z-dim", "2", "--vae-base-dim", "4"],   # fewer channels than the init's: not a growth
                  ["--z-dim", "8", "--vae-base-dim", "8"]):  # more channels, but other widths too
        out = tmp_path / "bad"
        code = cli(["toy", "train-base", "--family", "wan", "--out", str(out), "--vae-init", str(small), *tiny, *sizes])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert re.match(r"^cav: error: --vae-init .*small: its VAE has other sizes than this run's \(\d+ tensors "
                        r"differ, e\.g\. .*\): pass the sizes it was trained with \(its \.train_state/run\.json\)$",
                        err)
        assert not out.exists()


def test_dilated_object_weight_and_cosine_vae_lr():
    from cav.toy.wan_base import dilate_masks, vae_lr

    m = torch.zeros(1, 1, 2, 9, 9)
    m[0, 0, 0, 4, 4] = 1
    grown = dilate_masks(m, 2)
    assert grown[0, 0, 0].sum() == 25 and grown[0, 0, 0, 2:7, 2:7].all() and grown[0, 0, 1].sum() == 0
    assert torch.equal(dilate_masks(m, 0), m)
    cosine = replace(RECIPE, vae_steps=10, vae_lr=1e-3, vae_lr_schedule="cosine")
    assert vae_lr(cosine, 0) == 1e-3 and vae_lr(cosine, 5) == pytest.approx(5e-4) and vae_lr(cosine, 9) < 3e-5
    assert vae_lr(replace(cosine, vae_lr_schedule="constant"), 9) == 1e-3


def test_edge_loss_adds_the_error_of_pixel_differences():
    from cav.toy.wan_base import build_components, render_with_masks, training_specs, vae_loss

    vae = build_components(SPEC)["vae"]
    x, m = render_with_masks(training_specs(RECIPE)[:2], RECIPE.frames, RECIPE.size)

    def loss(**change):
        with torch.no_grad():
            return float(vae_loss(vae, x, m, replace(RECIPE, **change), torch.Generator().manual_seed(0)))

    plain, edge = loss(), loss(vae_edge_weight=1.0)
    assert edge > plain and loss(vae_edge_weight=2.0) - plain == pytest.approx(2 * (edge - plain), rel=1e-4)
    assert loss(vae_edge_weight=0.0) == plain


def test_resume_with_the_new_vae_options_is_exact_and_checked(tmp_path, monkeypatch):
    from cav.toy import wan_base

    recipe = replace(RECIPE, vae_steps=4, steps=2, vae_object_dilate=1, vae_lr_schedule="cosine")
    train_wan_base(tmp_path / "straight", recipe, SPEC, quiet=True)
    cut = tmp_path / "cut"
    calls = iter(range(10))  # the clock runs out after one VAE step (--vae-steps cannot cut a cosine run)
    with monkeypatch.context() as m:
        m.setattr(wan_base._Clock, "out_of_time", lambda self: next(calls) > 0)
        train_wan_base(cut, recipe, SPEC, quiet=True)
    assert json.loads((cut / ".train_state" / "vae" / "state.json").read_text())["step"] == 1
    train_wan_base(cut, recipe, SPEC, quiet=True)
    a, b = _weights(tmp_path / "straight"), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the cosine's length is --vae-steps: it may not change; nor may the dilation or the schedule
    for other, name in ((replace(recipe, vae_steps=5), "vae_steps"), (replace(recipe, vae_object_dilate=2),
                        "vae_object_dilate"), (replace(recipe, vae_lr_schedule="constant"), "vae_lr_schedule")):
        with pytest.raises(CavError, match=rf"holds a run started with other settings \({name}\)"):
            train_wan_base(cut, other, SPEC, quiet=True)


def test_a_run_saved_before_the_new_vae_options_resumes_with_their_defaults(tmp_path):
    out = tmp_path / "old"
    train_wan_base(out, replace(RECIPE, steps=2), SPEC, quiet=True)
    saved = out / ".train_state" / "run.json"
    run = json.loads(saved.read_text())
    for key in ("vae_object_dilate", "vae_edge_weight", "vae_lr_schedule", "vae_init"):
        del run["recipe"][key]
    saved.write_text(json.dumps(run))
    assert train_wan_base(out, RECIPE, SPEC, quiet=True)["transformer_step"] == 4
    with pytest.raises(CavError, match=r"other settings \(vae_object_dilate\)"):
        train_wan_base(out, replace(RECIPE, vae_object_dilate=2), SPEC, quiet=True)


@pytest.mark.parametrize("argv, message", [
    (["--vae-object-dilate", "-1"], r"^cav: error: --vae-object-dilate -1 is negative: pass 0 \(the exact mask\) or "
                                    r"more$"),
    (["--vae-edge-weight", "-0.5"], r"^cav: error: --vae-edge-weight -0\.5 is negative: pass 0 \(no edge loss\) or "
                                    r"more$"),
    (["--vae-lr-schedule", "linear"], r"^cav: error: .*'linear' is not one of constant, cosine"),
    (["--vae-init", "/nonexistent/run"], r"^cav: error: --vae-init /nonexistent/run: no VAE weights at "
                                         r"/nonexistent/run/vae/diffusion_pytorch_model\.safetensors: pass a toy Wan "
                                         r"model or run folder$"),
])
def test_cli_refuses_bad_vae_options_in_one_line(tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "run"
    assert cli(["toy", "train-base", "--family", "wan", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(message, err), err
    assert not out.exists()


def _model_tensors(folder):
    return {**{f"t.{k}": v for k, v in load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")).items()},
            **{f"e.{k}": v for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items()}}


def _trained_tensors(folder):
    """The trained (not averaged) transformer and text encoder weights in the run's resume state."""
    saved = load_file(str(folder / ".train_state" / "transformer" / "modules.safetensors"))
    return {k: v for k, v in saved.items() if k.startswith(("transformer.", "text_encoder."))}


def test_ema_writes_the_average_and_leaves_the_training_alone(tmp_path):
    """--ema: the folder holds the moving average of the trained weights (recomputed here from the weights after
    each step, read from runs cut at every step: resumes are exact), the training itself is the run without it, and
    a resume may turn it on (the average starts there)."""
    decay = 0.5
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    train_wan_base(plain, RECIPE, SPEC, quiet=True)
    stats = train_wan_base(averaged, replace(RECIPE, ema=decay), SPEC, quiet=True)
    assert stats["ema"] == decay and stats["ema_since"] == 0
    a, b = _trained_tensors(plain), _trained_tensors(averaged)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same training

    steps = tmp_path / "steps"  # the trained weights after steps 0..4 (a run resumed one step at a time)
    after = []
    for n in range(RECIPE.steps + 1):
        train_wan_base(steps, replace(RECIPE, steps=n), SPEC, quiet=True)
        after.append(_model_tensors(steps))
    expected = dict(after[0])
    for weights in after[1:]:
        expected = {k: torch.lerp(expected[k], weights[k], 1 - decay) for k in expected}
    model = _model_tensors(averaged)
    assert model.keys() == expected.keys()
    for k in model:
        torch.testing.assert_close(model[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(model[k], after[-1][k]) for k in model)  # not the last weights

    # turned on at a resume: starts from that step's weights, then averages on
    late = tmp_path / "late"
    train_wan_base(late, replace(RECIPE, steps=2), SPEC, quiet=True)
    stats = train_wan_base(late, replace(RECIPE, ema=decay), SPEC, quiet=True)
    assert stats["ema_since"] == 2
    late_expected = after[2]
    for weights in after[3:]:
        late_expected = {k: torch.lerp(late_expected[k], weights[k], 1 - decay) for k in late_expected}
    late_model = _model_tensors(late)
    for k in late_model:
        torch.testing.assert_close(late_model[k], late_expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ema_resume_is_exact(tmp_path):
    recipe = replace(RECIPE, ema=0.9)
    train_wan_base(tmp_path / "straight", recipe, SPEC, quiet=True)
    cut = tmp_path / "cut"
    train_wan_base(cut, replace(recipe, steps=1), SPEC, quiet=True)
    train_wan_base(cut, replace(recipe, steps=3), SPEC, quiet=True)
    train_wan_base(cut, recipe, SPEC, quiet=True)
    a, b = _model_tensors(tmp_path / "straight"), _model_tensors(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(str(cut / ".train_state" / "transformer" / "modules.safetensors"))
    assert any(k.startswith("ema.transformer.") for k in saved) and any(k.startswith("ema.text_encoder.") for k in saved)


def test_latent_mask_marks_the_cells_each_latent_frame_folds_in():
    from cav.toy.wan_base import latent_mask

    masks = torch.zeros(1, 1, 9, 32, 32)
    masks[0, 0, 0, 0:2, 0:2] = 1      # frame 0: latent frame 0, cell (0, 0)
    masks[0, 0, 6, 30:32, 5:6] = 1    # frame 6: in frames 5-8, latent frame 2, cell (7, 1)
    cells = latent_mask(masks, (3, 8, 8), image=False)
    assert cells.shape == (1, 1, 3, 8, 8) and cells.sum() == 2
    assert cells[0, 0, 0, 0, 0] == 1 and cells[0, 0, 2, 7, 1] == 1
    alone = latent_mask(masks, (9, 8, 8), image=True)  # image mode: every frame its own latent frame
    assert alone.shape == (1, 1, 9, 8, 8) and alone[0, 0, 6, 7, 1] == 1 and alone.sum() == 2


def test_weighted_flow_loss():
    from cav.wan.flow import FlowObjective

    objective = FlowObjective()
    pred, lat, noise = (torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(3))
    plain = objective.loss(pred, lat, noise)
    torch.testing.assert_close(objective.loss(pred, lat, noise, torch.ones(2, 1, 3, 4, 4)), plain)
    weights = torch.ones(2, 1, 3, 4, 4)
    weights[0, 0, 1, 2, 3] = 5.0
    error = (pred - (noise - lat)).square()
    expected = (error.sum() + 4 * error[0, :, 1, 2, 3].sum()) / (error.numel() + 4 * 4)
    torch.testing.assert_close(objective.loss(pred, lat, noise, weights), expected)


def test_object_weight_and_init_start_a_run_from_another(tmp_path, capsys):
    """--object-weight trains on the weighted loss (another trajectory, the same draws); --init starts phase 2 from
    another folder's transformer and text encoder (a fine-tune), checked like --vae-init."""
    source = tmp_path / "source"
    train_wan_base(source, RECIPE, SPEC, quiet=True)
    weighted = tmp_path / "weighted"
    stats = train_wan_base(weighted, replace(RECIPE, object_weight=4.0), SPEC, quiet=True)
    assert stats["transformer_step"] == 4
    a, b = _trained_tensors(source), _trained_tensors(weighted)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    tuned = tmp_path / "tuned"  # no VAE step, the source's VAE; phase 2 from its weights, 0 steps: the same model
    train_wan_base(tuned, replace(RECIPE, vae_init=str(source), vae_steps=0, init=str(source), steps=0), SPEC,
                   quiet=True)
    src_model, new_model = _model_tensors(source), _model_tensors(tuned)
    assert src_model.keys() == new_model.keys() and all(torch.equal(src_model[k], new_model[k]) for k in src_model)
    train_wan_base(tuned, replace(RECIPE, vae_init=str(source), vae_steps=0, init=str(source), steps=2), SPEC,
                   quiet=True)  # trains on from there
    assert json.loads((tuned / ".train_state" / "transformer" / "state.json").read_text())["step"] == 2

    with pytest.raises(CavError, match=rf"^--init {source}: its transformer has other sizes than this run's "
                                       r"\(\d+ tensors differ, e\.g\. .*\): pass the sizes it was trained with"):
        train_wan_base(tmp_path / "bad", replace(RECIPE, vae_init=str(source), vae_steps=0, init=str(source)),
                       replace(SPEC, ffn_dim=32), quiet=True)
    with pytest.raises(CavError, match=r"^--init /nonexistent: no transformer weights at "):
        train_wan_base(tmp_path / "bad2", replace(RECIPE, vae_init=str(source), vae_steps=0, init="/nonexistent"),
                       SPEC, quiet=True)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()  # refused before writing
