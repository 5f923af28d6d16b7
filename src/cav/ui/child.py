"""The child processes the web app starts: ``cav`` itself (``python -m cav.ui.child train ...``) or a Generate-tab
grid (``python -m cav.ui.child grid SPEC.json``, ``grid.py``), with Ctrl-C turned back on.

A server started in the background (``cav ui &``, CI) inherits SIGINT ignored and would pass that on, so the app's
Stop button (SIGINT, which cav answers by checkpointing the last step and exiting 130) would do nothing; and a Stop that comes before this child has turned Ctrl-C back on would be lost, so Stop first
writes the file named by ``CAV_STOP_FILE``, which the child reads once its handler is on.
"""

from __future__ import annotations

import os
import signal
import sys

STOP_FILE = "CAV_STOP_FILE"  # the environment variable naming the file Stop writes before its SIGINT


def main() -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = os.environ.get(STOP_FILE)
    if stop and os.path.exists(stop):  # stopped before Ctrl-C was on: as cav answers Ctrl-C before its first step
        return 130
    if sys.argv[1:2] == ["grid"]:
        from ..errors import CavError
        from .grid import run

        try:
            return run(sys.argv[2])
        except CavError as exc:
            print(f"cav: error: {exc}", file=sys.stderr)
            return 2
    from ..cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
