"""`cav select` on runs the toy truth does not apply to: which scorer ranked, n/a for an unmeasurable score, and
nothing written when nothing can be shown or ranked (issue 28)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cav.cli import main
from cav.data import toyworld as tw
from cav.data.video import read_video, write_video
from cav.metrics import shown
from cav.metrics import toy as tm
from cav.selection import format_text

SKIING = Path(__file__).parent / "data" / "man-skiing-64.mp4"


def _textured_clip(path: Path) -> Path:
    """A real-looking clip: a smooth random texture panning 2 px a frame (trackable, not the toy world's palette)."""
    import cv2

    rng = np.random.default_rng(0)
    big = cv2.resize(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), (160, 96), interpolation=cv2.INTER_CUBIC)
    frames = np.stack([big[16:80, 2 * i:2 * i + 64] for i in range(8)])
    return write_video(path, frames)


def _fake_run(run: Path, clip: Path, samples: dict[int, np.ndarray]) -> Path:
    """A run folder on the toy base as `cav train` leaves it, with the given validation sample per checkpoint step."""
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"base": "toy", "prompt": "a pan over a texture", "frames": 8,
                                                     "size": [64, 64]}))
    (run / "data.json").write_text(json.dumps({"clip": str(clip), "selection": {}}))
    for step, sample in samples.items():
        folder = run / "checkpoints" / f"step-{step:06d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "t_lora").mkdir()
        np.save(folder / "samples" / "sample-0.npy", sample)
    return run


def test_toy_world_detector_tells_toy_clips_from_real_ones(tmp_path):
    for spec in tw.sample_specs(np.random.default_rng(1), 6, tw.MOTIONS):
        frames, _ = tw.render(spec, 8, 32)
        path = write_video(tmp_path / "toy.mp4", frames)
        assert tm.not_toy_world(read_video(path, frames=8, size=(32, 32), fit="crop")) is None
    real = read_video(SKIING, frames=8, size=(32, 32), fit="crop")
    assert "not a toy-world clip" in tm.not_toy_world(real)
    assert tm.not_toy_world(read_video(_textured_clip(tmp_path / "tex.mp4"), frames=8, size=(64, 64), fit="crop"))


def test_real_clip_on_toy_base_is_ranked_by_motion_fidelity_and_prints_na(tmp_path, capsys):
    clip = _textured_clip(tmp_path / "pan.mp4")
    reference = read_video(clip, frames=8, size=(64, 64), fit="crop")
    flat = np.full_like(reference, 90)  # an early checkpoint's flat sample: motion fidelity is not measurable
    run = _fake_run(tmp_path / "run", clip, {2: flat, 4: reference})
    assert main(["select", str(run), "--clip", str(tmp_path / "no-clip")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "selection.json").read_text())
    assert saved["ranked_by"] == ["motion_fidelity"] and saved["chosen"] == "step-000004"
    assert all("toy_motion_error" not in row for row in saved["table"])  # the shape tracker did not score a real clip
    assert any(n.startswith("toy_motion_error: the reference is not a toy-world clip") for n in saved["left_out"])
    first = saved["table"][0]
    assert first["motion_fidelity"] is None and "could be tracked" in first["notes"]["motion_fidelity"]
    assert "motion_fidelity n/a (no point of the generated video could be tracked" in out
    assert "ranked by motion_fidelity (higher is better)" in out and "left out toy_motion_error" in out
    assert (run / "selected" / "t_lora").is_dir()


def test_any_missing_score_prints_as_na():
    table = [{"checkpoint": "step-000002", "step": 2, "motion_fidelity": None, "toy_motion_error": None,
              "text_alignment": None, "rank": None, "notes": {"text_alignment": "no CLIP"}}]
    text = format_text({"chosen": "step-000002", "adapter": "R/selected", "ranked_by": [], "left_out": [],
                        "table": table})
    assert "text_alignment n/a (no CLIP)" in text and "toy_motion_error n/a (not measurable)" in text
    assert shown(None) == "n/a" and shown(0.5) == "0.500" and shown(64) == "64" and shown("toy") == "toy"


@pytest.fixture(scope="module")
def ski_run(tmp_path_factory):
    """A run trained on the toy base from a real clip (the issue's case), tiny: 4 frames, 4 T-LoRA steps."""
    out = tmp_path_factory.mktemp("runs") / "ski"
    assert main([str(a) for a in ["train", SKIING, "--prompt", "a man skiing", "--out", out, "--frames", "4",
                                  "--size", "32", "--steps", "4", "--absorber-steps", "1", "--sample-steps", "2",
                                  "--checkpoint-every", "2", "--quiet"]]) == 0
    return out


def test_select_of_a_real_clip_run_on_the_toy_base_says_why_and_writes_nothing(ski_run, tmp_path, run_cli):
    """At 32 px no point of the skiing clip can be tracked and its pixels are not the toy world's: no scorer applies.
    That is one line naming each reason, exit 2, and no selection.json or selected/ (before: a traceback after both
    were written)."""
    before = sorted(p.name for p in ski_run.iterdir())
    code, err = run_cli(["select", ski_run, "--clip", tmp_path / "no-clip"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no score to select on" in err and "not a toy-world clip" in err and "no point of the reference" in err
    assert sorted(p.name for p in ski_run.iterdir()) == before
