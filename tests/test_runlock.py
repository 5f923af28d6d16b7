"""A run folder has one owner: the flock in runlock.py, across processes and within one."""

import subprocess
import sys

import pytest

from cav import runlock
from cav.errors import CavError


def test_second_holder_refused_and_lock_released(tmp_path):
    run = tmp_path / "run"
    assert not runlock.held(run)
    with runlock.RunLock(run):
        assert runlock.held(run)
        with pytest.raises(CavError, match="being trained by another process"):
            with runlock.RunLock(run):
                pass
        with pytest.raises(CavError, match="then delete it"):
            runlock.refuse_if_held(run, "delete it")
    assert not runlock.held(run)
    runlock.refuse_if_held(run, "delete it")  # free again: no error


def test_lock_held_by_another_process_and_dropped_when_it_dies(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from cav import runlock; l = runlock.RunLock(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert runlock.held(run)
        with pytest.raises(CavError):
            runlock.RunLock(run).__enter__()
    finally:
        child.kill()
        child.wait()
    assert not runlock.held(run)  # the kernel dropped it with the process: never stale
