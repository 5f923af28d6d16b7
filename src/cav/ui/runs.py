"""What the web app reads from run folders (the same folders ``cav train`` writes): progress, loss, samples, details;
and the two things it does to them: zip the adapter, delete the run.

Everything here reads files only, so a run trained by the CLI, by the app, or still training shows the same way.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


from .. import versioned
from ..errors import CavError

CLIPS = ".clips"  # under the runs folder: uploaded clips, kept by content so a run can be resumed after a restart
GENERATIONS = "generations"  # under the runs folder: one folder per Generate-tab grid (its videos and grid.json)


def list_runs(root: Path) -> list[Path]:
    """Run folders directly under ``root`` (those holding a config.yaml), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "config.yaml").is_file()]
    return sorted(runs, key=lambda d: (d / "config.yaml").stat().st_mtime, reverse=True)


def adapter_runs(root: Path) -> list[Path]:
    """Runs with a finished T-LoRA (``t_lora/``), the ones the Generate tab can load."""
    return [d for d in list_runs(root) if (d / "t_lora" / "adapter_model.safetensors").is_file()]


def image_lora_runs(root: Path) -> list[Path]:
    return [d for d in list_runs(root) if (d / "absorbers" / "s_lora" / "adapter_model.safetensors").is_file()]


def resumable_runs(root: Path) -> list[Path]:
    """Runs with a checkpoint to continue from that have not finished (no summary.json)."""
    return [d for d in list_runs(root) if not (d / "summary.json").is_file()
            and any((c / "state.json").is_file() for c in (d / "checkpoints").glob("*step-*"))]


def read_config(run: Path) -> dict:
    """The run's config.yaml as recipe keys (``steps``, ``absorber_steps``, ``frames`` …), any format version."""
    from ..config import load_recipe

    path = Path(run) / "config.yaml"
    return load_recipe(path) if path.is_file() else {}


