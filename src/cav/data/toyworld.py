"""The toy world: procedural videos of one coloured shape moving on a plain background.

Every clip is rendered with hard (alias-free) masks evaluated at pixel centres, so the
ground truth (mask, centroid, scale) is exact. Coordinates: a frame spans ``[0, size]`` in
x and y (y down); pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``. Trajectories are
normalised (divide pixels by ``size``).

``phase`` only shifts a trajectory's position (by at most ``PHASE_SHIFT``), never its shape,
so a motion's displacement track (``track - track[0]``) is the same for every phase, shape,
colour, background and scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cav.errors import CavError

SHAPES = ("circle", "square", "triangle", "diamond")
# RGB distances (0..255): object vs background >= 137, object vs object >= 138, background vs
# background >= 99, so the object threshold and nearest-colour lookups are unambiguous.
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
BACKGROUNDS = ("black", "grey", "navy", "brown")
RGB = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (245, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 225, 225),
    "white": (245, 245, 245),
    "black": (0, 0, 0),
    "grey": (105, 105, 105),
    "navy": (15, 15, 100),
    "brown": (95, 55, 20),
}
SEEN_MOTIONS = ("left", "right", "up", "down", "diagonal", "orbit", "bounce", "grow", "shrink")
HELDOUT_MOTIONS = ("zigzag", "figure8", "spiral")
MOTIONS = SEEN_MOTIONS + HELDOUT_MOTIONS
MOTION_PHRASES = {
    "left": "moving left",  # right -> left
    "right": "moving right",  # left -> right
    "up": "moving up",  # bottom -> top
    "down": "moving down",  # top -> bottom
    "diagonal": "moving diagonally",  # top-left -> bottom-right
    "orbit": "orbiting",  # one clockwise turn around a circle, starting at its top
    "bounce": "bouncing",  # in place: two bounces up from the floor and back
    "grow": "growing",  # centroid static, size x0.7 -> x1.5
    "shrink": "shrinking",  # centroid static, size x1.5 -> x0.7
    "zigzag": "moving in a zigzag",  # left -> right while going up/down/up
    "figure8": "moving in a figure eight",  # one lemniscate loop from the centre
    "spiral": "moving in a spiral",  # 1.5 clockwise turns inward, from the right to the centre
}
SCALE_RANGE = (0.28, 0.36)  # sample_specs draws object sizes from here
MAX_SCALE = 0.36  # largest object size (fraction of frame side) that always stays in frame
PHASE_SHIFT = 0.03  # largest position shift (fraction of frame side) that phase applies
_SHAPE_ID = {s: k for k, s in enumerate(SHAPES)}


def _check(kind: str, name: object, allowed: tuple[str, ...]) -> None:
    if name not in allowed:
        raise CavError(f"unknown {kind} {name!r}: use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ToySpec:
    """One toy clip: what is drawn and how it moves."""

    shape: str
    colour: str
    background: str
    motion: str
    scale: float = 0.3  # object size (bounding box side) as a fraction of the frame side
    phase: float = 0.0  # in [0, 1): small shift of the trajectory's position

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("background", self.background, BACKGROUNDS)
        _check("motion", self.motion, MOTIONS)
        if not 0.05 <= float(self.scale) <= MAX_SCALE:
            raise CavError(f"scale {self.scale} is out of range: pass a scale in [0.05, {MAX_SCALE}]")
        if not 0.0 <= float(self.phase) < 1.0:
            raise CavError(f"phase {self.phase} is out of range: pass a phase in [0, 1)")


def trajectory(motion: str, frames: int, phase: float = 0.0) -> np.ndarray:
    """(frames, 3): normalised centroid x, y (y down) and size multiplier per frame."""
    _check("motion", motion, MOTIONS)
    if frames < 1:
        raise CavError(f"frames={frames} is too small: pass frames >= 1")
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    lo, hi = 0.28, 0.72
    ramp = lo + (hi - lo) * t
    x = np.full(frames, 0.5)
    y = np.full(frames, 0.5)
    m = np.ones(frames)
    if motion == "left":
        x = ramp[::-1]
    elif motion == "right":
        x = ramp
    elif motion == "up":
        y = ramp[::-1]
    elif motion == "down":
        y = ramp
    elif motion == "diagonal":
        x, y = ramp, ramp.copy()
    elif motion == "orbit":
        a = 2 * np.pi * t
        x, y = 0.5 + 0.2 * np.sin(a), 0.5 - 0.2 * np.cos(a)
    elif motion == "bounce":
        y = 0.72 - 0.42 * np.abs(np.sin(2 * np.pi * t))
    elif motion == "grow":
        m = 0.7 + 0.8 * t
    elif motion == "shrink":
        m = 1.5 - 0.8 * t
    elif motion == "zigzag":
        tri = 1.0 - 2.0 * np.abs(((1.5 * t) % 1.0) * 2.0 - 1.0)  # -1, 1, -1, 1 at t = 0, 1/3, 2/3, 1
        x, y = ramp, 0.5 - 0.2 * tri
    elif motion == "figure8":
        a = 2 * np.pi * t
        x, y = 0.5 + 0.25 * np.sin(a), 0.5 + 0.2 * np.sin(2 * a)
    elif motion == "spiral":
        a = 3 * np.pi * t
        r = 0.27 * (1 - t)
        x, y = 0.5 + r * np.cos(a), 0.5 + r * np.sin(a)
    p = 2 * np.pi * float(phase)
    return np.stack([x + PHASE_SHIFT * np.cos(p), y + PHASE_SHIFT * np.sin(p), m], axis=1)


def _masks(shape_id: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: np.ndarray, size: int) -> np.ndarray:
    """Hard masks (N, F, size, size) for shapes centred (area centroid) at cx, cy with half-size half (pixels)."""
    c = np.arange(size, dtype=np.float32) + 0.5
    u = c[None, None, None, :] - cx[..., None, None].astype(np.float32)
    v = c[None, None, :, None] - cy[..., None, None].astype(np.float32)
    a = half[..., None, None].astype(np.float32)
    k = shape_id[:, None, None, None]
    au, av = np.abs(u), np.abs(v)
    out = np.where(k == 0, u * u + v * v <= a * a, False)
    out |= (k == 1) & (au <= a) & (av <= a)
    # isosceles triangle, apex up, base 2a, height 2a; its area centroid is 1/3 up from the base
    out |= (k == 2) & (v <= a * (2 / 3)) & (au <= (v + a * (4 / 3)) / 2)
    out |= (k == 3) & (au + av <= a)
    return out


def _paint(masks: np.ndarray, colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(N, F, H, W) masks + (N, 3) colours -> uint8 (N, F, H, W, 3) video."""
    fg = colour[:, None, None, None, :].astype(np.uint8)
    bg = background[:, None, None, None, :].astype(np.uint8)
    return np.where(masks[..., None], fg, bg)


