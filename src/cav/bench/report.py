"""Reporting for ``cav bench ablation``: the markdown tables and the output files."""

from __future__ import annotations

import json
from pathlib import Path

from ..io_utils import write_text
from .metrics import METRICS, VIDEO_METRICS, label
from .stats import jsonable, paired_differences


def _fmt(stat: dict | None, digits: int = 3, sign: str = "") -> str:
    """mean [95% CI]; ``sign="+"``: signed (a difference)."""
    if stat is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def _fmt_params(p: dict) -> str:
    if not p["total"]:
        return "0"
    return f"{_k(p['temporal'])} + {_k(p['spatial'])}"


def _k(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1000 else str(n)


# the full-size model whose trainable parameters a row's ``params`` also holds (its key → its label in the table)
FULL_LABELS = {"modelscope": "ModelScope", "wan2.1-t2v-1.3b": "Wan 2.1 T2V 1.3B"}


def format_markdown(result: dict) -> str:
    """A markdown table (mean [95% CI] per metric, parameters at the toy's size and at the full model's: ModelScope
    for the toy UNet, Wan 2.1 T2V 1.3B for the toy Wan) with the command, time and notes."""
    cols = METRICS
    params = result["rows"][0].get("params", {}) if result.get("rows") else {}
    full = next((k for k in params if k != "toy"), "modelscope")
    head = ["row"] + [label(c) for c in cols] + ["params toy (T + S)", f"params {FULL_LABELS[full]} (T + S)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in result["rows"]:
        cells = [row["name"]]
        for c in cols:
            cells.append(_fmt(row.get(c), 1 if c == "train_seconds" else 3))
        cells += [_fmt_params(row["params"]["toy"]), _fmt_params(row["params"][full])]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["settings"]
    status = "" if result.get("complete", True) else (
        f" — PARTIAL: {s['completed_references']} of {s['n_references']} references completed")
    per = [f"{s['completed_references']} references × {s['prompts_per_reference']} prompts × {s['seeds']} seeds"]
    if s.get("overrides"):
        per.append("overrides " + ", ".join(f"{k}={v}" for k, v in s["overrides"].items()))
    out = [f"`{result['command']}` — {result['wall_seconds']:.0f} s{status}", "", "; ".join(per) + ".", ""]
    out += lines + [""]
    comps = result.get("comparisons")
    if comps is None and result.get("videos"):
        comps = paired_differences(result, VIDEO_METRICS)
    names = {r["key"]: r["name"] for r in result["rows"]}
    for vs in dict.fromkeys(c["vs"] for c in comps or []):
        out += [f"Paired difference vs **{names.get(vs, vs)}** (same reference, prompt and seed; mean [95% CI]; "
                "an interval that excludes 0 is a measured difference):", ""]
        head2 = ["row"] + [label(m) for m in VIDEO_METRICS]
        out += ["| " + " | ".join(head2) + " |", "|" + "|".join(["---"] + ["---:"] * len(VIDEO_METRICS)) + "|"]
        for c in comps:
            if c["vs"] == vs:
                out.append("| " + " | ".join([names.get(c["row"], c["row"])]
                                             + [_fmt(c.get(m), sign="+") for m in VIDEO_METRICS]) + " |")
        out.append("")
    out += [f"- **{k}**: {v}" for k, v in result.get("notes", {}).items()]
    return "\n".join(out)


def write_outputs(result: dict, out_dir: str | Path) -> dict:
    """Write ``ablation.json`` and ``ablation.md`` (the tables); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "ablation.json", "markdown": out_dir / "ablation.md"}
    write_text(paths["json"], json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    write_text(paths["markdown"], format_markdown(result) + "\n")
    return paths