def read_log(run: Path) -> list[dict]:
    """The run's log.jsonl records; a line being written (no newline yet) is skipped."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass
class Progress:
    stage: str  # "absorbers" | "t_lora" | "" before the first step
    step: int  # in its stage
    stage_steps: int
    done: int  # steps of both stages
    total: int
    loss: float | None
    eta_seconds: float | None

    def text(self) -> str:
        if not self.stage:
            return "starting (loading the model)" + (f": 0/{self.total} steps" if self.total else "")
        eta = "" if self.eta_seconds is None else f", about {_duration(self.eta_seconds)} left"
        loss = "" if self.loss is None else f", loss {self.loss:.4f}"
        return (f"{self.stage} step {self.step}/{self.stage_steps} · {self.done}/{self.total} steps in all"
                f"{loss}{eta}")


def progress(run: Path, records: list[dict] | None = None) -> Progress:
    """Stage and step from the log, totals from config.yaml; the ETA is the remaining steps at the median of the last
    20 step times (checkpoint sampling is not counted, so it runs a little long when checkpoints sample often)."""
    cfg = read_config(run)
    records = read_log(run) if records is None else records
    absorber_steps = 0 if cfg.get("absorbers", "both") == "none" else int(cfg.get("absorber_steps", 0))
    steps = int(cfg.get("steps", 0))
    total = absorber_steps + steps
    if not records:
        return Progress("", 0, 0, 0, total, None, None)
    last = records[-1]
    stage_steps = absorber_steps if last["stage"] == "absorbers" else steps
    done = last["step"] + (absorber_steps if last["stage"] == "t_lora" else 0)
    recent = sorted(r["seconds"] for r in records[-20:])
    eta = recent[len(recent) // 2] * max(total - done, 0)
    return Progress(last["stage"], int(last["step"]), stage_steps, done, total, float(last["loss"]), eta)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def loss_figure(records: list[dict], title: str = "training loss"):
    """Loss per step, one line per stage, on a shared step axis (T-LoRA steps after the absorber steps)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state in a server

    fig = Figure(figsize=(6, 2.6), dpi=90)
    ax = fig.add_subplot()
    offset = max((r["step"] for r in records if r["stage"] == "absorbers"), default=0)
    for stage, colour in (("absorbers", "tab:orange"), ("t_lora", "tab:blue")):
        pts = [(r["step"] + (offset if stage == "t_lora" else 0), r["loss"]) for r in records if r["stage"] == stage]
        if pts:
            ax.plot(*zip(*pts), color=colour, label=stage, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    if records:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def checkpoints(run: Path) -> list[Path]:
    """T-LoRA checkpoints (``checkpoints/step-N``), in step order; unfinished (dot-named) ones are not listed."""
    return sorted((Path(run) / "checkpoints").glob("step-*"))


def latest_sample(run: Path) -> tuple[int, Path] | None:
    """(step, mp4) of the newest checkpoint that has validation samples."""
    for ckpt in reversed(checkpoints(run)):
        mp4 = ckpt / "samples" / "sample-0.mp4"
        if mp4.is_file():
            return int(ckpt.name[5:]), mp4
    return None


def details(run: Path) -> dict:
    """What the Runs tab shows: config text, loss records, contact sheets, metrics and checkpoint names."""
    run = Path(run)
    metrics = {}
    for name in ("summary.json", "metrics.json"):
        path = run / name
        if path.is_file():
            metrics[name[:-5]] = json.loads(path.read_text())
    if (run / "data.json").is_file():
        metrics["data"] = versioned.read(run / "data.json")
    sheets = sorted(run.glob("contact_sheet*.png")) + sorted(run.glob("samples/contact_sheet*.png"))
    return {"config": (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else "",
            "records": read_log(run), "sheets": sheets, "metrics": metrics,
            "checkpoints": [c.name for c in checkpoints(run)]}


def inside(root: Path, run: str | Path) -> Path:
    """The run named ``run`` (a folder name, as the page lists them) directly under ``root``; anything else, e.g. a
    path that leads out of ``root``, is refused."""
    root = Path(root).resolve()
    name = str(run).strip()
    path = (root / name).resolve()
    if not name or Path(name).name != name or path.parent != root or not (path / "config.yaml").is_file():
        raise CavError(f"'{run}' is not a run under '{root}': pick one from the list")
    return path


def zip_adapter(run: Path, dest: Path) -> Path:
    """``<run>-t_lora.zip`` in ``dest``: the run's t_lora/ folder (peft files + cav.json), loadable after unzipping."""
    folder = Path(run) / "t_lora"
    if not folder.is_dir():
        raise CavError(f"run '{Path(run).name}' has no T-LoRA yet: let it finish (or resume it) first")
    Path(dest).mkdir(parents=True, exist_ok=True)
    return Path(shutil.make_archive(str(Path(dest) / f"{Path(run).name}-t_lora"), "zip", root_dir=run,
                                    base_dir="t_lora"))


def delete_run(run: Path) -> None:
    shutil.rmtree(run)


def new_generation(root: Path) -> Path:
    """A new, empty ``generations/<stamp>`` folder."""
    base = Path(root) / GENERATIONS / time.strftime("%Y%m%d-%H%M%S")
    folder, k = base, 1
    while folder.exists():
        folder, k = base.with_name(f"{base.name}-{k}"), k + 1
    folder.mkdir(parents=True)
    return folder


def generations(root: Path) -> list[Path]:
    """Generation folders (those holding a grid.json), newest first."""
    folder = Path(root) / GENERATIONS
    found = [d for d in folder.iterdir() if (d / "grid.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda d: d.name, reverse=True)


def generation(root: Path, name: str) -> Path:
    folder = (Path(root).resolve() / GENERATIONS / str(name).strip())
    if not name or Path(str(name)).name != str(name).strip() or not (folder / "grid.json").is_file():
        raise CavError(f"'{name}' is not a generation under '{GENERATIONS}': pick one from the list")
    return folder


def generation_html(root: Path, folder: Path) -> str:
    """The grid as a table of <video>s (rows: weights, columns: seeds) with mp4 / gif links, served by the app's
    ``cav/runs/`` route (a path relative to the runs folder: no server path in the page). Cells not (yet) written
    are left empty."""
    spec = json.loads((Path(folder) / "grid.json").read_text())
    rel = Path(folder).resolve().relative_to(Path(root).resolve()).as_posix()

    def label(ws: list) -> str:
        if not spec["names"]:
            return "base model"
        return " + ".join(f"{a}:{'own' if w is None else w}" for a, w in zip(spec["names"], ws))

    rows: dict[tuple, list[str]] = {}
    for cell in spec["cells"]:
        url = html.escape(f"cav/runs/{rel}/{cell['file']}")
        gif = url[:-4] + ".gif"
        td = (f'<td><video src="{url}" controls autoplay loop muted playsinline width="256"></video><br>'
              f'<a href="{url}" download>mp4</a> · <a href="{gif}" download>gif</a></td>'
              if (Path(folder) / cell["file"]).is_file() else "<td>not generated</td>")
        rows.setdefault(tuple(cell["weights"]), []).append(td)
    head = "".join(f"<th>seed {s}</th>" for s in spec["seeds"])
    body = "".join(f"<tr><th>{html.escape(label(list(ws)))}</th>{''.join(tds)}</tr>" for ws, tds in rows.items())
    return (f'<p class="cav-line">{html.escape(spec["prompt"])}</p>'
            f'<table class="cav-grid"><tr><th></th>{head}</tr>{body}</table>')
