"""The run folder protocol: refuse before work what would lose or mix up a run; resume only what the run trained on."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from cav.cli import main

PROMPT = "a red square moving right"


def _train(video, model, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(model), "--out", str(out), "--frames", "3",
            "--size", "32", "--steps", "4", "--absorber-steps", "1", "--sample-steps", "1", "--checkpoint-every", "1",
            "--t-lora-lr", "1e-2", "--quiet", *extra]


def _run(capsys, argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # flags argparse refuses (e.g. --resume with --overwrite) exit there
        code = exc.code
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(code, err):
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert "Traceback" not in err


def _weights(run):
    return load_file(str(run / "t_lora" / "adapter_model.safetensors"))


def _interrupt_after(run, step):
    """What a kill after T-LoRA step ``step`` leaves: later checkpoints and the published results are gone."""
    for d in (run / "checkpoints").glob("step-*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    for name in ("t_lora", "samples"):
        shutil.rmtree(run / name)
    (run / "summary.json").unlink()


@pytest.fixture(scope="module")
def strided(tiny_model, tiny_video, tmp_path_factory):
    """An uninterrupted run on every 2nd frame of the clip."""
    out = tmp_path_factory.mktemp("runs") / "strided"
    assert main(_train(tiny_video, tiny_model, out, "--stride", "2")) == 0
    return out


def test_overwrite_with_resume_is_refused_before_work(tiny_model, tiny_video, tmp_path, capsys, strided):
    for out in (tmp_path / "new", strided):
        before = sorted(p.name for p in out.iterdir()) if out.exists() else None
        code, err = _run(capsys, _train(tiny_video, tiny_model, out, "--overwrite", "--resume"))
        _one_line_error(code, err)
        assert "contradict" in err or "not allowed with argument" in err  # the CLI refuses the pair in argparse
        assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_unwritable_out_is_refused_before_work(tiny_model, tiny_video, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "run", tmp_path / "notes.txt" / "deeper" / "run", "/proc/cav-run", "/proc/1/run"):
        code, err = _run(capsys, _train(tiny_video, tiny_model, out))
        _one_line_error(code, err)
        assert "--out" in err
    assert a_file.read_text() == "keep me"


def test_resume_without_selection_flags_uses_the_recorded_selection(tiny_model, tiny_video, tmp_path, strided):
    run = tmp_path / "run"
    shutil.copytree(strided, run)
    _interrupt_after(run, 2)
    assert main(_train(tiny_video, tiny_model, run, "--resume")) == 0  # no --stride: the recorded one is used
    ref, got = _weights(strided), _weights(run)
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6
    assert json.loads((run / "data.json").read_text())["selection"] == {"stride": 2}
    assert len((run / "log.jsonl").read_text().splitlines()) == 1 + 4


def test_resume_refuses_another_clip_or_selection(tiny_model, tiny_video, tmp_path, capsys, strided):
    run = tmp_path / "run"
    shutil.copytree(strided, run)
    _interrupt_after(run, 2)
    other = tmp_path / "other.mp4"
    other.write_bytes(tiny_video.read_bytes()[:-1] + b"\0")
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for clip, extra, word in ((other, (), "not the clip"), (frames_dir, (), "not the clip"),
                              (tiny_video, ("--stride", "3"), "selection"), (tiny_video, ("--fps", "4"), "selection")):
        log = (run / "log.jsonl").read_text()
        code, err = _run(capsys, _train(clip, tiny_model, run, "--resume", *extra))
        _one_line_error(code, err)
        assert word in err
        assert (run / "log.jsonl").read_text() == log  # no step ran


def test_resume_of_a_finished_run_changes_nothing(tiny_model, tiny_video, tmp_path, strided):
    run = tmp_path / "run"
    shutil.copytree(strided, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(_train(tiny_video, tiny_model, run, "--resume")) == 0
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_seconds_count_every_session(tiny_model, tiny_video, tmp_path, strided):
    run = tmp_path / "run"
    shutil.copytree(strided, run)
    _interrupt_after(run, 2)
    before = json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())["elapsed_seconds"]
    assert main(_train(tiny_video, tiny_model, run, "--resume")) == 0
    assert json.loads((run / "summary.json").read_text())["seconds"] > before > 0


def test_failed_overwrite_leaves_no_stale_summary(tiny_model, tiny_video, tmp_path, capsys, monkeypatch, strided):
    import cav.trainer as trainer

    run = tmp_path / "run"
    shutil.copytree(strided, run)
    real = trainer.diffusion_loss
    monkeypatch.setattr(trainer, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    code, err = _run(capsys, _train(tiny_video, tiny_model, run, "--overwrite"))
    _one_line_error(code, err)
    assert not (run / "summary.json").exists() and not (run / "t_lora").exists()


# ------------------------------------------------------------------------------- format versions of the records
RECORDS = ("cav.json", "state.json", "data.json")


def _records(run):
    found = {name: sorted(run.rglob(name)) for name in RECORDS}
    assert all(found.values()), found  # the run wrote each kind (adapters, checkpoints, its data)
    return [p for paths in found.values() for p in paths]


def test_every_record_of_a_run_starts_with_its_format_version(strided):
    from cav import versioned

    for path in _records(strided):
        written = json.loads(path.read_text())
        assert next(iter(written)) == versioned.KEY and written[versioned.KEY] == versioned.CURRENT[path.name], path
        assert versioned.read(path) == {k: v for k, v in written.items() if k != versioned.KEY}


def test_a_run_from_before_format_versions_resumes_as_before(tiny_model, tiny_video, tmp_path, strided):
    """Files without ``format_version`` (every run of an older cav) read as version 1: the resume continues exactly,
    and what it writes again carries the version."""
    from cav import versioned

    run = tmp_path / "run"
    shutil.copytree(strided, run)
    _interrupt_after(run, 2)
    for path in _records(run):
        written = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in written.items() if k != versioned.KEY}, indent=2) + "\n")
    assert main(_train(tiny_video, tiny_model, run, "--resume")) == 0
    ref, got = _weights(strided), _weights(run)
    assert all((ref[k] == got[k]).all() for k in ref)
    for name in ("data.json", "t_lora/cav.json", "checkpoints/step-000004/state.json"):
        assert json.loads((run / name).read_text())[versioned.KEY] == 1


@pytest.mark.parametrize("record", ["data.json", "checkpoints/step-000002/state.json", "t_lora/cav.json"])
def test_a_record_of_a_newer_cav_is_refused_with_one_line(tiny_model, tiny_video, tmp_path, capsys, strided, record):
    from cav import versioned

    run = tmp_path / "run"
    shutil.copytree(strided, run)
    _interrupt_after(run, 2)
    path = run / ("checkpoints/step-000002/t_lora/cav.json" if record == "t_lora/cav.json" else record)
    path.write_text(json.dumps({**json.loads(path.read_text()), versioned.KEY: versioned.CURRENT[path.name] + 1}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # the resume reads data.json and state.json; `cav export` reads the T-LoRA's cav.json first
    resume = _train(tiny_video, tiny_model, run, "--resume")
    code, err = _run(capsys, ["export", path.parent.parent] if path.name == "cav.json" else resume)
    _one_line_error(code, err)
    assert "written by a newer cav" in err and err.endswith("upgrade cav") and str(path) in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
