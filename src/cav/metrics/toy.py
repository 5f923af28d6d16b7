"""Ground-truth scorers for toy-world videos (see ``cav.data.toyworld``), robust to noisy generations.

Videos are uint8 (F, H, W, 3) (floats in [0, 1] are accepted too). Centroids are in pixels with
pixel ``(i, j)`` centred at ``(j + 0.5, i + 0.5)``, matching ``toyworld.render``'s truth.
"""

from __future__ import annotations

import cv2
import numpy as np

from cav.data import toyworld as tw
from cav.errors import CavError

MIN_THRESHOLD = 40.0  # smallest colour distance (RGB 0..255) from the background that counts as object
SCALE_WEIGHT = 0.25  # weight of the size-change error in classify_motion


def _as_video(video: np.ndarray) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] < 1:
        raise CavError(f"video has shape {v.shape}: pass a (frames, height, width, 3) array")
    if v.dtype != np.uint8 and v.size and float(np.nanmax(v)) <= 1.0:
        v = v * 255.0
    return np.nan_to_num(v.astype(np.float32))


def background_colour(video: np.ndarray) -> np.ndarray:
    """(3,) median colour of the border pixels of all frames."""
    v = _as_video(video)
    border = np.concatenate([v[:, 0], v[:, -1], v[:, 1:-1, 0], v[:, 1:-1, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def object_mask(video: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """bool (F, H, W): the largest blob per frame of pixels far (Otsu threshold, >= 40) from the background."""
    v = _as_video(video)
    bg = background_colour(v) if background is None else np.asarray(background, dtype=np.float32)
    dist = np.linalg.norm(v - bg, axis=-1)
    d8 = np.clip(dist, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(d8.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    raw = dist > max(float(otsu), MIN_THRESHOLD)
    out = np.zeros_like(raw)
    for f in range(raw.shape[0]):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(raw[f].astype(np.uint8), connectivity=8)
        if n > 1:
            out[f] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return out


def _centroids(mask: np.ndarray) -> np.ndarray:
    """(F, 2) centroid (x, y) per frame; NaN where a frame is empty."""
    _, h, w = mask.shape
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / area
        cy = (mask.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / area
    return np.stack([cx, cy], axis=1)


def _fill(track: np.ndarray, default: tuple[float, float]) -> np.ndarray:
    """Interpolate NaN rows from valid neighbours (hold at the ends); all-NaN -> default."""
    ok = ~np.isnan(track).any(axis=1)
    if not ok.any():
        return np.tile(np.asarray(default, dtype=np.float64), (len(track), 1))
    f = np.arange(len(track))
    return np.stack([np.interp(f, f[ok], track[ok, k]) for k in range(2)], axis=1)


def track(video: np.ndarray) -> np.ndarray:
    """(F, 2) object centroid per frame in pixels; empty frames are interpolated (frame centre if none)."""
    mask = object_mask(video)
    _, h, w = mask.shape
    return _fill(_centroids(mask), (w / 2, h / 2))


def motion_error(track_a: np.ndarray, track_b: np.ndarray, size: int) -> float:
    """Mean distance between displacement tracks (track - track[0]), divided by size. 0 = same motion."""
    a, b = np.asarray(track_a, dtype=np.float64), np.asarray(track_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise CavError(f"tracks have shapes {a.shape} and {b.shape}: pass two (frames, 2) arrays of equal length")
    da, db = a - a[:1], b - b[:1]
    return float(np.linalg.norm(da - db, axis=1).mean() / size)


def _nearest(rgb: np.ndarray, names: tuple[str, ...]) -> str:
    ref = np.array([tw.RGB[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(ref - rgb, axis=1)))]


def classify_background(video: np.ndarray) -> str:
    """Nearest BACKGROUNDS entry to the border median."""
    return _nearest(background_colour(video), tw.BACKGROUNDS)


def classify_colour(video: np.ndarray) -> str:
    """Nearest COLOURS entry to the median object pixel (the median of the whole frame if no object)."""
    v = _as_video(video)
    return _colour(v, object_mask(v))


def _colour(v: np.ndarray, mask: np.ndarray) -> str:
    pixels = v[mask] if mask.any() else v.reshape(-1, 3)
    return _nearest(np.median(pixels, axis=0), tw.COLOURS)


def classify_shape(video: np.ndarray) -> str:
    """Shape whose template (same centroid, same area) best overlaps the mask (IoU), area-weighted over frames."""
    return _shape(object_mask(video))


def _shape(mask: np.ndarray) -> str:
    _, h, w = mask.shape
    size = max(h, w)
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    keep = area >= 4
    if not keep.any():
        return tw.SHAPES[0]
    m, area = mask[keep], area[keep]
    c = _centroids(m)
    # template area as a function of half-size a: circle pi a^2, square 4a^2, triangle 2a^2, diamond 2a^2
    unit = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
    votes = np.zeros(len(tw.SHAPES))
    pad = np.zeros((len(m), size, size), dtype=bool)
    pad[:, :h, :w] = m
    for k, s in enumerate(tw.SHAPES):
        half = np.sqrt(area / unit[s])
        t = tw._masks(np.full(1, k), c[None, :, 0], c[None, :, 1], half[None], size)[0]
        iou = (t & pad).sum(axis=(1, 2)) / np.maximum((t | pad).sum(axis=(1, 2)), 1)
        votes[k] = (iou * area).sum()
    return tw.SHAPES[int(np.argmax(votes))]


def classify_motion(track: np.ndarray, frames: int, size: int, area: np.ndarray | None = None) -> str:
    """Motion (SEEN + HELDOUT) whose trajectory's displacement best matches track.

    Phase only shifts a trajectory's position, so one phase per motion suffices. ``area`` (mask
    area per frame, optional) separates the static-centroid motions: the error then adds
    ``SCALE_WEIGHT`` x mean |observed - true| relative size (sqrt(area / area[0]) vs scale / scale[0]);
    without it, grow and shrink tie and the first (grow) wins.
    """
    tr = np.asarray(track, dtype=np.float64)
    if tr.shape != (frames, 2):
        raise CavError(f"track has shape {tr.shape}, not ({frames}, 2): pass one (x, y) row per frame")
    rel = None
    if area is not None:
        a = np.maximum(np.asarray(area, dtype=np.float64), 1.0)
        rel = np.sqrt(a / a[0])
    best, best_err = tw.MOTIONS[0], np.inf
    for m in tw.MOTIONS:
        traj = tw.trajectory(m, frames)
        err = motion_error(tr, traj[:, :2] * size, size)
        if rel is not None:
            err += SCALE_WEIGHT * float(np.abs(rel - traj[:, 2] / traj[0, 2]).mean())
        if err < best_err:
            best, best_err = m, err
    return best


def score(video: np.ndarray, spec: tw.ToySpec) -> dict:
    """{colour_ok, background_ok, shape_ok, motion_ok: bool, motion_error: float vs spec's true trajectory}."""
    v = _as_video(video)
    frames, size = v.shape[0], v.shape[1]
    mask = object_mask(v)
    tr = _fill(_centroids(mask), (v.shape[2] / 2, size / 2))
    truth = tw.trajectory(spec.motion, frames, spec.phase)[:, :2] * size
    return {
        "colour_ok": _colour(v, mask) == spec.colour,
        "background_ok": classify_background(v) == spec.background,
        "shape_ok": _shape(mask) == spec.shape,
        "motion_ok": classify_motion(tr, frames, size, area=mask.sum(axis=(1, 2))) == spec.motion,
        "motion_error": motion_error(tr, truth, size),
    }


def appearance(video: np.ndarray) -> tuple[str, str, str]:
    """The video's classified (colour, shape, background)."""
    v = _as_video(video)
    mask = object_mask(v)
    return _colour(v, mask), _shape(mask), classify_background(v)


def appearance_ok(video: np.ndarray, spec: tw.ToySpec) -> bool:
    """Whether the video's classified colour, shape AND background are ``spec``'s (the prompt's appearance)."""
    return appearance(video) == (spec.colour, spec.shape, spec.background)


def score_videos(reference: np.ndarray, videos, specs: list[tw.ToySpec]) -> tuple[list[float], list[bool]]:
    """Per video: motion error against the reference's track (normalised by frame size), and whether its colour,
    shape and background follow its own spec (the prompt)."""
    ref_track, size = track(reference), reference.shape[1]
    errors = [motion_error(track(v), ref_track, size) for v in videos]
    follows = [appearance_ok(v, s) for v, s in zip(videos, specs)]
    return errors, follows


def frame_leakage(video: np.ndarray, reference: tw.ToySpec, target: tw.ToySpec) -> float:
    """Fraction of frames that show the reference's appearance where the prompt (``target``) asks for another: the
    frame's object colour or shape, or its background, classified as the reference's and not the target's.

    Each frame is classified on its own (its own border median, object blob and shape vote), so a video that is right
    on the whole but shows the reference in its first or last frames is caught here and not by ``appearance_ok``.
    """
    v = _as_video(video)
    leaks = 0
    for frame in v:
        one = frame[None]
        mask = object_mask(one)
        colour, shape, background = _colour(one, mask), _shape(mask), classify_background(one)
        leaks += ((reference.colour != target.colour and colour == reference.colour)
                  or (reference.shape != target.shape and shape == reference.shape)
                  or (reference.background != target.background and background == reference.background))
    return leaks / len(v)


PALETTE_DISTANCE = 40.0  # RGB distance within which a pixel counts as one of the toy world's colours
TOY_PALETTE_SHARE = 0.9  # share of such pixels a toy-world clip has (≥ 0.97 on 80 rendered, mp4-encoded clips)


def not_toy_world(video: np.ndarray) -> str | None:
    """Why the ground-truth scorers do not apply to ``video`` (None: it looks like a toy-world clip).

    The scorers track the largest blob that differs from the border colour: on a real clip that is some patch of
    the scene, and a number from it would read as a motion score. A toy-world clip is a flat background and one flat
    shape, both from the world's palette, so nearly all of its pixels are palette colours (measured ≥ 97 % after mp4
    encoding and resizing; a real clip, e.g. tests/data/man-skiing-64.mp4 at 32 px: 49 %; noise: 12 %).
    """
    v = _as_video(video)
    palette = np.array([tw.RGB[n] for n in tw.COLOURS + tw.BACKGROUNDS], dtype=np.float32)
    nearest = np.full(v.shape[:-1], np.inf, dtype=np.float32)
    for rgb in palette:  # one colour at a time: small memory for long clips
        nearest = np.minimum(nearest, np.linalg.norm(v - rgb, axis=-1))
    share = float((nearest < PALETTE_DISTANCE).mean())
    if share >= TOY_PALETTE_SHARE:
        return None
    return (f"the reference is not a toy-world clip ({share:.0%} of its pixels are toy-world colours, a toy clip has "
            f"≥ {TOY_PALETTE_SHARE:.0%})")
