"""Statistics for the benchmarks: bootstrap intervals, paired differences, JSON-safe values."""

from __future__ import annotations

import math

import numpy as np


def bootstrap(values, resamples: int = 1000, seed=0) -> dict | None:
    """Mean and 95% percentile-bootstrap interval of the mean; None for no values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "n": int(v.size)}


def paired_differences(result: dict, metrics, vs=("base", "no-aa")) -> list[dict]:
    """Per row, the mean difference ``row - vs`` of each video metric over matched videos (same reference, prompt and
    seed), with a 95% bootstrap interval over those pairs: tighter than comparing two rows' intervals."""
    vs = tuple(vs)
    boot = result["settings"]["bootstrap"]
    index = {(v["row"], v["reference"], v["prompt"], v["seed"]): v for v in result["videos"]}
    keys = [r["key"] for r in result["rows"]]
    out = []
    for b, base in enumerate(vs):
        if base not in keys:
            continue
        for r, row in enumerate(keys):
            if row == base or row in vs[:b]:  # base vs an earlier reference row is the negation of a listed pair
                continue
            entry = {"row": row, "vs": base}
            for m, metric in enumerate(metrics):
                diffs = [v[metric] - index[(base, *k[1:])][metric] for k, v in index.items()
                         if k[0] == row and (base, *k[1:]) in index]
                entry[metric] = bootstrap(diffs, boot["resamples"], [boot["seed"], 1000 + b, r, m])
            out.append(entry)
    return out


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
