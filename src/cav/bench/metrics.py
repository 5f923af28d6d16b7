"""The ablation's metrics as one table: a new metric is one function and one ``Metric`` entry in ``TABLE``.

Levels: ``video`` metrics score one generated video against the toy world's ground truth (``fn(Scored)``);
``group`` metrics score the seeds' videos of one (row, reference, prompt) (``fn(videos, scored, lpips)``);
``run`` metrics are read from a training run's record (its key). The table's order is the order of the JSON's
metrics and the markdown table's columns; append new metrics at the end (each metric's bootstrap
seed is its index, so earlier figures stay reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Callable

import numpy as np

from ..data import toyworld as tw
from ..metrics import toy as tm


@dataclass
class Scored:
    """One generated video and what the toy world's classifiers see in it (computed once, shared by the metrics)."""

    video: np.ndarray  # uint8 (F, H, W, 3)
    ref: tw.ToySpec  # the reference whose motion the video should have
    ref_track: np.ndarray
    target: tw.ToySpec  # the appearance its prompt asks for

    @property
    def size(self) -> int:
        return self.video.shape[1]

    @cached_property
    def track(self) -> np.ndarray:
        return tm.track(self.video)

    @cached_property
    def colour(self) -> str:
        return tm.classify_colour(self.video)

    @cached_property
    def shape(self) -> str:
        return tm.classify_shape(self.video)

    @cached_property
    def background(self) -> str:
        return tm.classify_background(self.video)


@dataclass(frozen=True)
class Metric:
    key: str
    level: str  # "video" | "group" | "run"
    label: str  # markdown column (with ↑/↓)
    note: str  # what it measures: the JSON's notes and the docs
    fn: Callable | None = None


def _appearance_leakage(s: Scored) -> float:
    ref, target = s.ref, s.target
    return float((ref.colour != target.colour and s.colour == ref.colour)
                 or (ref.shape != target.shape and s.shape == ref.shape))


def _motion_accuracy(s: Scored) -> float:
    area = tm.object_mask(s.video).sum(axis=(1, 2))
    return float(tm.classify_motion(s.track, s.video.shape[0], s.size, area=area) == s.ref.motion)


def _pairwise(items, fn) -> float | None:
    pairs = list(combinations(items, 2))
    return float(np.mean([fn(a, b) for a, b in pairs])) if pairs else None


TABLE = (
    Metric("motion_error", "video", "motion error ↓",
           "mean distance between centroid displacement tracks of the video and the reference, as a fraction of "
           "the frame side (metrics.toy.motion_error)",
           lambda s: tm.motion_error(s.track, s.ref_track, s.size)),
    Metric("appearance_leakage", "video", "appearance leakage ↓",
           "fraction of videos whose classified colour or shape is the reference's where the prompt asks for another",
           _appearance_leakage),
    Metric("prompt_accuracy", "video", "prompt accuracy ↑",
           "fraction of videos whose classified colour and shape are the prompt's",
           lambda s: float(s.colour == s.target.colour and s.shape == s.target.shape)),
    Metric("motion_accuracy", "video", "motion accuracy ↑",
           "fraction of videos whose track is classified (among all 12 toy motions) as the reference's motion",
           _motion_accuracy),
    Metric("background_leakage", "video", "background leakage ↓",
           "fraction of videos whose classified background is the reference's where the prompt asks for another "
           "(not part of appearance_leakage)",
           lambda s: float(s.ref.background != s.target.background and s.background == s.ref.background)),
    Metric("diversity", "group", "LPIPS diversity ↑",
           "mean pairwise LPIPS between the seeds' videos of one prompt",
           lambda videos, scored, lp: None if lp is None or len(videos) < 2 else lp.diversity(videos)),
    Metric("track_diversity", "group", "track diversity",
           "mean pairwise motion error between the seeds' videos of one prompt (weights-free diversity proxy)",
           lambda videos, scored, lp: _pairwise([s.track for s in scored],
                                                lambda a, b: tm.motion_error(a, b, scored[0].size))),
    Metric("train_seconds", "run", "train seconds", "wall time of one training run (api.train)"),
    Metric("frame_leakage", "video", "frame leakage ↓",
           "fraction of frames whose own classified object colour or shape, or background, is the reference's where "
           "the prompt asks for another (metrics.toy.frame_leakage: catches a few leaking frames)",
           lambda s: tm.frame_leakage(s.video, s.ref, s.target)),
    Metric("appearance_accuracy", "video", "appearance accuracy ↑",
           "fraction of videos whose classified colour, shape AND background are the prompt's "
           "(metrics.toy.appearance_ok)",
           lambda s: float(tm.appearance_ok(s.video, s.target))),
)
BY_KEY = {m.key: m for m in TABLE}
METRICS = tuple(m.key for m in TABLE)
VIDEO_METRICS = tuple(m.key for m in TABLE if m.level == "video")
GROUP_METRICS = tuple(m.key for m in TABLE if m.level == "group")
RUN_METRICS = tuple(m.key for m in TABLE if m.level == "run")


def label(key: str) -> str:
    return BY_KEY[key].label


def score_video(s: Scored) -> dict:
    return {m.key: m.fn(s) for m in TABLE if m.level == "video"}


def score_group(videos: list, scored: list[Scored], lp) -> dict:
    return {m.key: m.fn(videos, scored, lp) for m in TABLE if m.level == "group"}
