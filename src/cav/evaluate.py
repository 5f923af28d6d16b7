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
from cav.metrics import Undefined, shown
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
NEEDS = {  # what each metric needs, for the error when none could be computed
    "text_alignment": "CLIP weights (--clip DIR)",
    "temporal_consistency": "LPIPS weights (--lpips FILE)",
    "diversity": "LPIPS weights and 2+ videos",
    "motion_fidelity": "--reference VIDEO",
    "motion_error": "a toy-world caption as --prompt and a toy --reference",
    "appearance_leakage": "a toy-world caption as --prompt and a toy --reference",
    "prompt_accuracy": "a toy-world caption as --prompt",
}
WEIGHTS_DOC = "docs/METRICS.md"
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
    ``diversity`` is set-level (top level only). A metric undefined for a video (``cav.metrics.Undefined``: one frame,
    a still, nothing trackable, no object) is None there, with the reason in the row's ``notes``; the top-level value
    is the mean over the videos where it is defined (None if none), with a ``notes`` entry. Raises CavError when no
    metric can be computed at all (missing weights and inputs), naming what each needs.
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
    skipped: list[tuple[list[str], str, bool]] = []  # (metrics, reason, warn): reported once the outcome is known

    def drop(names: Sequence[str], reason: str, warn: bool = False) -> None:
        names = [n for n in names if n in wanted]
        if named and names:
            raise CavError(f"cannot compute {names[0]}: {reason}")
        if names:
            skipped.append((names, reason, warn))
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
    if not wanted:
        raise CavError(nothing_measured([n for names, _, _ in skipped for n in names]))
    for names, reason, warn in skipped:
        if warn:
            print(f"cav: warning: skipping {', '.join(names)}: {reason}", file=sys.stderr)

    per_video = [_score_video(path, v, prompt, ref, target, wanted, scorer, lp) for path, v in zip(paths, clips)]
    out: dict = {}
    notes: dict = {}
    for name in wanted:
        if name == "diversity":
            out[name] = lp.diversity(clips)
            continue
        values = [row[name] for row in per_video if row[name] is not None]
        out[name] = float(np.mean(values)) if values else None
        undefined = [row["notes"][name] for row in per_video if row[name] is None]
        if undefined and len(per_video) == 1:
            notes[name] = undefined[0]
        elif undefined:
            rest = "; the value is the mean of the others" if values else ""
            notes[name] = f"undefined for {len(undefined)} of {len(per_video)} videos ({undefined[0]}){rest}"
    if notes:
        out["notes"] = notes
    out["videos"] = per_video
    return out


def _score_video(path: str, v: np.ndarray, prompt: str, ref, target, wanted: list[str], scorer, lp) -> dict:
    """One video's row: a value per wanted metric (None where undefined, with the reason under ``notes``)."""
    row: dict = {"path": path}
    notes: dict = {}
    has_object = target is not None and bool(mt.object_mask(v).any())

    def measure(name: str, fn) -> None:
        if name not in wanted:
            return
        try:
            row[name] = float(fn())
        except Undefined as e:
            row[name], notes[name] = None, str(e)

    def toy_motion() -> float:
        if min(len(v), len(ref)) < 2:
            raise Undefined(f"the {'video' if len(v) < 2 else 'reference'} has 1 frame: no motion to compare")
        if not has_object:
            raise Undefined("no object found in the video: its motion cannot be measured")
        return mt.motion_error(_toy_track(v, len(ref)), _toy_track(ref, len(ref)), 1.0)

    def leakage() -> float:
        if not has_object:
            raise Undefined("no object found in the video: nothing to show the reference's appearance")
        colour, shape = mt.classify_colour(v), mt.classify_shape(v)
        ref_colour, ref_shape = mt.classify_colour(ref), mt.classify_shape(ref)
        leak_colour = ref_colour != target.colour and colour == ref_colour
        leak_shape = ref_shape != target.shape and shape == ref_shape
        return leak_colour or leak_shape

    def accuracy() -> float:  # no object: the video does not show what the prompt asks for (a measured 0)
        return has_object and mt.classify_colour(v) == target.colour and mt.classify_shape(v) == target.shape

    measure("text_alignment", lambda: scorer.score(v, prompt))
    measure("temporal_consistency", lambda: lp.temporal_consistency(v))
    measure("motion_fidelity", lambda: motion_fidelity(v, ref))
    measure("motion_error", toy_motion)
    measure("appearance_leakage", leakage)
    measure("prompt_accuracy", accuracy)
    if notes:
        row["notes"] = notes
    return row


def nothing_measured(metrics: Sequence[str]) -> str:
    """The one-line error when no metric could be computed: what each needs and where to get the weights."""
    by_need: dict[str, list[str]] = {}
    for m in sorted(metrics, key=METRICS.index):
        by_need.setdefault(NEEDS[m], []).append(m)
    parts = [f"{', '.join(ms)} need{'s' if len(ms) == 1 else ''} {need}" for need, ms in by_need.items()]
    return f"nothing could be measured: {'; '.join(parts)} (how to get the weights: {WEIGHTS_DOC})"


def format_text(result: dict) -> str:
    """``evaluate``'s result as aligned lines; an undefined metric reads ``n/a (reason)``."""
    notes = result.get("notes", {})
    lines = []
    for name, value in result.items():
        if name in ("videos", "notes"):
            continue
        if value is None:
            lines.append(f"{name:<22} {shown(None, why=notes.get(name, 'undefined'))}")
        else:
            lines.append(f"{name:<22} {shown(value, 4)}" + (f"  ({notes[name]})" if name in notes else ""))
    return "\n".join(lines)
