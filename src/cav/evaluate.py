"""Score generated videos: text alignment, temporal consistency, diversity, motion fidelity and toy-world truth.

Metrics (``evaluate`` returns the mean over videos at the top level and per-video values under ``videos``):

* ``text_alignment`` (higher is better): CLIPScore x 100 of each frame vs the prompt (``cav.metrics.clip_score``);
* ``temporal_consistency`` (lower is better): LPIPS between consecutive frames (``cav.metrics.lpips``);
* ``diversity`` (higher is better, set-level only, 2+ videos): mean LPIPS over all pairs of videos;
* ``motion_fidelity`` (higher is better, needs a reference): point-track similarity (``cav.metrics.motion``);
* toy world, when the prompt is a toy caption ("a red circle moving left on a black background"):
  ``prompt_accuracy`` (fraction whose colour and shape match the prompt), and with a toy reference video
  ``motion_error`` (lower is better; centroid displacement error as a fraction of the frame) and
  ``appearance_leakage`` (fraction showing the reference's colour or shape where the prompt asks for another).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cav.data import toyworld as tw
from cav.data.video import IMAGE_SUFFIXES, _natural_key, read_video
from cav.errors import CavError
from cav.metrics import toy as mt
from cav.metrics.clip_score import DEFAULT_CLIP, ClipScorer
from cav.metrics.lpips import LPIPS
from cav.metrics.motion import motion_fidelity

METRICS = (
    "text_alignment",
    "temporal_consistency",
    "diversity",
    "motion_fidelity",
    "motion_error",
    "appearance_leakage",
    "prompt_accuracy",
)
LPIPS_METRICS = ("temporal_consistency", "diversity")
DEFAULT_LPIPS = "~/.cache/cav/lpips_alex.safetensors"  # used when neither --lpips nor $CAV_LPIPS is given
TOY_BACKGROUND_TOL = 30.0  # RGB distance from a toy background colour under which a border counts as toy
_FALLBACK_SIZE = (256, 256)
_TOY_PROMPT = re.compile(
    rf"a ({'|'.join(tw.COLOURS)}) ({'|'.join(tw.SHAPES)}) ({'|'.join(map(re.escape, tw.MOTION_PHRASES.values()))})"
    rf" on an? ({'|'.join(tw.BACKGROUNDS)}) background"
)


def default_lpips_path() -> Path:
    """``$CAV_LPIPS`` or ``~/.cache/cav/lpips_alex.safetensors``."""
    return Path(os.environ.get("CAV_LPIPS") or DEFAULT_LPIPS).expanduser()


def parse_toy_prompt(prompt: str) -> tw.ToySpec | None:
    """The ToySpec of a toy-world caption (``toyworld.caption``; case, spacing and a final '.' ignored), else None."""
    m = _TOY_PROMPT.fullmatch(" ".join(prompt.lower().split()).rstrip("."))
    if m is None:
        return None
    colour, shape, phrase, background = m.groups()
    motion = next(k for k, v in tw.MOTION_PHRASES.items() if v == phrase)
    return tw.ToySpec(shape, colour, background, motion)


def native_size(path: str | Path) -> tuple[int, int]:
    """Displayed (H, W) of a video's first frame or a folder's first image; 256x256 if unreadable."""
    import av
    from PIL import Image

    p = Path(path)
    try:
        if p.is_dir():
            files = [f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
            with Image.open(min(files, key=lambda f: _natural_key(f.name))) as im:
                w, h = im.size
                turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        else:
            with av.open(str(p)) as container:
                frame = next(container.decode(video=0))
                w, h, turned = frame.width, frame.height, round(frame.rotation / 90) % 2 == 1
        return (w, h) if turned else (h, w)
    except Exception:  # noqa: BLE001 - read_video reports what is wrong with the file
        return _FALLBACK_SIZE


def load_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file or image folder, at its native size."""
    return read_video(path, frames=None, size=native_size(path))


def is_toy_video(video: np.ndarray) -> bool:
    """A plain toy background colour at the border and an object in every frame."""
    bg = mt.background_colour(video)
    if min(np.linalg.norm(bg - np.array(tw.RGB[b])) for b in tw.BACKGROUNDS) > TOY_BACKGROUND_TOL:
        return False
    return bool(mt.object_mask(video).any(axis=(1, 2)).all())


def _toy_track(video: np.ndarray, frames: int) -> np.ndarray:
    """Object centroid (frames, 2) as a fraction of the frame width/height, resampled to ``frames`` frames."""
    tr = mt.track(video) / np.array([video.shape[2], video.shape[1]])
    t = np.linspace(0, 1, len(tr))
    return np.stack([np.interp(np.linspace(0, 1, frames), t, tr[:, k]) for k in range(2)], axis=1)


