"""`cav select` (checkpoint choice) and `cav generate --weights --seeds` (a grid of videos and one contact sheet)."""

import json

import numpy as np
import pytest

from cav.cli import main
from cav.selection import choose


def test_choose_follows_a_hand_made_score_table():
    table = [  # with the toy ground truth, motion fidelity is not used: error and CLIP rank the checkpoints
        {"checkpoint": "step-100", "step": 100, "toy_motion_error": 0.30, "motion_fidelity": 0.9, "text_alignment": 20},
        {"checkpoint": "step-200", "step": 200, "toy_motion_error": 0.10, "motion_fidelity": 0.1, "text_alignment": 25},
        {"checkpoint": "step-300", "step": 300, "toy_motion_error": 0.20, "motion_fidelity": 0.5, "text_alignment": 26},
    ]
    assert choose(table)["checkpoint"] == "step-300"  # ranks (1 + 2) / 2 and (2 + 1) / 2 tie: the later step
    assert [r["rank"] for r in table] == [3.0, 1.5, 1.5]
    table[2]["text_alignment"] = 24  # now step-200 is best on both
    assert choose(table)["checkpoint"] == "step-200"
    assert [r["rank"] for r in table] == [3.0, 1.0, 2.0]
    no_truth = [{k: v for k, v in r.items() if k != "toy_motion_error"} for r in table]
    for r in no_truth:
        r.pop("text_alignment")
    assert choose(no_truth)["checkpoint"] == "step-100"  # motion fidelity alone
    no_truth[0]["motion_fidelity"] = None  # step-100's samples could not be tracked: it ranks last, not an error
    assert choose(no_truth)["checkpoint"] == "step-300" and no_truth[0]["rank"] == 3.0


@pytest.fixture(scope="module")
def run(tiny_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main([str(a) for a in ["train", tiny_video, "--prompt", "a red square moving right", "--base", tiny_model,
                                  "--out", out, "--frames", "3", "--size", "32", "--steps", "4", "--absorber-steps", "1",
                                  "--sample-steps", "1", "--checkpoint-every", "2", "--quiet"]]) == 0
    return out


def test_select_writes_table_and_a_generatable_adapter(run, tmp_path, capsys):
    assert main(["select", str(run), "--clip", str(tmp_path / "no-clip"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "selection.json").read_text())
    assert saved["chosen"] == result["chosen"] and [r["checkpoint"] for r in saved["table"]] == ["step-000002", "step-000004"]
    assert any("text_alignment" in n for n in saved["left_out"])
    best = max(saved["table"], key=lambda r: (r["motion_fidelity"], r["step"]))  # the tiny base is not `toy`
    assert saved["chosen"] == best["checkpoint"]
    assert (run / "selected" / "t_lora" / "adapter_model.safetensors").is_file()
    out = tmp_path / "sel.mp4"
    assert main(["generate", "--prompt", "a red square", "--adapter", str(run / "selected"), "--steps", "1",
                 "--out", str(out), "--quiet"]) == 0


def test_weight_grid_writes_weights_times_seeds_videos_and_one_sheet(run, tmp_path):
    out = tmp_path / "grid.mp4"
    assert main(["generate", "--prompt", "a red square", "--adapter", str(run), "--steps", "1", "--weights",
                 "0.5,1", "--seeds", "1,2,3", "--out", str(out), "--quiet"]) == 0
    videos = sorted(p.name for p in tmp_path.glob("grid-*.mp4"))
    assert videos == [f"grid-w{w}-s{s}.mp4" for w in ("0.5", "1") for s in (1, 2, 3)]
    assert (tmp_path / "grid-sheet.png").is_file()
    rec = json.loads((tmp_path / "grid-w0.5-s2.json").read_text())
    assert rec["adapters"][0]["weight"] == 0.5 and rec["sample"]["seed"] == 2


def test_select_bad_run_one_line_exit_2(tmp_path, run_cli):
    for target in (tmp_path / "missing", tmp_path):
        code, err = run_cli(["select", target])
        assert code == 2 and len(err.splitlines()) == 1 and "not a run folder" in err, err


def test_select_scores_a_run_on_several_clips_against_every_clip(tmp_path):
    """A run on two clips (one moving left, one moving up): each checkpoint's toy error is the mean over both clips,
    not the first clip's alone (a sample identical to clip 1 would score 0 against clip 1 only)."""
    import yaml

    from cav.data import toyworld as tw
    from cav.data.video import read_video, write_video
    from cav.metrics import toy as tm
    from cav.selection import score_checkpoints

    run = tmp_path / "run"
    records, clips = [], []
    for k, motion in enumerate(("left", "up")):
        frames, _ = tw.render(tw.ToySpec("circle", "red", "navy", motion, 0.32, 0.0), 8, 32)
        path = write_video(tmp_path / f"clip-{k}.mp4", frames)
        records.append({"clip": str(path), "selection": {}})
        clips.append(read_video(path, frames=8, size=(32, 32), fit="crop"))
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"base": "toy", "prompt": "a red circle moving left",
                                                     "frames": 8, "size": [32, 32]}))
    (run / "data.json").write_text(json.dumps({**records[0], "clips": records}))
    for step, sample in ((2, clips[0]), (4, clips[1])):
        (run / "checkpoints" / f"step-{step:06d}" / "samples").mkdir(parents=True)
        np.save(run / "checkpoints" / f"step-{step:06d}" / "samples" / "sample-0.npy", sample)
    table, _ = score_checkpoints(run, clip=str(tmp_path / "no-clip"))
    tracks = [tm.track(c) for c in clips]
    for row, sample in zip(table, clips):
        each = [tm.motion_error(tm.track(sample), t, 32) for t in tracks]
        assert row["toy_motion_error"] == pytest.approx(np.mean(each))
        assert min(each) < 0.05 < max(each)  # one clip matches the sample, the other does not: the mean sees both
