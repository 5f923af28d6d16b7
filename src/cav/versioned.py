"""The format version of cav's own records, and the one reader every reader of them goes through.

Four files outlive the cav that wrote them: an adapter's ``cav.json`` (kind, base, family, prompt, step, ...),
a checkpoint's ``state.json`` (the trainer state beside ``state.safetensors``), a run's ``data.json`` (the
clips it trained on) and every recipe, ``config.yaml`` (a run's own, the shipped ones, the user's: YAML, read by
``config.load_recipe`` through ``upgrade``). Each is written with ``format_version`` as its first key. ``read``
(JSON) and ``upgrade`` (a record already parsed) return the record without that key, in the shape this cav writes:
a file from before versions existed (no key) is version 1; an older version is upgraded in memory one step at a
time (``UPGRADES``), so code past the reader sees one shape; a file from a newer cav is refused with one line,
rather than half-understood.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import CavError
from .io_utils import write_json

KEY = "format_version"
# the version this cav writes, per file name; version 1 is the shape every file had before versions existed
CURRENT = {"cav.json": 1, "state.json": 1, "data.json": 1, "config.yaml": 2}
# (file name, version v) → the function that turns a version-v record into version v + 1. When a file's shape
# changes, its CURRENT goes up by one and the step from the old shape is added here. One step so far, added by
# cav.config where the recipe's shape is defined (this module imports nothing of cav's above it):
#   ("config.yaml", 1) → config.nest: a recipe's flat keys (``t_lora_rank: 4``) into sections (``motion: {rank: 4}``)
UPGRADES: dict[tuple[str, int], Callable[[dict], dict]] = {}


def write(path: str | Path, record: dict) -> Path:
    """Write ``record`` (atomically) as the current version of the file ``path`` names."""
    path = Path(path)
    return write_json(path, {KEY: CURRENT[path.name], **record})


def read(path: str | Path) -> dict:
    """The record in ``path`` in the current shape, without its version key."""
    path = Path(path)
    return upgrade(path.name, json.loads(path.read_text()), path)


def upgrade(name: str, record: dict, path: str | Path) -> dict:
    """``record`` (read from ``path``, a file of kind ``name``) in the current shape, without its version key."""
    record = dict(record)
    version, current = record.pop(KEY, 1), CURRENT[name]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CavError(f"'{path}' has {KEY} {version!r}, not a version cav writes: restore the file cav wrote")
    if version > current:
        raise CavError(f"'{path}' was written by a newer cav ({name} format {version}, this cav reads up to "
                       f"{current}): upgrade cav")
    for step in range(version, current):
        record = UPGRADES[(name, step)](record)
    return record

