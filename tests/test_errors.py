"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback, nothing lost."""

import json

import numpy as np
import pytest

from cav.cli import main
from cav.toy.factory import TinySpec, make_tiny_model

PROMPT = "a red square moving right"


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _train(video, model, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(model), "--out", str(out), "--frames", "4",
            "--size", "32", "--steps", "1", "--absorber-steps", "1", "--sample-steps", "1", "--quiet", *extra]


def _bad_inputs(tmp_path, tiny_video):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    data = tiny_video.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return {
        "missing": (tmp_path / "nope.mp4", "missing"),
        "no_images": (tmp_path / "empty_dir", "no images"),
        "empty_file": (tmp_path / "empty.mp4", "empty"),
        "text_as_mp4": (tmp_path / "text.mp4", "video"),
        "truncated": (tmp_path / "truncated.mp4", "video"),
    }


@pytest.mark.parametrize("case", ["missing", "no_images", "empty_file", "text_as_mp4", "truncated"])
def test_bad_videos(case, tmp_path, tiny_video, tiny_model, capsys):
    path, keyword = _bad_inputs(tmp_path, tiny_video)[case]
    code, err = _run(capsys, *_train(path, tiny_model, tmp_path / "run"))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert keyword in err.lower() or "frames" in err.lower(), err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_fewer_frames_than_requested(tmp_path, tiny_video, tiny_model, capsys):
    code, err = _run(capsys, *_train(tiny_video, tiny_model, tmp_path / "run"), "--frames", "50")
    assert code == 2 and "fewer than --frames 50" in err and len(err.splitlines()) == 1


def test_empty_prompt(tmp_path, tiny_video, tiny_model, capsys):
    argv = _train(tiny_video, tiny_model, tmp_path / "run")
    argv[argv.index(PROMPT)] = "  "
    code, err = _run(capsys, *argv)
    assert code == 2 and "prompt is empty" in err


def test_base_not_a_t2v_folder_or_incomplete(tmp_path, tiny_video, tiny_model, capsys):
    (tmp_path / "plain").mkdir()
    code, err = _run(capsys, *_train(tiny_video, tmp_path / "plain", tmp_path / "run"))
    assert code == 2 and "model_index.json" in err
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    shutil.rmtree(partial / "vae")
    code, err = _run(capsys, *_train(tiny_video, partial, tmp_path / "run"))
    assert code == 2 and "vae" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def run_dir(tiny_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("errs") / "run"
    assert main(_train(tiny_video, tiny_model, out, "--absorbers", "s-lora")) == 0
    return out


def test_adapter_of_wrong_kind(run_dir, tmp_path, capsys):
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--adapter", str(run_dir / "absorbers" / "s_lora"),
                     "--out", str(tmp_path / "x.mp4"), "--quiet")
    assert code == 2 and "spatial" in err and "T-LoRA" in err and len(err.splitlines()) == 1


def test_adapter_trained_on_another_base(run_dir, tmp_path, capsys):
    other = make_tiny_model(tmp_path / "other", TinySpec(block_out_channels=(16, 32), norm_num_groups=8))
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--adapter", str(run_dir), "--base", str(other),
                     "--out", str(tmp_path / "x.mp4"), "--quiet")
    assert code == 2 and "another base" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()


def test_overwrite_replaces_a_run_only_when_asked(run_dir, tiny_video, tiny_model, capsys):
    before = (run_dir / "config.yaml").read_text()
    code, err = _run(capsys, *_train(tiny_video, tiny_model, run_dir))
    assert code == 2 and "already holds a run" in err
    assert (run_dir / "config.yaml").read_text() == before


def test_resume_without_a_run(tmp_path, tiny_video, tiny_model, capsys):
    code, err = _run(capsys, *_train(tiny_video, tiny_model, tmp_path / "fresh"), "--resume")
    assert code == 2 and "nothing to resume" in err


def test_bad_recipe_values(tmp_path, tiny_video, tiny_model, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("absorbers: sometimes\n")
    code, err = _run(capsys, *_train(tiny_video, tiny_model, tmp_path / "run"), "--recipe", str(recipe))
    assert code == 2 and "--absorbers" in err
    recipe.write_text("learning_rate: 1\n")
    code, err = _run(capsys, *_train(tiny_video, tiny_model, tmp_path / "run"), "--recipe", str(recipe))
    assert code == 2 and "learning_rate" in err
    code, err = _run(capsys, *_train(tiny_video, tiny_model, tmp_path / "run"), "--lora-weight", "0")
    assert code == 2 and "lora_weight 0.0 is invalid" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
