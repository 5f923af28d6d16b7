"""A Generate-tab grid, run in a child process (``python -m cav.ui.child grid SPEC.json``) so Stop can end it at any
moment: one ``cav.api.generate`` per cell, written under ``--runs/generations/<stamp>/`` beside the request
(``grid.json``), where the Runs tab lists it after the server is gone.

The base and motion adapter are the server's (``recorded=False``): an adapter's ``cav.json`` is data, never a path
or hub id that loading follows.
"""

from __future__ import annotations

import json
from pathlib import Path

SPEC = "grid.json"


def run(spec_file: str | Path) -> int:
    from .. import api

    spec = json.loads(Path(spec_file).read_text())
    for cell in spec["cells"]:
        api.generate(spec["prompt"], [(a, w) for a, w in zip(spec["adapters"], cell["weights"])],
                     image_loras=[tuple(x) for x in spec["image_loras"]], base=spec["base"], recorded=False,
                     frames=spec["frames"], steps=spec["steps"], guidance=spec["guidance"], seed=cell["seed"],
                     out=Path(spec_file).parent / cell["file"], negative_prompt=spec["negative_prompt"], quiet=True,
                     motion_adapter=spec["motion_adapter"])
    return 0
