"""One owner per run folder (issue 28): `cav train` holds ``<out>/.cav.lock`` (runlock.py) for the whole run, taken
before anything in the folder is checked or changed, so a second training, an --overwrite or a --resume of a run
being trained is refused with one line and changes nothing; the lock file itself leaves no trace."""

import shutil
import subprocess
import sys

import pytest

from cav import runfolder, runlock
from cav.cli import main

PROMPT = "a red square moving right"


def _train(video, model, out, *extra):
    return [str(a) for a in ["train", video, "--prompt", PROMPT, "--base", model, "--out", out, "--frames", "3",
                             "--size", "32", "--steps", "2", "--absorber-steps", "1", "--sample-steps", "1",
                             "--checkpoint-every", "1", "--quiet", *extra]]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))} if folder.exists() else None


@pytest.fixture(scope="module")
def finished(tiny_model, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_train(tiny_video, tiny_model, out)) == 0
    return out


def test_a_finished_run_keeps_no_lock_file_and_a_stale_one_is_no_run(finished, tiny_model, tiny_video, tmp_path,
                                                                      capsys):
    assert not (finished / runlock.LOCK).exists() and not runlock.held(finished)
    stale = tmp_path / "killed"  # what a killed `cav train` leaves before its first file: only the lock file
    stale.mkdir()
    (stale / runlock.LOCK).write_text("12345\n")
    assert not runfolder.holds_run(stale)
    assert main(_train(tiny_video, tiny_model, stale)) == 0  # no --overwrite needed: it is not a run
    assert (stale / "t_lora").is_dir() and not (stale / runlock.LOCK).exists()
    assert "done: T-LoRA in" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_training_into_a_folder_being_trained_is_refused(finished, tiny_model, tiny_video, tmp_path, run_cli, flags):
    """Another process holds the lock (as a running `cav train`, web app child or batch worker does): a new run, an
    --overwrite and a --resume are each refused with one line, exit 2, and the folder is byte for byte the same."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    fresh = tmp_path / "fresh"  # a run that has only just started: its lock, nothing else yet
    code = ("import sys, time; from cav import runlock; [runlock.RunLock(p).__enter__() for p in sys.argv[1:]]; "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run), str(fresh)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for out in ([run] if flags else [run, fresh]) + ([fresh] if flags == ["--overwrite"] else []):
            before = _snapshot(out)
            code, err = run_cli(_train(tiny_video, tiny_model, out, *flags))
            if out == run and not flags:  # a run is there: the usual refusal comes first, as before
                assert code == 2 and "already holds a run" in err, err
            else:
                assert code == 2 and len(err.splitlines()) == 1 and "being trained by another process" in err, err
            assert "Traceback" not in err and _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(_train(tiny_video, tiny_model, run, "--overwrite")) == 0  # free again: --overwrite works


def test_a_refused_start_leaves_no_folder(tiny_model, tiny_video, tmp_path, run_cli):
    """The lock creates the folder; a start refused after that (a bad video) removes what the lock created."""
    out = tmp_path / "a" / "b" / "run"
    code, err = run_cli(_train(tmp_path / "missing.mp4", tiny_model, out))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists()


def test_a_batch_row_on_a_folder_being_trained_fails_and_writes_no_state(finished, tmp_path):
    from cav import batch

    run = tmp_path / "lib" / "row"
    shutil.copytree(finished, run)
    code = ("import sys, time; from cav import runlock; runlock.RunLock(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        record = batch.train_row({"name": "row", "line": 2, "hash": "h", "out": str(tmp_path / "lib"), "cpus": 1})
        assert record["status"] == "failed" and "being trained by another process" in record["error"], record
        after = _snapshot(run)
        assert {k: v for k, v in after.items() if k != batch.LOCK} == before and not (run / batch.STATE).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_tidy_lock_leaves_nothing_and_never_counts_a_removed_lock_file(tmp_path):
    import fcntl
    import os

    run = tmp_path / "a" / "run"
    with runlock.RunLock(run, tidy=True):
        assert runlock.held(run)
        late = os.open(run / runlock.LOCK, os.O_RDWR)  # a newcomer that opened the file just before it was removed
    assert not (tmp_path / "a").exists()  # the lock file and the two folders the lock created are gone
    try:
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it gets the removed file's lock: that must not count
        assert not runlock._same_file(late, run / runlock.LOCK)
    finally:
        os.close(late)
    with runlock.RunLock(run):  # the untidy default keeps its file, as before
        pass
    assert (run / runlock.LOCK).is_file() and not runlock.held(run)
