"""Reporting for ``cav bench ablation``: the markdown table, the PNG chart and the output files."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io_utils import write_text
from .metrics import CHART_METRICS, FRACTIONS, METRICS, VIDEO_METRICS, chart_label, label
from .stats import jsonable, paired_differences


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _fmt_params(p: dict) -> str:
    if not p["total"]:
        return "0"
    return f"{_k(p['temporal'])} + {_k(p['spatial'])}"


def _k(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1000 else str(n)


def format_markdown(result: dict) -> str:
    """A markdown table (mean [95% CI] per metric, parameters) with the command, time and notes."""
    cols = METRICS
    head = ["row"] + [label(c) for c in cols] + ["params toy (T + S)", "params ModelScope (T + S)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in result["rows"]:
        cells = [row["name"]]
        for c in cols:
            cells.append(_fmt(row.get(c), 1 if c == "train_seconds" else 3))
        cells += [_fmt_params(row["params"]["toy"]), _fmt_params(row["params"]["modelscope"])]
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
                                             + [_fmt_signed(c.get(m)) for m in VIDEO_METRICS]) + " |")
        out.append("")
    out += [f"- **{k}**: {v}" for k, v in result.get("notes", {}).items()]
    return "\n".join(out)


def _fmt_signed(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


_PALETTE = [(120, 120, 120), (214, 96, 77), (244, 165, 130), (146, 197, 222), (67, 147, 195), (153, 112, 171),
            (90, 60, 130), (77, 175, 74), (255, 127, 0)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def write_chart(result: dict, path: str | Path, metrics=CHART_METRICS) -> Path:
    """PNG bar chart, one panel per metric: each row's mean with its 95% CI as a whisker."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    metrics = [m for m in metrics if any(r.get(m) for r in rows)]
    cols = 3
    n_panels = max(1, len(metrics))
    nrows = math.ceil(n_panels / cols)
    pw, ph = 340, 260
    legend_h = 24 * math.ceil(len(rows) / 3) + 16
    title_h = 34
    img = Image.new("RGB", (pw * cols, title_h + ph * nrows + legend_h), "white")
    d = ImageDraw.Draw(img)
    f_title, f_small, f_big = _font(14), _font(11), _font(16)
    s = result["settings"]
    title = (f"cav bench ablation: {s['completed_references']} references x {s['prompts_per_reference']} prompts x "
             f"{s['seeds']} seeds; bars = mean, whiskers = 95% bootstrap CI")
    if not result.get("complete", True):
        title += f" (PARTIAL: {s['completed_references']} of {s['n_references']} references)"
    d.text((10, 9), title, fill="black", font=f_big)
    for k, metric in enumerate(metrics):
        x0, y0 = (k % cols) * pw, title_h + (k // cols) * ph
        left, right, top, bottom = x0 + 52, x0 + pw - 14, y0 + 42, y0 + ph - 22
        d.text((x0 + pw // 2, y0 + 6), chart_label(metric), fill="black", font=f_title, anchor="mt")
        stats = [r.get(metric) for r in rows]
        hi_val = max([st["ci95"][1] for st in stats if st] + [st["mean"] for st in stats if st] + [1e-9])
        top_val = 1.0 if metric in FRACTIONS and hi_val <= 1.0 else _nice_ceiling(hi_val * 1.12)

        def y_of(v, top_val=top_val, top=top, bottom=bottom):
            return bottom - (bottom - top) * (max(v, 0.0) / top_val)

        for t in range(5):
            v = top_val * t / 4
            y = y_of(v)
            d.line([(left, y), (right, y)], fill=(230, 230, 230))
            d.text((left - 5, y), f"{v:.3g}", fill=(80, 80, 80), font=f_small, anchor="rm")
        d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        slot = (right - left) / len(rows)
        for i, (row, st) in enumerate(zip(rows, stats)):
            cx = left + slot * (i + 0.5)
            bw = slot * 0.62
            colour = _PALETTE[i % len(_PALETTE)]
            if st is None:
                d.text((cx, bottom - 8), "n/a", fill=(120, 120, 120), font=f_small, anchor="mb")
                continue
            d.rectangle([cx - bw / 2, y_of(st["mean"]), cx + bw / 2, bottom], fill=colour, outline=(40, 40, 40))
            lo, hi = st["ci95"]
            d.line([(cx, y_of(lo)), (cx, y_of(hi))], fill="black", width=2)
            for v in (lo, hi):
                d.line([(cx - bw / 4, y_of(v)), (cx + bw / 4, y_of(v))], fill="black", width=2)
            d.text((cx, bottom + 4), str(i + 1), fill="black", font=f_small, anchor="mt")
            d.text((cx, y_of(hi) - 2), f"{st['mean']:.2f}" if st["mean"] < 10 else f"{st['mean']:.0f}",
                   fill=(30, 30, 30), font=f_small, anchor="mb")
    ly = title_h + ph * nrows + 8
    for i, row in enumerate(rows):
        lx = 14 + (i % 3) * pw
        yy = ly + 24 * (i // 3)
        d.rectangle([lx, yy + 3, lx + 14, yy + 17], fill=_PALETTE[i % len(_PALETTE)], outline=(40, 40, 40))
        d.text((lx + 20, yy + 10), f"{i + 1}  {row['name']}", fill="black", font=f_title, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def _nice_ceiling(v: float) -> float:
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v * 1.0001:
            return m * exp
    return 10 * exp


def write_outputs(result: dict, out_dir: str | Path) -> dict:
    """Write ``ablation.json``, ``ablation.md`` (table + chart link) and ``ablation.png``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "ablation.json", "markdown": out_dir / "ablation.md", "chart": out_dir / "ablation.png"}
    write_text(paths["json"], json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    write_chart(result, paths["chart"])
    write_text(paths["markdown"], format_markdown(result) + "\n\n![ablation chart](ablation.png)\n")
    return paths
