"""A run folder has one owner: the process training it holds an exclusive ``flock`` on ``<run>/.cav.lock``.

The kernel drops the lock when its holder exits (also on a kill or a crash), so a lock is never stale and nobody has
to clean it up. Anything that would change or delete a run (a second ``cav train`` into the same ``--out``, the web
app's Delete, ``--overwrite``) asks first and is refused with one line while the lock is held, by any process on
this machine (the CLI, the web app's training child, a batch worker).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import CavError

LOCK = ".cav.lock"


class RunLock:
    """``with RunLock(run):`` holds ``run``'s lock for the block (creating the folder if needed); refused with a
    :class:`CavError` naming the folder when another holder has it."""

    def __init__(self, run, tidy: bool = False) -> None:
        """``tidy``: on leaving, remove the lock file (while still holding it) and the folders the lock created when
        they are empty again, so a refused or finished ``cav train`` leaves no trace; a killed holder leaves the
        file, which is harmless (it is not a run's file, and a free lock file is taken over)."""
        self.run = Path(run)
        self.tidy = tidy
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "RunLock":
        self._created = [p for p in (self.run, *self.run.parents) if not p.exists()]
        self.run.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise CavError(busy_message(self.run)) from None
                raise
            if _same_file(fd, self.run / LOCK):
                break
            os.close(fd)  # a tidy holder removed the file between our open and our flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # information for a person; the flock is what counts
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        if self.tidy:  # removed while held: a newcomer either waits on this file (refused) or makes a new one
            (self.run / LOCK).unlink(missing_ok=True)
            for folder in self._created:  # innermost first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not so when a tidy holder removed it meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def held(run) -> bool:
    """Whether some holder (this process included) has ``run``'s lock now. A folder without a lock file is free."""
    path = Path(run) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def refuse_if_held(run, doing: str = "change it") -> None:
    """One line and no change when ``run`` is being trained: ``doing`` says what was refused."""
    if held(run):
        raise CavError(f"run '{run}' is being trained by another process: wait for it to finish or stop it, "
                       f"then {doing}")


def busy_message(run) -> str:
    return (f"'{run}' is being trained by another process: wait for it to finish or stop it, or pass another --out")
