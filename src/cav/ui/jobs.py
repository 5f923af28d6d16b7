"""One training at a time per server, run as a child process (``cav train ... --quiet``), so torch's threads and the
GIL never block the page; its progress is read from the run folder (``runs.py``), its one-line error from stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CavError
from .child import STOP_FILE


@dataclass
class Job:
    run: Path
    argv: list[str]
    proc: subprocess.Popen
    stderr: Path
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    @property
    def stop_file(self) -> Path:
        """Written by Stop before its SIGINT; the child looks for it once its Ctrl-C handler is on (``child.py``)."""
        return self.stderr.with_suffix(".stop")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def message(self) -> str:
        """One line: what the job is doing or how it ended (the CLI's own error line when it failed)."""
        rc = self.proc.poll()
        if rc is None:
            return f"training '{self.run.name}' (stopping: the last step is being checkpointed; Stop again ends it " \
                   "at once, without a checkpoint)" if self.stop_requested else f"training '{self.run.name}'"
        if rc == 0:
            return f"finished: T-LoRA in {self.run / 't_lora'}, samples in {self.run / 'samples'}"
        lines = [x for x in self.stderr.read_text(errors="replace").splitlines() if x.strip()] \
            if self.stderr.is_file() else []
        if rc in (130, -signal.SIGINT, -signal.SIGKILL) or (self.stop_requested and rc != 2):
            if _resumable(self.run):
                return f"stopped: the last step of '{self.run.name}' is checkpointed; pick it under Resume to continue"
            return f"stopped before '{self.run.name}' had a checkpoint: nothing to resume; start it again"
        said = next((x for x in reversed(lines) if x.startswith("cav: error:")), None)
        return said or f"cav: error: training stopped with exit code {rc}: {lines[-1] if lines else 'no message'}"


def _resumable(run: Path) -> bool:
    """A completed checkpoint to resume from (what the Resume list offers)."""
    return any((c / "state.json").is_file() for c in (Path(run) / "checkpoints").glob("*step-*"))


class TrainingJobs:
    """Starts, stops and reports the server's one training child."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self._lock = threading.Lock()
        self._job: Job | None = None

    @property
    def current(self) -> Job | None:
        """The running job, or the last one (its outcome stays on the page)."""
        return self._job

    def busy(self) -> Job | None:
        job = self._job
        return job if job is not None and job.running else None

    def check_idle(self) -> None:
        job = self.busy()
        if job is not None:
            raise CavError(f"a training is already running ('{job.run.name}'): one at a time per server; "
                           "wait for it to finish or stop it, then start again")

    def start(self, run: Path, args: list[str]) -> Job:
        """Start ``cav train ARGS --quiet`` for ``run``; refused while another training runs."""
        with self._lock:
            self.check_idle()
            self.logs.mkdir(parents=True, exist_ok=True)
            stderr = self.logs / f"{Path(run).name}-{time.strftime('%Y%m%d-%H%M%S')}.stderr"
            argv = [sys.executable, "-m", "cav.ui.child", "train", *args, "--quiet"]
            with open(stderr, "w") as err:
                # own session: a Ctrl-C at the server's terminal reaches the server, which stops the child itself
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True, env={**os.environ, STOP_FILE: str(
                                            stderr.with_suffix(".stop"))})
            self._job = Job(Path(run), argv, proc, stderr)
            return self._job

    def stop(self) -> str:
        """SIGINT, as Ctrl-C: cav checkpoints the last completed step and exits 130 (resumable)."""
        job = self.busy()
        if job is None:
            raise CavError("no training is running: nothing to stop")
        if job.stop_requested:  # asked twice: end it now (a checkpoint written so far stays)
            job.proc.kill()
            job.proc.wait()
            return job.message()
        job.stop_requested = True
        job.stop_file.touch()  # first: a SIGINT that reaches the child before it turns Ctrl-C back on is lost
        job.proc.send_signal(signal.SIGINT)
        return job.message()

    def close(self, timeout: float = 60.0) -> None:
        """On server shutdown: stop the running training (checkpointed), killing it only if it does not exit."""
        job = self.busy()
        if job is None:
            return
        job.proc.send_signal(signal.SIGINT)
        try:
            job.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()


class GridJobs:
    """The server's one generation grid at a time, in a child process (``grid.py``) that Stop ends at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def run(self, spec: Path) -> tuple[int, str]:
        """Run the grid of ``spec`` to its end (or its Stop): (exit code, last stderr line)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                raise CavError("a generation is already running: one at a time per server; wait for it or stop it")
            self.stopped = False
            stderr = Path(spec).with_suffix(".stderr")
            with open(stderr, "w") as err:
                self.proc = subprocess.Popen([sys.executable, "-m", "cav.ui.child", "grid", str(spec)],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True)
        rc = self.proc.wait()
        lines = [x for x in stderr.read_text(errors="replace").splitlines() if x.strip()]
        said = next((x for x in reversed(lines) if x.startswith("cav: error:")), lines[-1] if lines else "")
        stderr.unlink(missing_ok=True)
        return rc, said

    def stop(self) -> str:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise CavError("no generation is running: nothing to stop")
        self.stopped = True
        proc.terminate()
        return "stopping the generation"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
