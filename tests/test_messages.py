"""Messages a new user reads (issue 28): each names what exists and advises what works."""

import json
import logging

import numpy as np
import pytest

from cav.cli import done_line, main
from cav.data.video import write_video

PROMPT = "a red square moving right"


def _train(video, model, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(model), "--out", str(out), "--frames", "3",
            "--size", "32", "--steps", "1", "--absorber-steps", "1", "--sample-steps", "1", "--quiet", *extra]


def test_zero_steps_is_refused_before_anything_is_written(tiny_video, tiny_model, tmp_path, run_cli):
    out = tmp_path / "run"
    code, err = run_cli(_train(tiny_video, tiny_model, out, "--steps", "0"))
    assert code == 2 and len(err.splitlines()) == 1 and "--steps 0 trains no T-LoRA" in err and "≥ 1" in err, err
    assert not out.exists()


def test_done_names_only_what_exists(tmp_path):
    (tmp_path / "samples").mkdir()
    assert done_line(tmp_path) == f"done: samples in {tmp_path / 'samples'}"
    assert done_line(tmp_path / "nothing") == f"done: no T-LoRA was written to {tmp_path / 'nothing'}"


def test_resume_of_a_missing_run_says_there_is_nothing_to_resume(tiny_video, tmp_path, run_cli):
    """Without a run there is no config.yaml, hence no prompt: the missing run is the problem to name."""
    code, err = run_cli(["train", tiny_video, "--resume", "--out", tmp_path / "missing"])
    assert code == 2 and "nothing to resume" in err and "prompt" not in err, err
    assert not (tmp_path / "missing").exists()


def test_a_one_frame_clip_is_never_told_to_pass_frames_1(tiny_model, tmp_path, run_cli):
    clip = write_video(tmp_path / "one.mp4", np.zeros((1, 32, 32, 3), np.uint8))
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(folder / "0.png")
    for source in (clip, folder):
        code, err = run_cli(_train(source, tiny_model, tmp_path / "run"))
        assert code == 2 and "--frames 1" not in err and "a motion needs ≥ 2 frames" in err, err
        assert ("a longer video" if source == clip else "add images") in err
        code, err = run_cli(_train(source, tiny_model, tmp_path / "run", "--frames", "1"))  # the old advice
        assert code == 2 and "too few" in err
    two = write_video(tmp_path / "two.mp4", np.zeros((2, 32, 32, 3), np.uint8))
    code, err = run_cli(_train(two, tiny_model, tmp_path / "run"))
    assert code == 2 and "has 2 frames, fewer than --frames 3: pass --frames 2 or a longer video" in err, err


def test_size_help_states_each_familys_rule(capsys):
    """The rule in --help is the one check_shape enforces, computed from each family's shipped configs."""
    from pathlib import Path

    from cav import backbone
    from cav.config import SIZE_UNITS

    assets, toy = Path(backbone.__file__).parent / "assets", Path(backbone.__file__).parent / "toy" / "model"

    def unit(unet: Path, vae: Path) -> int:
        return backbone.shape_unit(json.loads(unet.read_text()), json.loads(vae.read_text()))[0]

    assert SIZE_UNITS == {
        "the toy": unit(toy / "unet" / "config.json", toy / "vae" / "config.json"),
        "AnimateDiff SDXL": unit(assets / "sdxl_unet_config.json", assets / "sdxl_vae_config.json"),
        "ModelScope, Zeroscope and AnimateDiff (SD 1.5)": unit(assets / "modelscope_unet_config.json",
                                                              assets / "modelscope_vae_config.json"),
    } == {"the toy": 16, "AnimateDiff SDXL": 32, "ModelScope, Zeroscope and AnimateDiff (SD 1.5)": 64}
    assert unit(assets / "sd15_unet_config.json", assets / "modelscope_vae_config.json") == 64
    for command in ("generate", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "16 for the toy" in text and "4 for the toy" not in text


def test_a_long_prompt_warns_once_in_one_short_line(tiny_video, tiny_model, tmp_path, caplog):
    long = PROMPT + " with a shadow, a trail of sparks and a smile" * 20
    with caplog.at_level(logging.WARNING, logger="cav"):
        argv = _train(tiny_video, tiny_model, tmp_path / "run")
        argv[argv.index(PROMPT)] = long
        assert main(argv) == 0  # the T-LoRA's validation sample uses the same prompt: no second warning
    [record] = [r for r in caplog.records if "--prompt" in r.getMessage()]  # (the tiny run's far-size one aside)
    assert "is ignored" in record.getMessage() and len(record.getMessage()) < 250, record.getMessage()


def test_check_base_shows_progress_unless_quiet(capsys):
    argv = ["toy", "check-base", "--videos", "1", "--heldout", "1", "--steps", "1", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "check-base" in captured.err and "2/2" in captured.err and json.loads(captured.out)["videos"] == 1
    assert main(argv + ["--quiet"]) == 0
    assert "check-base" not in capsys.readouterr().err


def test_ui_runs_that_is_a_file_or_unwritable_is_refused_before_the_server(tmp_path, run_cli, monkeypatch):
    import cav.cli

    def started(*a, **k):
        raise AssertionError("the web app was loaded before --runs was checked")

    monkeypatch.setattr(cav.cli, "_quiet_libraries", started)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for runs, words in ((a_file, "is a file"), (a_file / "runs", "is a file"), ("/proc/cav-runs", "cannot write")):
        code, err = run_cli(["ui", "--runs", runs])
        assert code == 2 and len(err.splitlines()) == 1 and words in err and "--runs" in err, err
    assert a_file.read_text() == "keep me"