def _batch(specs: list[ToySpec], frames: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render specs -> (video uint8 (N,F,H,W,3), masks (N,F,H,W), trajectories (N,F,3))."""
    if size < 8:
        raise CavError(f"size={size} is too small: pass size >= 8")
    traj = np.stack([trajectory(s.motion, frames, s.phase) for s in specs]) if specs else np.zeros((0, frames, 3))
    scale = np.array([s.scale for s in specs], dtype=np.float64)
    half = traj[..., 2] * scale[:, None] * size / 2
    sid = np.array([_SHAPE_ID[s.shape] for s in specs], dtype=np.int64)
    masks = _masks(sid, traj[..., 0] * size, traj[..., 1] * size, half, size)
    col = np.array([RGB[s.colour] for s in specs], dtype=np.uint8).reshape(-1, 3)
    bg = np.array([RGB[s.background] for s in specs], dtype=np.uint8).reshape(-1, 3)
    return _paint(masks, col, bg), masks, traj


def render(spec: ToySpec, frames: int = 8, size: int = 32) -> tuple[np.ndarray, dict]:
    """Video uint8 (frames, size, size, 3) and exact truth {mask, centroid (px), scale, spec}."""
    video, masks, traj = _batch([spec], frames, size)
    mask = masks[0]
    ys, xs = np.arange(size) + 0.5, np.arange(size) + 0.5
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    cx = (mask.sum(axis=1) * xs).sum(axis=1) / np.maximum(area, 1)
    cy = (mask.sum(axis=2) * ys).sum(axis=1) / np.maximum(area, 1)
    truth = {
        "mask": mask,
        "centroid": np.stack([cx, cy], axis=1),
        "scale": traj[0, :, 2] * spec.scale,
        "spec": spec,
    }
    return video[0], truth


def caption(spec: ToySpec) -> tuple[str, str]:
    """(full prompt, appearance-only prompt without the motion)."""
    thing = f"a {spec.colour} {spec.shape}"
    where = f"on a {spec.background} background"
    return f"{thing} {MOTION_PHRASES[spec.motion]} {where}", f"{thing} {where}"


def sample_specs(rng: np.random.Generator, n: int, motions: tuple[str, ...] = SEEN_MOTIONS) -> list[ToySpec]:
    """n random specs (uniform shape/colour/background/motion, scale in SCALE_RANGE, phase in [0,1))."""
    motions = tuple(motions)
    for m in motions:
        _check("motion", m, MOTIONS)
    if not motions:
        raise CavError("no motions given: pass at least one motion name")
    sh, co, bg, mo = (rng.integers(0, len(names), n) for names in (SHAPES, COLOURS, BACKGROUNDS, motions))
    sc = rng.uniform(*SCALE_RANGE, n)
    ph = rng.uniform(0.0, 1.0, n)
    return [
        ToySpec(SHAPES[sh[i]], COLOURS[co[i]], BACKGROUNDS[bg[i]], motions[mo[i]], float(sc[i]), float(ph[i]))
        for i in range(n)
    ]


def new_appearances(spec: ToySpec, n: int, rng: np.random.Generator) -> list[ToySpec]:
    """n specs with spec's motion, scale and phase but a different shape, colour AND background.

    Distinct combinations come first (in random order); past their number they repeat.
    """
    combos = [
        (s, c, b)
        for s in SHAPES
        if s != spec.shape
        for c in COLOURS
        if c != spec.colour
        for b in BACKGROUNDS
        if b != spec.background
    ]
    order = rng.permutation(len(combos))
    return [
        ToySpec(*combos[order[i % len(combos)]], spec.motion, spec.scale, spec.phase) for i in range(n)
    ]


def dataset(
    n: int, frames: int, size: int, seed: int, motions: tuple[str, ...] = SEEN_MOTIONS
) -> tuple[np.ndarray, list[str], list[ToySpec]]:
    """n random clips: videos uint8 (n, frames, size, size, 3), full captions, specs. Deterministic by seed."""
    specs = sample_specs(np.random.default_rng(seed), n, motions)
    videos = np.empty((n, frames, size, size, 3), dtype=np.uint8)
    chunk = max(1, 2**22 // max(1, frames * size * size))
    for i in range(0, n, chunk):
        videos[i : i + chunk] = _batch(specs[i : i + chunk], frames, size)[0]
    return videos, [caption(s)[0] for s in specs], specs