def _target_spec(prompt: str, toy_spec: dict | None) -> tw.ToySpec | None:
    if toy_spec is None:
        return parse_toy_prompt(prompt)
    try:
        return tw.ToySpec(**toy_spec)
    except TypeError as e:
        raise CavError(f"toy_spec {toy_spec} is invalid ({e}): give shape, colour, background and motion") from None


def evaluate(
    videos: Sequence[str | Path],
    prompt: str,
    reference: str | Path | None = None,
    clip: str | None = DEFAULT_CLIP,
    lpips: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    toy_spec: dict | None = None,
) -> dict:
    """Score ``videos`` (paths) generated for ``prompt``, optionally against the ``reference`` video they imitate.

    ``clip``: CLIP folder or hub id (None: no text alignment). ``lpips``: LPIPS weights file (None: ``$CAV_LPIPS`` or
    ``~/.cache/cav/lpips_alex.safetensors``). ``metrics``: names from ``METRICS``; None = every metric whose inputs
    and weights are available (missing weights are skipped with a warning on stderr, and a hub id is only looked up
    in the Hugging Face cache); a named metric that cannot be computed raises CavError. ``toy_spec``: the toy-world
    spec the prompt asks for (ToySpec fields), instead of parsing the prompt.

    Returns ``{metric: mean, ..., "videos": [{"path": ..., metric: value, ...}, ...]}`` with plain floats;
    ``diversity`` is set-level (top level only).
    """
    named = metrics is not None
    wanted = list(METRICS) if metrics is None else list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise CavError(f"unknown metric '{unknown[0]}': use one or more of {', '.join(METRICS)}")
    paths = [str(p) for p in videos]
    if not paths:
        raise CavError("no videos given: pass at least one video to evaluate")
    clips = [load_video(p) for p in paths]
    ref = load_video(reference) if reference is not None else None
    target = _target_spec(prompt, toy_spec)

    def drop(names: Sequence[str], reason: str, warn: bool = False) -> None:
        names = [n for n in names if n in wanted]
        if named and names:
            raise CavError(f"cannot compute {names[0]}: {reason}")
        if warn and names:
            print(f"cav: warning: skipping {', '.join(names)}: {reason}", file=sys.stderr)
        wanted[:] = [n for n in wanted if n not in names]

    if ref is None:
        drop(("motion_fidelity", "motion_error", "appearance_leakage"), "no reference video: pass --reference REF")
    if len(clips) < 2:
        drop(("diversity",), "it needs at least 2 videos: pass two or more videos")
    if target is None:
        drop(
            ("motion_error", "appearance_leakage", "prompt_accuracy"),
            "the prompt is not a toy-world caption: use one like 'a red circle moving left on a black background'",
        )
    elif ref is not None and not is_toy_video(ref):
        drop(("motion_error", "appearance_leakage"), f"reference '{reference}' is not a toy-world video: pass one")

    scorer = lp = None
    if "text_alignment" in wanted:
        if clip is None:
            drop(("text_alignment",), "no CLIP model given: pass --clip PATH to a local CLIP folder")
        else:
            try:
                scorer = ClipScorer(clip, local_only=not named)
            except CavError as e:
                drop(("text_alignment",), str(e), warn=True)
    if any(n in wanted for n in LPIPS_METRICS):
        try:
            lp = LPIPS(lpips if lpips is not None else default_lpips_path())
        except CavError as e:
            drop(LPIPS_METRICS, str(e), warn=True)

    if ref is not None and target is not None and "appearance_leakage" in wanted:
        ref_colour, ref_shape = mt.classify_colour(ref), mt.classify_shape(ref)
    per_video = []
    for path, v in zip(paths, clips):
        row: dict = {"path": path}
        if "text_alignment" in wanted:
            row["text_alignment"] = scorer.score(v, prompt)
        if "temporal_consistency" in wanted:
            row["temporal_consistency"] = lp.temporal_consistency(v)
        if "motion_fidelity" in wanted:
            row["motion_fidelity"] = motion_fidelity(v, ref)
        if "motion_error" in wanted:
            row["motion_error"] = mt.motion_error(_toy_track(v, len(ref)), _toy_track(ref, len(ref)), 1.0)
        if "appearance_leakage" in wanted or "prompt_accuracy" in wanted:
            colour, shape = mt.classify_colour(v), mt.classify_shape(v)
        if "appearance_leakage" in wanted:
            leak_colour = ref_colour != target.colour and colour == ref_colour
            leak_shape = ref_shape != target.shape and shape == ref_shape
            row["appearance_leakage"] = float(leak_colour or leak_shape)
        if "prompt_accuracy" in wanted:
            row["prompt_accuracy"] = float(colour == target.colour and shape == target.shape)
        per_video.append(row)

    out: dict = {}
    for name in wanted:
        if name == "diversity":
            out[name] = lp.diversity(clips)
        else:
            out[name] = float(np.mean([row[name] for row in per_video]))
    out["videos"] = per_video
    return out
