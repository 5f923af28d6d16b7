"""`cav train --clips FILE`: the clips of one motion and their spatial prompts from a small manifest, instead of
positional clips and one ``--spatial-prompt`` per clip (issue 12: "--spatial-prompt repeated, or a manifest").

The file is a CSV with a header or a YAML list of mappings; each row has ``clip`` (a video or a folder of images,
relative paths starting at the manifest's folder) and optionally ``spatial_prompt`` (every row or none). Rows keep
their order: row 1 is clip 1 (its absorbers in ``absorbers/``, its TI token ``<cav>``), and so on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import yaml

from .config import TrainConfig
from .errors import CavError

COLUMNS = ("clip", "spatial_prompt")


def read_clips(path: str | Path) -> tuple[list[Path], list[str]]:
    """(clips, spatial prompts) of the manifest, in row order; the prompts list is empty when no row gives one."""
    path = Path(path)
    if not path.is_file():
        raise CavError(f"--clips '{path}' does not exist: pass a .csv or .yaml file with a clip column")
    rows = _rows(path)
    if not rows:
        raise CavError(f"--clips '{path}' has no rows: add one row per clip (clip, spatial_prompt)")
    clips = [_clip(path, line, row) for line, row in rows]
    prompts = [str(row.get("spatial_prompt") or "").strip() for _, row in rows]
    if any(prompts) and not all(prompts):
        line = next(n for (n, _), p in zip(rows, prompts) if not p)
        raise CavError(f"--clips '{path}' line {line}: spatial_prompt is empty: give every clip its spatial prompt, "
                       "or none")
    return clips, prompts if any(prompts) else []


def _rows(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in reader.fieldnames or []]
        _check_keys(path, 1, header)
        rows = [(reader.line_num, {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None})
                for raw in reader]
        return [(n, r) for n, r in rows if any(r.values())]
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            node, data = yaml.compose(text), yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CavError(f"--clips '{path}' is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from None
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise CavError(f"--clips '{path}' must be a YAML list of rows, each a mapping with clip and "
                           "spatial_prompt")
        rows = [(item.start_mark.line + 1, value) for item, value in zip(node.value, data)]
        for n, row in rows:
            _check_keys(path, n, list(row))
        return rows
    raise CavError(f"--clips '{path}' has an unknown type: use a .csv or .yaml file")


def _check_keys(path: Path, line: int, keys: list[str]) -> None:
    unknown = [k for k in keys if k not in COLUMNS]
    if "clip" not in keys or unknown:
        raise CavError(f"--clips '{path}' line {line}: the fields are clip and (optionally) spatial_prompt"
                       + (f", not {', '.join(map(str, unknown))}" if unknown else ", and clip is missing"))


def _clip(manifest: Path, line: int, row: dict) -> Path:
    text = str(row.get("clip") or "").strip()
    if not text:
        raise CavError(f"--clips '{manifest}' line {line}: clip is empty: give a video file or a folder of images")
    clip = Path(text).expanduser()
    clip = clip if clip.is_absolute() else manifest.parent / clip
    if not clip.exists():
        raise CavError(f"--clips '{manifest}' line {line}: clip '{text}' does not exist (looked at {clip.resolve()}): "
                       "relative paths start at the manifest's folder")
    return clip.resolve()


def apply(manifest: str | Path, videos: list[str], cfg: TrainConfig, spatial_flags: bool) -> tuple[list, TrainConfig]:
    """The clips to train on and the recipe with the manifest's spatial prompts (``spatial_flags``: --spatial-prompt
    was given as a flag too)."""
    if videos:
        raise CavError("the clips are given twice: pass them as arguments or with --clips FILE, not both")
    clips, prompts = read_clips(manifest)
    if prompts and spatial_flags:
        raise CavError("the spatial prompts are given twice: drop --spatial-prompt (the --clips file has them) or the "
                       "file's spatial_prompt column")
    return clips, dataclasses.replace(cfg, spatial_prompt=prompts) if prompts else cfg
