"""Validation samples can start as `cav generate` does (noise prior, inversion, an image): the start is a recipe key
and a `cav train` flag, recorded beside each sample, and `cav generate` with the same options makes the same video."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cav.cli import main
from cav.config import load_recipe
from cav.data.video import read_video
from cav.errors import CavError

PROMPT = "a red square moving right on a navy background"
START = ["--validation-noise-prior", "0.6", "--validation-invert", "--validation-inversion-steps", "2"]


def _train(video, model, out, *extra):
    videos = video if isinstance(video, list) else [video]
    return [str(a) for a in ["train", *videos, "--prompt", PROMPT, "--spatial-prompt", "a red square", "--base", model,
                             "--out", out, "--steps", "1", "--absorber-steps", "1", "--frames", "3", "--size", "32",
                             "--checkpoint-every", "1", "--sample-steps", "3", "--ti-tokens", "2",
                             "--absorber-batch", "2", "--t-lora-lr", "1e-2", "--validation-seed", "5", "--quiet",
                             *extra]]


def _video(path):
    return read_video(path, frames=None, size=(128, 128))


@pytest.fixture(scope="module")
def prior_run(tiny_model, tiny_video, tmp_path_factory):
    """A run whose validation samples start from the inverted noise prior of its clip (every 2nd frame of it)."""
    out = tmp_path_factory.mktemp("runs") / "prior"
    assert main(_train(tiny_video, tiny_model, out, "--stride", "2", *START)) == 0
    return out


def test_checkpoint_sample_records_its_start_and_generate_reproduces_it(prior_run, tmp_path):
    ckpt = prior_run / "checkpoints" / "step-000001"
    rec = json.loads((ckpt / "samples" / "sample-0.json").read_text())
    assert rec["adapters"] == [{"path": str(ckpt.absolute()), "weight": 1.0}]
    sample = rec["sample"]
    assert (sample["noise_prior"], sample["invert"], sample["inversion_steps"]) == (0.6, True, 2)
    assert (sample["reference"], sample["reference_clip"], sample["seed"]) == (str(prior_run.absolute()), 1, 5)
    assert (prior_run / "samples" / "sample-0.json").is_file()  # the published samples keep their recipe

    def generate(name, *extra):
        out = tmp_path / f"{name}.mp4"
        assert main([str(a) for a in ["generate", "--prompt", rec["prompt"], "--adapter", ckpt, "--seed", "5",
                                      "--out", out, "--quiet", *extra]]) == 0
        return _video(out)

    want = _video(ckpt / "samples" / "sample-0.mp4")
    again = generate("again", "--reference", prior_run, "--noise-prior", "0.6", "--invert", "--inversion-steps", "2")
    assert np.array_equal(again, want)  # bit for bit: the same reference frames (the run's stride), start and adapter
    assert not np.array_equal(generate("plain"), want)  # the start changed the sample, so the check above can fail


def test_validation_image_start(tiny_model, tiny_video, tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), (40, 200, 40), dtype=np.uint8)).save(img)
    out = tmp_path / "run"
    assert main(_train(tiny_video, tiny_model, out, "--validation-image", img, "--validation-strength", "0.5")) == 0
    rec = json.loads((out / "samples" / "sample-0.json").read_text())
    assert rec["sample"]["image"] == str(img) and rec["sample"]["strength"] == 0.5
    assert rec["sample"]["reference"] is None


@pytest.mark.parametrize("extra, words", [
    (["--validation-noise-prior", "1.5"], "--validation-noise-prior"),
    (["--validation-noise-prior", "x"], "--validation-noise-prior"),
    (["--validation-image", "IMG", "--validation-strength", "0"], "--validation-strength"),
    (["--validation-invert", "--validation-inversion-steps", "0"], "--validation-inversion-steps"),
    (["--validation-image", "IMG", "--validation-noise-prior", "0.3"], "drop --validation-noise-prior"),
    (["--validation-image", "MISSING.png"], "missing"),
    (["--validation-image", "NOTIMG"], "could not decode image"),
])
def test_bad_validation_start_one_line_exit_2_no_work(tiny_model, tiny_video, tmp_path, run_cli, extra, words):
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    (tmp_path / "notimg.png").write_text("not an image")
    subs = {"IMG": img, "NOTIMG": tmp_path / "notimg.png", "MISSING.png": tmp_path / "missing.png"}
    out = tmp_path / "run"
    code, err = run_cli(_train(tiny_video, tiny_model, out, *[subs.get(e, e) for e in extra]))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert words in err, err
    assert not out.exists()


def test_bad_validation_start_keeps_the_run_it_would_overwrite(prior_run, tiny_model, tiny_video, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(prior_run, run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code, err = run_cli(_train(tiny_video, tiny_model, run, "--overwrite", "--validation-image", tmp_path / "no.png"))
    assert code == 2 and "missing" in err and len(err.splitlines()) == 1, err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_validation_start_is_a_checked_recipe_key(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("validation_noise_prior: 0.2\nvalidation_invert: true\n")
    assert load_recipe(good)["validation_noise_prior"] == 0.2
    bad.write_text("validation_strength: 2\n")
    with pytest.raises(CavError, match="validation_strength"):
        load_recipe(bad)


def test_several_clips_validation_reference_is_the_chosen_clip(tiny_model, tiny_video, blue_video, tmp_path, run_cli):
    def train(out, k):
        return run_cli(_train([tiny_video, blue_video], tiny_model, out, "--spatial-prompt", "a blue square",
                              "--validation-noise-prior", "0.7", "--validation-reference-clip", k))

    code, err = train(tmp_path / "bad", 3)
    assert code == 2 and "--validation-reference-clip 3 is out of range" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    assert train(run, 2) == (0, "")
    ckpt = run / "checkpoints" / "step-000001"
    rec = json.loads((ckpt / "samples" / "sample-0.json").read_text())
    assert rec["sample"]["reference_clip"] == 2
    out = tmp_path / "again.mp4"
    assert main([str(a) for a in ["generate", "--prompt", rec["prompt"], "--adapter", ckpt, "--seed", "5", "--out", out,
                                  "--reference", run, "--reference-clip", "2", "--noise-prior", "0.7", "--quiet"]]) == 0
    assert np.array_equal(_video(out), _video(ckpt / "samples" / "sample-0.mp4"))
