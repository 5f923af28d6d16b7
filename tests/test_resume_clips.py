"""Resume of runs on several clips and of runs from given absorbers (--ti-from): an interrupted run continues to the
same T-LoRA as the uninterrupted one; other clips, another order or a changed absorber file are refused before any
step. And `cav generate --reference RUN --reference-clip K` starts from the run's K-th clip."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cav import resume
from cav.cli import main
from cav.data.video import read_video

PROMPT = "a square moving right"


def _train(videos, model, out, *extra):
    return [str(a) for a in ["train", *videos, "--prompt", PROMPT, "--base", model, "--out", out, "--frames", "3",
                             "--size", "32", "--steps", "3", "--absorber-steps", "2", "--checkpoint-every", "1",
                             "--sample-steps", "1", "--ti-tokens", "2", "--absorber-batch", "2", "--t-lora-lr", "1e-2",
                             "--s-lora-lr", "1e-2", "--ti-lr", "1e-2", "--quiet", *extra]]


def _several(tiny_video, blue_video, model, out, *extra):
    return _train([tiny_video, blue_video], model, out, "--spatial-prompt", "a red square", "--spatial-prompt",
                  "a blue square", *extra)


def _kill_after(run, keep: str):
    """What a kill right after checkpoint ``keep`` leaves: later checkpoints and whatever was published after it are
    gone (published absorbers of clips still training, the T-LoRA, samples, summary)."""
    names = sorted((d.name for d in (run / "checkpoints").iterdir()), key=lambda n: _order(run / "checkpoints" / n))
    for name in names[names.index(keep) + 1:]:
        shutil.rmtree(run / "checkpoints" / name)
    point = resume.latest(run)
    if point.stage == "absorbers":
        shutil.rmtree(run / "absorbers" / f"clip-{point.clip}", ignore_errors=True)
    for name in ("t_lora", "samples"):
        shutil.rmtree(run / name)
    (run / "summary.json").unlink()


def _order(folder):
    meta = json.loads((folder / "state.json").read_text())
    return resume.step_order(meta["stage"], meta.get("clip", 0), meta["step"])


def _equal(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def several(tiny_model, tiny_video, blue_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "several"
    assert main(_several(tiny_video, blue_video, tiny_model, out)) == 0
    return out


@pytest.mark.parametrize("keep", ["absorbers-clip-1-step-000001", "absorbers-step-000002", "step-000001"])
def test_interrupted_several_clip_run_resumes_to_the_same_adapters(several, tiny_model, tiny_video, blue_video,
                                                                   tmp_path, keep):
    run = tmp_path / "run"
    shutil.copytree(several, run)
    _kill_after(run, keep)
    assert main(_several(tiny_video, blue_video, tiny_model, run, "--resume")) == 0
    for rel in ("t_lora/adapter_model.safetensors", "absorbers/s_lora/adapter_model.safetensors",
                "absorbers/clip-1/s_lora/adapter_model.safetensors", "absorbers/clip-1/textual_inversion.safetensors"):
        assert _equal(run / rel, several / rel), rel
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x.get("clip"), x["step"]) for x in lines] == [
        ("absorbers", 0, 1), ("absorbers", 0, 2), ("absorbers", 1, 1), ("absorbers", 1, 2),
        ("t_lora", None, 1), ("t_lora", None, 2), ("t_lora", None, 3)]  # no step lost or repeated


def test_resume_with_other_clips_is_refused_before_any_step(several, tiny_model, tiny_video, blue_video, tmp_path,
                                                            run_cli):
    run = tmp_path / "run"
    shutil.copytree(several, run)
    _kill_after(run, "step-000001")
    changed = tmp_path / "changed.mp4"
    changed.write_bytes(blue_video.read_bytes()[:-1] + b"\0")
    for clips in ([blue_video, tiny_video], [tiny_video, changed], [tiny_video, blue_video, blue_video]):
        before = sorted(str(p.relative_to(run)) for p in run.rglob("*")), (run / "log.jsonl").read_text()
        code, err = run_cli(_train(clips, tiny_model, run, "--resume"))  # the spatial prompts: the run's own
        assert code == 2 and len(err.splitlines()) == 1 and "not the 2 clip(s)" in err, err
        assert (sorted(str(p.relative_to(run)) for p in run.rglob("*")), (run / "log.jsonl").read_text()) == before


def test_run_from_a_given_embedding_resumes_and_refuses_a_changed_file(several, tiny_model, tiny_video, tmp_path,
                                                                       run_cli):
    emb = tmp_path / "emb.safetensors"
    shutil.copy(several / "absorbers" / "textual_inversion.safetensors", emb)
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(_train([tiny_video], tiny_model, whole, "--ti-from", emb)) == 0
    assert json.loads((whole / "data.json").read_text())["absorbers_from"]["ti_from"]["path"] == str(emb)
    shutil.copytree(whole, run)
    _kill_after(run, "step-000001")
    assert main(_train([tiny_video], tiny_model, run, "--resume")) == 0
    assert _equal(run / "t_lora" / "adapter_model.safetensors", whole / "t_lora" / "adapter_model.safetensors")
    _kill_after(run, "step-000001")
    emb.write_bytes(emb.read_bytes()[:-2] + b"  ")  # the same file name, other contents
    log = (run / "log.jsonl").read_text()
    code, err = run_cli(_train([tiny_video], tiny_model, run, "--resume"))
    assert code == 2 and len(err.splitlines()) == 1 and "--ti-from" in err, err
    assert (run / "log.jsonl").read_text() == log and resume.latest(run).step == 1


def test_generate_reference_clip_of_a_several_clip_run(several, tiny_model, blue_video, tmp_path, run_cli):
    def generate(name, *extra):
        out = tmp_path / f"{name}.mp4"
        code, err = run_cli(["generate", "--prompt", PROMPT, "--adapter", several, "--noise-prior", "0.7", "--seed",
                             "2", "--out", out, "--quiet", *extra])
        return code, err, out

    code, _, by_run = generate("by-run", "--reference", several, "--reference-clip", "2")
    assert code == 0 and json.loads(by_run.with_suffix(".json").read_text())["sample"]["reference_clip"] == 2
    code, _, by_clip = generate("by-clip", "--reference", blue_video)
    assert code == 0
    first = generate("first", "--reference", several)[2]
    video = lambda p: read_video(p, frames=None, size=(128, 128))  # noqa: E731
    assert np.array_equal(video(by_run), video(by_clip))  # clip 2 of the run is the blue clip, read as the run did
    assert not np.array_equal(video(first), video(by_run))
    for extra, words in ((["--reference", several, "--reference-clip", "3"], "out of range"),
                         (["--reference", blue_video, "--reference-clip", "2"], "--reference RUN"),
                         (["--reference", several, "--reference-clip", "0"], "--reference-clip")):
        code, err, out = generate("bad", *extra)
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
        assert not out.exists()


def test_ctrl_c_hint_names_every_clip(several, tmp_path):
    import argparse

    from cav.cli import _interrupt_hint

    args = argparse.Namespace(command="train", video=["a b.mp4", "c.mp4"], out=str(several))
    assert "`cav train 'a b.mp4' c.mp4 --resume --out " in _interrupt_hint(args)
    args.clips = "my clips.csv"  # clips from a manifest: the hint names the manifest
    assert "`cav train --clips 'my clips.csv' --resume --out " in _interrupt_hint(args)


@pytest.mark.slow
def test_sigkill_in_the_second_clips_absorbers_then_resume(several, tiny_model, tiny_video, blue_video, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = _several(tiny_video, blue_video, tiny_model, out)[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cav.cli", "train", *argv], env=env, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "absorbers-clip-1-step-000001").is_dir():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "t_lora").exists()
    assert main(_several(tiny_video, blue_video, tiny_model, out, "--resume")) == 0
    assert _equal(out / "t_lora" / "adapter_model.safetensors", several / "t_lora" / "adapter_model.safetensors")
    assert len((out / "log.jsonl").read_text().splitlines()) == 2 + 2 + 3
