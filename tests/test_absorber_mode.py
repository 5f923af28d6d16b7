"""``--absorber-mode image|video``: the absorbers trained in the paper's image mode (unordered patch-cropped frames,
each alone, temporal layers bypassed / Wan's attention frame-local) or, as the ablation's control, on whole clips
(in order, one crop window per clip, temporal layers and full attention on). ``image`` is the behaviour from before
the option existed; ``video`` changes both the batch and the model's mode; bad values and a video mode without
absorbers to train are one-line errors; the mode is recorded in the run's config.yaml."""

import pytest
import torch

from cav import backbone
from cav.config import TrainConfig, load_recipe
from cav.data.frames import random_patch_crop
from cav.families import WAN
from cav.stages import S_LORA, absorber_stage, encode_frames
from cav.trainer import run_stage
from cav.wan.tiny import make_tiny_wan


def _frames(n, size):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def _s_lora_after(bb, cfg, frames):
    torch.manual_seed(0)  # the S-LoRA's initialisation
    stage = absorber_stage(bb, cfg, frames, None)
    run_stage(bb.unet, bb.scheduler, stage, torch.Generator().manual_seed(0), lambda _: None, quiet=True)
    return {n: p.detach().clone() for n, p in bb.unet.named_parameters() if f".{S_LORA}." in n}


@pytest.mark.parametrize("family", ["unet3d", "wan"])
def test_image_mode_is_the_old_batch_and_video_mode_trains_something_else(family, tiny_model, wan_model):
    base = tiny_model if family == "unet3d" else wan_model
    frames_n = 4 if family == "unet3d" else WAN.tiny.frames
    size = 32 if family == "unet3d" else WAN.tiny.size
    frames = _frames(frames_n, size)
    kw = dict(prompt="a red square moving right", spatial_prompt=["a red square"], absorbers="s-lora",
              frames=frames_n, size=[size, size], absorber_steps=3, absorber_batch=2, s_lora_lr=1e-2)
    image_cfg, video_cfg = TrainConfig.of(**kw), TrainConfig.of(**kw, absorber_mode="video")
    assert TrainConfig.of(**kw).absorbers.mode == "image"  # the default

    bb = backbone.load(str(base), "cpu")
    image = absorber_stage(bb, image_cfg, frames, None)
    # image mode: exactly the batch the absorbers drew before the option existed (same draws, same crops, same latents)
    got, cond = image.batch(torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, frames.shape[0], (2,), generator=g)
    want = encode_frames(bb, random_patch_crop(frames[idx], g, (0.33, 0.67))).unsqueeze(2)
    assert torch.equal(got, want) and cond.shape[0] == 2
    assert image.image_mode is bb.family.image_mode
    video = absorber_stage(bb, video_cfg, frames, None, s_lora="s_lora_1")
    latents, cond = video.batch(torch.Generator().manual_seed(7))
    assert latents.shape == bb.encode_clip(frames).shape and cond.shape[0] == 1  # one whole clip
    assert video.image_mode is None  # temporal layers / full attention on

    bb = backbone.load(str(base), "cpu")
    a = _s_lora_after(bb, image_cfg, frames)
    bb = backbone.load(str(base), "cpu")
    a_again = _s_lora_after(bb, image_cfg, frames)
    bb = backbone.load(str(base), "cpu")
    b = _s_lora_after(bb, video_cfg, frames)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], a_again[k]) for k in a)  # deterministic, so the difference below is the mode's
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_bad_values_and_video_mode_without_absorbers_are_one_line_errors(tiny_model, tiny_video, tmp_path, run_cli):
    out = tmp_path / "run"
    base = ["train", tiny_video, "--prompt", "a red square moving right", "--base", tiny_model, "--out", out,
            "--steps", "1", "--quiet"]
    for extra, words in ((["--absorber-mode", "frames"], ("absorber-mode", "image", "video")),
                         (["--absorber-mode", "video", "--absorbers", "none"],
                          ("--absorber-mode video", "--absorbers none", "drop --absorber-mode"))):
        code, err = run_cli(base + extra)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), err
        assert not out.exists()


def test_video_mode_is_recorded_in_the_run(tiny_model, tiny_video, tmp_path, run_cli):
    out = tmp_path / "run"
    code, err = run_cli(["train", tiny_video, "--prompt", "a red square moving right", "--base", tiny_model,
                         "--out", out, "--frames", "4", "--size", "32", "--steps", "1", "--absorber-steps", "1",
                         "--absorbers", "s-lora", "--absorber-mode", "video", "--sample-steps", "1", "--quiet"])
    assert code == 0, err
    assert load_recipe(out / "config.yaml")["absorber_mode"] == "video"
