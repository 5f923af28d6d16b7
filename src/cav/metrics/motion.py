"""Motion fidelity between a generated and a reference video from OpenCV point tracks (no model weights).

Tracks: Shi-Tomasi corners (``cv2.goodFeaturesToTrack``) on the first frame, followed frame to frame with pyramidal
Lucas-Kanade (``cv2.calcOpticalFlowPyrLK``) on greyscale frames resized to a short side of ``SIDE`` px. A point is
dropped when LK loses it, when tracking it back lands more than ``FB_TOL`` px away, or when it leaves the frame.

A tracklet is a track's displacement from its start, divided by the frame width/height, flattened over frames
(both videos are first resampled to the same frame count). Similarity of two tracklets: cosine; a tracklet whose
largest displacement is under ``STATIC`` (fraction of the frame) is static, and static vs static scores 1,
static vs moving 0.

``motion_fidelity`` = mean of (mean over reference tracklets of the best similarity among generated tracklets) and
the same the other way round: 1 = same motion, about -1 = opposite motion. It is undefined (``Undefined``) when a
video has fewer than 2 frames or no point can be tracked through it (noise, a flat image): no motion is compared
there, and a number would read as a score. Needs texture: flat shapes with round
edges (toy circles) give few or no corners, so use ``cav.metrics.toy`` ground truth for toy-world clips.
"""

from __future__ import annotations

import cv2
import numpy as np

from cav.errors import CavError
from cav.metrics import Undefined

SIDE = 256  # frames are resized to this short side before tracking
MAX_POINTS = 200  # corners detected on the first frame, at most
STATIC = 0.01  # largest displacement (fraction of frame size) under which a tracklet is static
FB_TOL = 2.0  # px (at SIDE scale): forward-backward tracking error above which a point is dropped
_LK = dict(winSize=(21, 21), maxLevel=3, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))


def _check(video: np.ndarray) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3 or len(v) < 1 or v.dtype != np.uint8:
        raise CavError(f"video has shape {v.shape} and dtype {v.dtype}: pass a uint8 (frames, height, width, 3) array")
    return v


def tracks(video: np.ndarray) -> np.ndarray:
    """(N, F, 2) float (x, y) positions, in the video's pixels, of the points tracked through every frame."""
    v = _check(video)
    _, h, w, _ = v.shape
    k = SIDE / min(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    grey = [cv2.cvtColor(cv2.resize(f, size, interpolation=interp), cv2.COLOR_RGB2GRAY) for f in v]
    p = cv2.goodFeaturesToTrack(grey[0], maxCorners=MAX_POINTS, qualityLevel=0.01, minDistance=SIDE / 64, blockSize=7)
    if p is None:
        return np.zeros((0, len(v), 2))
    p = p.reshape(-1, 1, 2).astype(np.float32)
    path, alive = [p], np.ones(len(p), bool)
    for a, b in zip(grey[:-1], grey[1:]):
        nxt, ok, _ = cv2.calcOpticalFlowPyrLK(a, b, p, None, **_LK)
        back, ok_back, _ = cv2.calcOpticalFlowPyrLK(b, a, nxt, None, **_LK)
        inside = ((nxt >= 0) & (nxt <= np.array(size, np.float32))).all(axis=(1, 2))
        fb = np.linalg.norm((back - p).reshape(-1, 2), axis=1) < FB_TOL
        alive &= ok.ravel().astype(bool) & ok_back.ravel().astype(bool) & inside & fb
        path.append(nxt)
        p = nxt
    out = np.concatenate(path, axis=1)[alive].astype(np.float64)  # (N, F, 2) at the resized scale
    return out * np.array([w / size[0], h / size[1]])


def tracklets(video: np.ndarray, what: str = "video") -> np.ndarray:
    """(N, 2F) displacement tracklets (positions minus start, over frame width/height); ``Undefined`` if N = 0."""
    v = _check(video)
    t = tracks(v)
    if not len(t):
        raise Undefined(f"no point of the {what} could be tracked through its frames (noise, a flat image or a cut)")
    d = (t - t[:, :1]) / np.array([v.shape[2], v.shape[1]])
    return d.reshape(len(d), -1)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarity of tracklets; static vs static = 1, static vs moving = 0."""
    moving_a, moving_b = (np.linalg.norm(t.reshape(len(t), -1, 2), axis=2).max(axis=1) >= STATIC for t in (a, b))
    na = np.where(moving_a[:, None], a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12), 0)
    nb = np.where(moving_b[:, None], b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12), 0)
    return np.where(~moving_a[:, None] & ~moving_b[None, :], 1.0, na @ nb.T)


def motion_fidelity(generated: np.ndarray, reference: np.ndarray) -> float:
    """Symmetric best-match tracklet similarity (1 = same motion); the longer video is resampled to fewer frames."""
    g, r = _check(generated), _check(reference)
    n = min(len(g), len(r))
    if n < 2:
        raise Undefined(f"the {'generated video' if len(g) < 2 else 'reference'} has {n} frame: no motion to compare")
    g, r = (v[np.linspace(0, len(v) - 1, n).round().astype(int)] for v in (g, r))
    s = similarity(tracklets(r, "reference"), tracklets(g, "generated video"))
    return float((s.max(axis=1).mean() + s.max(axis=0).mean()) / 2)
