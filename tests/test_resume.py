"""Never lose work: atomic writes, exact resume after SIGKILL, Ctrl-C checkpoints, non-finite loss."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cav import resume
from cav.cli import main
from cav.io_utils import atomic_path, write_text

PROMPT = "a red square moving right on a navy background"


def _args(video, model, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--spatial-prompt", "a red square", "--base", str(model),
            "--out", str(out), "--steps", "4", "--absorber-steps", "3", "--frames", "4", "--size", "32",
            "--checkpoint-every", "1", "--sample-steps", "1", "--ti-tokens", "2", "--absorber-batch", "2",
            "--t-lora-lr", "1e-2", "--s-lora-lr", "1e-2", "--ti-lr", "1e-2", "--quiet", *extra]


def _default_sigint():
    # a background job (e.g. CI started with `&`) inherits SIGINT ignored; a user at a terminal does not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cav.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _weights(run):
    return load_file(str(run / "t_lora" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _spawn(_args(tiny_video, tiny_model, out))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return out


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path):
    target = write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed mid-save")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_checkpoint_writer_keeps_previous_checkpoint(tmp_path):
    with resume.CheckpointWriter(tmp_path, "t_lora", 1) as d:
        (d / "x").write_text("step 1")
    with pytest.raises(RuntimeError):
        with resume.CheckpointWriter(tmp_path, "t_lora", 2) as d:
            (d / "x").write_text("partial")
            raise RuntimeError("killed mid-save")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000001"]
    assert (tmp_path / "checkpoints" / "step-000001" / "x").read_text() == "step 1"


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["absorbers-step-000002", "step-000002"])
def test_sigkill_then_resume_matches_uninterrupted(tiny_model, tiny_video, tmp_path, uninterrupted, kill_after):
    out = tmp_path / "run"
    proc = _spawn(_args(tiny_video, tiny_model, out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / kill_after).is_dir():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # kill -9, wherever it is
    proc.wait()
    assert not (out / "t_lora").exists()
    done = _spawn(_args(tiny_video, tiny_model, out, "--resume"))
    assert done.wait(timeout=600) == 0, done.stderr.read()
    ref, got = _weights(uninterrupted), _weights(out)
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5
    assert load_file(str(out / "absorbers" / "textual_inversion.safetensors"))["<cav>"].allclose(
        load_file(str(uninterrupted / "absorbers" / "textual_inversion.safetensors"))["<cav>"], atol=1e-5)
    steps = [line for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(steps) == 3 + 4  # no duplicated log lines after resume


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_model, tiny_video, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(_args(tiny_video, tiny_model, out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / "absorbers-step-000001").is_dir():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=900) == 130
    err = proc.stderr.read()
    assert "--resume" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert resume.latest(out) is not None


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model, tiny_video, tmp_path, monkeypatch, capsys):
    import cav.trainer as trainer

    real = trainer.diffusion_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss  # 3 absorber steps, then T-LoRA step 2

    monkeypatch.setattr(trainer, "diffusion_loss", flaky)
    out = tmp_path / "run"
    code = main(_args(tiny_video, tiny_model, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "learning rate" in err[0] and "--resume" in err[0]
    assert resume.latest(out)[:2] == ("t_lora", 1)
    assert (out / "checkpoints" / "step-000001" / "t_lora" / "adapter_model.safetensors").is_file()
