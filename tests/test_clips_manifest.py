"""`cav train --clips FILE`: the clips of one motion and their spatial prompts from a CSV or YAML file, the same run
as clip arguments with repeated --spatial-prompt; bad files are one-line errors."""

import json
import shutil

import pytest

PROMPT = "a square moving right"


@pytest.fixture
def folder(tmp_path, tiny_video, blue_video):
    shutil.copy(blue_video, tmp_path / "blue.mp4")  # a path relative to the manifest's folder
    return tmp_path


def test_clips_file_is_the_same_run_as_arguments(tiny_model, tiny_video, blue_video, folder, capsys):
    from cav.cli import main

    argv = ["--prompt", PROMPT, "--base", str(tiny_model), "--dry-run", "--json"]
    assert main(["train", str(tiny_video), str(blue_video), "--spatial-prompt", "a red square",
                 "--spatial-prompt", "a blue square", *argv]) == 0
    want = json.loads(capsys.readouterr().out)
    csv_file = folder / "clips.csv"
    csv_file.write_text(f"clip,spatial_prompt\n{tiny_video},a red square\nblue.mp4,a blue square\n")
    yaml_file = folder / "clips.yaml"
    yaml_file.write_text(f"- clip: {tiny_video}\n  spatial_prompt: a red square\n"
                         "- clip: blue.mp4\n  spatial_prompt: a blue square\n")
    for manifest in (csv_file, yaml_file):
        assert main(["train", "--clips", str(manifest), *argv]) == 0
        assert json.loads(capsys.readouterr().out) == want
    assert want["clips"] == 2 and want["stages"][2]["spatial_prompt"] == "a blue square"


@pytest.mark.parametrize("text, extra, words", [
    ("clip,spatial_prompt\nmissing.mp4,a\n", [], "line 2: clip 'missing.mp4' does not exist"),
    ("clip,prompt\nblue.mp4,a\n", [], "not prompt"),
    ("spatial_prompt\na\n", [], "clip is missing"),
    ("clip,spatial_prompt\nblue.mp4,a\nblue.mp4,\n", [], "line 3: spatial_prompt is empty"),
    ("clip\n", [], "has no rows"),
    ("clip,spatial_prompt\nblue.mp4,a\n", ["--spatial-prompt", "b"], "given twice"),
    ("clip,spatial_prompt\nblue.mp4,a\n", ["VIDEO"], "given twice"),
])
def test_bad_clips_file_one_line_exit_2(tiny_model, tiny_video, folder, run_cli, text, extra, words):
    manifest = folder / "clips.csv"
    manifest.write_text(text)
    extra = [str(tiny_video) if e == "VIDEO" else e for e in extra]
    out = folder / "run"
    code, err = run_cli(["train", *extra, "--clips", manifest, "--prompt", PROMPT, "--base", tiny_model,
                         "--out", out])
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert words in err, err
    assert not out.exists()


def test_clips_file_type_and_yaml_shape(tiny_model, folder, run_cli):
    for name, text, words in (("clips.txt", "blue.mp4", "unknown type"), ("clips.yaml", "clip: blue.mp4", "YAML list"),
                              ("missing.csv", None, "does not exist")):
        manifest = folder / name
        if text is not None:
            manifest.write_text(text)
        code, err = run_cli(["train", "--clips", manifest, "--prompt", PROMPT, "--base", tiny_model])
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
