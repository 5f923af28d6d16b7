"""Where sampling starts (cav.sampling): noise prior, DDIM inversion, an image; and `cav generate`'s options for them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cav import backbone
from cav.cli import main
from cav.data import toyworld as tw
from cav.sampling import Start, encode_clip, image_start, noise_prior_start, sample_video


def _gen(model, out, *extra):
    return [str(a) for a in ["generate", "--prompt", "a red square", "--base", model, "--frames", "3", "--size", "32",
            "--steps", "2", "--out", out, "--quiet", *extra]]


def test_noise_prior_zero_is_plain_sampling_bit_for_bit(tiny_model):
    bb = backbone.load(str(tiny_model), "cpu", "fp32")
    clip = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    kw = dict(frames=3, size=(32, 32), steps=2, guidance=3.0, seed=5)
    plain = sample_video(bb, "a red square", **kw)
    start = noise_prior_start(bb, clip, [5], steps=2, prior=0.0, invert=True)
    assert np.array_equal(sample_video(bb, "a red square", start=start, **kw), plain)
    mixed = noise_prior_start(bb, clip, [5], steps=2, prior=0.5, invert=False)
    assert not np.array_equal(sample_video(bb, "a red square", start=mixed, **kw), plain)


@pytest.fixture(scope="module")
def toy():
    return backbone.load("toy", "cpu", "fp32")


@pytest.mark.slow
def test_inversion_then_unguided_sampling_reconstructs_the_clip(toy):
    """Measured on the shipped toy model (red circle, spiral, 8 frames, 32 px): inverted start MAE 7.4 at 10 steps
    (2.6 at 25; the VAE alone 2.2), from fresh noise 11.9 (grey levels 0..255)."""
    clip, _ = tw.render(tw.ToySpec("circle", "red", "navy", "spiral", scale=0.3), frames=8, size=32)
    kw = dict(frames=8, size=(32, 32), steps=10, guidance=1.0, seed=0)
    start = noise_prior_start(toy, clip, [0], steps=10, prior=1.0, invert=True)
    rebuilt = np.abs(sample_video(toy, "", start=start, **kw).astype(float) - clip).mean()
    fresh = np.abs(sample_video(toy, "", **kw).astype(float) - clip).mean()
    assert rebuilt < 9.0 and rebuilt < 0.7 * fresh, (rebuilt, fresh)


def test_image_start_keeps_the_image_colours_in_frame_0(toy):
    spec = tw.ToySpec("square", "yellow", "brown", "zigzag", scale=0.35)
    video, _ = tw.render(spec, frames=8, size=32)
    image = video[0]
    start = image_start(toy, image, 8, [0], steps=10, strength=0.5, invert=True)
    assert isinstance(start, Start) and start.skip == 5
    out = sample_video(toy, tw.caption(spec)[0], frames=8, size=(32, 32), steps=10, guidance=3.0, seed=0, start=start)
    from cav.metrics import toy as tm

    assert tm.classify_colour(out[:1]) == "yellow" and tm.classify_background(out[:1]) == "brown"
    assert np.abs(out[0].astype(float) - image).mean() < 20


def test_encode_clip_layout(tiny_model):
    bb = backbone.load(str(tiny_model), "cpu", "fp32")
    z = encode_clip(bb, np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert z.shape == (1, bb.unet.config.in_channels, 3, 32 // bb.vae_factor, 32 // bb.vae_factor)
    assert torch.isfinite(z).all()


def test_generate_with_reference_and_image_writes_recipe(tiny_model, tiny_video, tmp_path, capsys):
    out = tmp_path / "prior.mp4"
    assert main(_gen(tiny_model, out, "--reference", tiny_video, "--noise-prior", "0.3", "--invert",
                     "--inversion-steps", "2")) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["sample"]["noise_prior"] == 0.3 and rec["sample"]["invert"] is True
    img = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), (200, 30, 30), dtype=np.uint8)).save(img)
    out2 = tmp_path / "anim.gif"
    assert main(_gen(tiny_model, out2, "--image", img, "--strength", "0.5")) == 0
    assert out2.is_file() and out2.with_suffix(".mp4").is_file()


@pytest.mark.parametrize("extra, words", [
    (["--noise-prior", "1.5", "--reference", "X"], "noise-prior"),
    (["--noise-prior", "0.5"], "--reference"),
    (["--invert"], "--reference"),
    (["--image", "IMG", "--strength", "0"], "strength"),
    (["--image", "MISSING.png"], "missing"),
    (["--image", "NOTIMG"], "could not decode image"),
    (["--image", "DIR"], "folder"),
    (["--reference", "MISSING.mp4", "--noise-prior", "0.5"], "missing"),
    (["--image", "IMG", "--reference", "X", "--noise-prior", "0.2"], "drop"),
    (["--inversion-steps", "0", "--invert", "--reference", "X"], "inversion"),
    (["--weights", "0.5,x"], "weights"),
    (["--weights", "0.5,9"], "weights"),
    (["--seeds", "1,1"], "repeats"),
    (["--weights", "0.5"], "--adapter"),
])
def test_bad_start_options_one_line_exit_2(tiny_model, tmp_path, run_cli, extra, words):
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    (tmp_path / "notimg.png").write_text("not an image")
    (tmp_path / "dir").mkdir()
    subs = {"IMG": img, "NOTIMG": tmp_path / "notimg.png", "DIR": tmp_path / "dir", "X": img,
            "MISSING.png": tmp_path / "missing.png", "MISSING.mp4": tmp_path / "missing.mp4"}
    out = tmp_path / "o.mp4"
    code, err = run_cli(_gen(tiny_model, out, *[subs.get(e, e) for e in extra]))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert words in err, err
    assert not out.exists()
