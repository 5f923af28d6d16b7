"""`cav batch`: a motion library from a manifest of clips, one Ray task per row, each calling ``api.train``. A row
trains on one clip, or on several clips of one motion when its ``clip`` is a clips file (as `cav train --clips`).

This module has no training code of its own: it reads and validates the manifest, decides per row what to do
(train, resume, skip) from the row's run folder, runs the rows as Ray tasks and writes the library's index.

Restarts. Each row's run folder ``OUT/<name>/`` holds ``batch.json``: the row's status (running, finished, failed,
interrupted) and its *config hash* — SHA-256 over the fully resolved recipe, the video options and the content hash
of the clip. A rerun skips a row whose run finished with the same hash, resumes an unfinished one from its last
checkpoint (``api.train(resume=True)``) and retries a failed one only when asked.

Paths. Tasks get absolute paths and read the clips and write the run folders themselves, so every node must see
the clips and ``OUT`` at the same paths: on one machine that holds; on a cluster they must live on a shared
filesystem. We do not ship clip bytes with the task because the run folder (checkpoints, resume state, adapters)
must persist where the next rerun and the user find it; a probe task on every node checks this before submission.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from . import options, runlock
from .config import FRAME_SELECTION, TrainConfig, load_recipe
from .errors import CavError
from .options import REQUIRED, option
from .io_utils import write_json, write_text

REQUIRED = ("clip", "prompt", "spatial_prompt")
RECIPE_KEYS = tuple(k for k in TrainConfig.field_names() if k not in ("prompt", "spatial_prompt"))
KEY_TYPES = {leaf.key: leaf.hint for leaf in options.leaves(TrainConfig)}
KNOWN = set(REQUIRED) | {"name"} | set(RECIPE_KEYS)  # the frame selection (start, end, fps, stride) among them
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STATE = "batch.json"
PATH_KEYS = tuple(k for k in ("base", "motion_adapter", "s_lora_from", "ti_from", "validation_image")
                  if k in TrainConfig.field_names())
RESERVED = ("index.json", "index.md", "library.png")  # the library's own files in OUT
LOCK = ".batch.lock"
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".yaml": "yaml", ".yml": "yaml"}


@dataclass
class Row:
    """One validated manifest row: a clip, its resolved recipe and its run folder name."""

    line: int
    name: str
    clip: Path
    cfg: TrainConfig
    video_options: dict = field(default_factory=dict)
    key: str = ""  # config hash, filled by ``plan``
    more: list[Path] = field(default_factory=list)  # a row on several clips of one motion: clips 2, 3, ...

    @property
    def clips(self) -> list[Path]:
        return [self.clip, *self.more]


@dataclass
class Step:
    """What this invocation does with a row: train, resume, retry, skip-finished or skip-failed."""

    row: Row
    action: str
    detail: str = ""

    @property
    def runs(self) -> bool:
        return self.action in ("train", "resume", "retry")


# ------------------------------------------------------------------------------------------ manifest reading
def read_manifest(path: Path) -> list[tuple[int, dict]]:
    """The manifest's rows as ``(line number, raw mapping)``; CSV cells are still strings."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise CavError(f"manifest '{path}' has an unknown type: use a .csv, .jsonl or .yaml file")
    if not path.is_file():
        raise CavError(f"manifest '{path}' does not exist: check the path")
    text = path.read_text(encoding="utf-8-sig")
    rows = {"csv": _read_csv, "jsonl": _read_jsonl, "yaml": _read_yaml}[kind](text, path)
    if not rows:
        raise CavError(f"manifest '{path}' has no rows: add one row per clip with the fields {', '.join(REQUIRED)}")
    return rows


def _read_csv(text: str, path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    problems = []
    missing = [c for c in REQUIRED if c not in header]
    if header and missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    unknown = [c for c in header if c not in KNOWN]
    if unknown:
        problems.append(f"unknown column(s) {', '.join(unknown)} (recipe keys are the flags of `cav train --help`, "
                        "with _ for -)")
    if problems:
        raise CavError(f"manifest '{path}' has a bad header:\n  line 1: {'; '.join(problems)}")
    rows = []
    for raw in reader:
        line = reader.line_num
        values = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(values.values()):
            continue  # blank line
        if None in raw:
            values["__extra__"] = raw[None]
        rows.append((line, values))
    return rows


def _read_jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    rows, errors = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            errors.append(f"line {n}: not valid JSON ({exc.msg})")
    if errors:
        raise CavError(f"manifest '{path}' has {len(errors)} bad row(s):\n  " + "\n  ".join(errors))
    return rows


def _read_yaml(text: str, path: Path) -> list[tuple[int, dict]]:
    """A YAML list of mappings; each row's line number is where its mapping starts."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CavError(f"manifest '{path}' is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise CavError(f"manifest '{path}' must be a YAML list of rows (- clip: ..., prompt: ..., spatial_prompt: ...)")
    return [(item.start_mark.line + 1, value) for item, value in zip(node.value, data)]


# --------------------------------------------------------------------------------------------- validation
def load_rows(manifest: Path, recipe: dict) -> list[Row]:
    """Validate every row against the recipe; all problems are reported at once, one line per bad row."""
    manifest = Path(manifest)
    rows, errors, names = [], [], {}
    for line, raw in read_manifest(manifest):
        try:
            row = _row(line, raw, recipe, manifest.parent)
        except CavError as exc:
            errors.append(f"line {line}: {exc}")
            continue
        first = names.setdefault(row.name.casefold(), line)
        if first != line:
            errors.append(f"line {line}: name '{row.name}' is already used by line {first}: give each row its own "
                          "name (column `name`)")
            continue
        rows.append(row)
    if errors:
        raise CavError(f"manifest '{manifest}' has {len(errors)} bad row(s), nothing was started:\n  "
                       + "\n  ".join(errors))
    return rows


def _row(line: int, raw, recipe: dict, folder: Path) -> Row:
    if not isinstance(raw, dict):
        raise CavError("a row must be a mapping of fields (clip, prompt, spatial_prompt, ...)")
    if "__extra__" in raw:
        raise CavError("more cells than header columns: quote cells that contain commas")
    problems = []
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in raw if k not in KNOWN)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (recipe keys are the flags of `cav train --help`)")
    if problems:
        raise CavError("; ".join(problems))
    prompt, spatial = (_text(raw, k) for k in ("prompt", "spatial_prompt"))
    if not prompt:
        raise CavError("prompt is empty: describe the clip and its motion")
    clip = _clip_path(_text(raw, "clip"), folder)
    name = _text(raw, "name") or clip.stem
    spatial, more = _several(clip, spatial)
    clip, more = (more[0], more[1:]) if more else (clip, [])
    if not NAME_RE.match(name) or name in RESERVED:
        raise CavError(f"name '{name}' is not a folder name: use letters, digits, '.', '_', '-', not {'/'.join(RESERVED)} "
                       "(column `name`)")
    overrides = options.typed_keys(TrainConfig, {k: _cell(k, raw[k]) for k in RECIPE_KEYS
                                                 if k in raw and raw[k] not in ("", None)})
    video_options = {k: overrides[k] for k in FRAME_SELECTION if k in overrides}  # the clip's selection, as `cav train`
    data = {**recipe, **overrides, "prompt": prompt, "spatial_prompt": spatial}
    data.update({k: _absolute(str(data[k])) for k in PATH_KEYS if data.get(k)})
    try:
        cfg = TrainConfig.from_dict(data)
    except TypeError as exc:
        raise CavError(f"a recipe value has the wrong type ({exc})") from None
    return Row(line, name, clip, cfg, video_options, more=more)


def _several(clip: Path, spatial: str) -> tuple[str | list[str], list[Path]]:
    """A row whose ``clip`` is a clips file (`cav train --clips`: a .csv or .yaml of clips of one motion and their
    spatial prompts) trains one T-LoRA on all of them, each clip with its own absorbers; a video or a folder of
    images is one clip. Returns the row's spatial prompt(s) and the clips ([] for one clip)."""
    from . import clips as clips_mod

    if not (clip.is_file() and clip.suffix.lower() in (".csv", ".yaml", ".yml")):
        return spatial, []
    found, prompts = clips_mod.read_clips(clip)
    if prompts and spatial:
        raise CavError(f"the spatial prompts are given twice: empty the row's spatial_prompt (the clips file "
                       f"'{clip.name}' has them) or the file's spatial_prompt column")
    return (prompts or spatial), found


def _text(raw: dict, key: str) -> str:
    value = raw.get(key)
    return "" if value is None else str(value).strip()


def _clip_path(text: str, folder: Path) -> Path:
    if not text:
        raise CavError("clip is empty: give the path of a video file or a folder of images")
    path = Path(text).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.exists():
        raise CavError(f"clip '{text}' does not exist (looked at {path.resolve()}): fix the path (relative paths "
                       "start at the manifest's folder)")
    return path.resolve()


def _absolute(path: str) -> str:
    """A model or adapter given as a relative path becomes absolute: tasks do not run in the driver's folder."""
    return str(Path(path).resolve()) if path != "toy" and Path(path).exists() else path


def _cell(key: str, value):
    """A cell as a recipe value: CSV cells (text) of a key that is not text are YAML scalars or flow lists, e.g.
    `[0, 1000]`; ``options`` then parses and checks it as it does a flag or a recipe value."""
    if isinstance(value, str) and options.plain_type(KEY_TYPES[key]) is not str:
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    return value


# -------------------------------------------------------------------------------------- state, hash and plan
def config_hash(row: Row) -> str:
    """What makes two runs the same run: the resolved recipe, the frame selection and the clip's content (hashed
    as ``runfolder.clip_record`` hashes it for the run's own ``data.json``)."""
    from . import runfolder

    records = [runfolder.clip_record(c, row.video_options) for c in row.clips]
    blob = json.dumps({"recipe": row.cfg.keys(), "video": records[0]["selection"], "clip": records[0]["sha256"],
                       **({"more": [r["sha256"] for r in records[1:]]} if row.more else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_state(run: Path) -> dict | None:
    path = Path(run) / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_state(run: Path, state: dict) -> None:
    write_json(Path(run) / STATE, state)


def plan(rows: list[Row], out: Path, retry_failed: bool = False) -> list[Step]:
    """Decide per row from its run folder; a folder this batch may not touch is an error for that row."""
    from . import resume, runfolder

    steps, errors = [], []
    for row in rows:
        row.key = config_hash(row)
        run = Path(out) / row.name
        state = read_state(run)
        holds = runfolder.holds_run(run)
        point = resume.latest(run) if holds else None
        same = state is not None and state.get("hash") == row.key
        status = state.get("status") if state else None
        if state is None and holds:
            errors.append(f"line {row.line}: '{run}' holds a run that `cav batch` did not make: move it away or "
                          "give the row another name")
        elif status == "finished" and not same:
            errors.append(f"line {row.line}: '{run}' holds a finished run of another recipe or clip (the row, the "
                          "recipe or the clip changed): delete that folder to retrain it, or give the row another name")
        elif status == "finished" and (run / "t_lora").is_dir():
            steps.append(Step(row, "skip-finished"))
        elif status == "failed":
            action = "retry" if retry_failed else "skip-failed"
            steps.append(Step(row, action, _resume_detail(point) if same and point else state.get("error", "")))
        elif same and point:
            steps.append(Step(row, "resume", _resume_detail(point)))
        else:
            steps.append(Step(row, "train", "recipe or clip changed, starting over" if holds else ""))
    if errors:
        raise CavError(f"{len(errors)} row(s) conflict with run folders in '{out}', nothing was started:\n  "
                       + "\n  ".join(errors))
    return steps


def _resume_detail(point) -> str:
    return f"from {point.stage} step {point.step}"


# --------------------------------------------------------------------------------------------- one row (task)
def train_row(spec: dict) -> dict:
    """The Ray task: train one row into its run folder; user errors and crashes become a failed record.

    A worker lost mid-row is retried by Ray and resumes from the last checkpoint; Ctrl-C (``ray.cancel``) reaches
    ``api.train`` as KeyboardInterrupt, which checkpoints the last step before the task ends.
    """
    run = Path(spec["out"]) / spec["name"]
    run.mkdir(parents=True, exist_ok=True)
    _set_threads(spec["cpus"])
    try:
        with _lock(run / LOCK, wait=120, busy=f"another process is training row '{spec['name']}'"):
            runlock.refuse_if_held(run, "run the batch again")  # a `cav train` or the web app owns the folder
            return _train_locked(spec, run)
    except CavError as busy:  # the folder belongs to another process: report, leave its state alone
        return {"name": spec["name"], "line": spec["line"], "hash": spec["hash"], "status": "failed",
                "error": str(busy)}


def _train_locked(spec: dict, run: Path) -> dict:
    from . import api, resume

    state = read_state(run) or {}
    again = state.get("hash") == spec["hash"] and resume.latest(run) is not None
    seconds = float(state.get("seconds") or 0) if again else 0.0
    record = {"name": spec["name"], "line": spec["line"], "hash": spec["hash"], "status": "running",
              "host": socket.gethostname(), "pid": os.getpid()}
    write_state(run, record)
    t0 = time.time()
    try:
        api.train(spec.get("clips") or spec["clip"], TrainConfig.from_dict(spec["recipe"]), run,
                  overwrite=not again, resume=again, quiet=True, video_options=spec["video_options"])
    except KeyboardInterrupt:
        write_state(run, {**record, "status": "interrupted", "seconds": round(seconds + time.time() - t0, 2)})
        raise
    except Exception as exc:  # one failing row never stops the others: record why, keep going
        record.update(status="failed", error=one_line(exc), seconds=round(seconds + time.time() - t0, 2))
        write_state(run, record)
        return record
    record.update(status="finished", seconds=round(seconds + time.time() - t0, 2), final_loss=final_loss(run),
                  contact_sheet=_sheet(run))
    write_state(run, record)
    return record


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, CavError) else f"{type(exc).__name__}: {msg}"[:300]


def final_loss(run: Path) -> float | None:
    """The loss of the run's last T-LoRA step, from its log.jsonl."""
    loss = None
    with contextlib.suppress(OSError):
        for line in (run / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") == "t_lora":
                loss = rec.get("loss")
    return loss


def _sheet(run: Path) -> str | None:
    sheet = run / "samples" / "contact_sheet.png"
    return str(sheet.relative_to(run.parent)) if sheet.is_file() else None


def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))  # one row per CPU slot: no oversubscription, same result every time


@contextlib.contextmanager
def _lock(path: Path, wait: float, busy: str):
    """An exclusive lock on ``path`` (released by the OS if its holder dies); waits up to ``wait`` seconds."""
    import fcntl

    fh = open(path, "a")
    try:
        deadline = time.time() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    raise CavError(f"{busy}: wait for it to end") from None
                time.sleep(0.5)
        yield
    finally:
        fh.close()


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class Options:
    """`cav batch`'s options (its flags are built from these fields; ``options.from_args`` reads them back)."""

    manifest: str = option(REQUIRED, "CSV, JSONL or YAML: clip, prompt, spatial_prompt[, name, recipe keys] per row",
                           positional=True)
    out: str = option("runs/library", "library folder: one run folder per row, index.md", metavar="DIR")
    recipe: str | None = option(None, "recipe for every row: a shipped name or a YAML file (a row's own recipe keys "
                                "override it)", metavar="NAME_OR_YAML",
                                default_text="none: the defaults of `cav train --help`")
    address: str | None = option(None, "existing Ray cluster: ray://HOST:10001, HOST:6379 or auto",
                                 default_text="a private Ray on this machine")
    gpus_per_run: float = option(1.0, "GPUs per row where the cluster has GPUs", unit="GPUs")
    cpus_per_run: float = option(1.0, "CPU slots per row (training threads on CPU)", unit="CPU slots")
    max_parallel: int | None = option(None, "rows at once", metavar="N", default_text="as many as fit")
    retry_failed: bool = option(False, "run the rows that failed before again")
    dry_run: bool = option(False, "print the plan without starting Ray")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self):
        if self.gpus_per_run < 0 or self.cpus_per_run <= 0:
            raise CavError("--gpus-per-run must be ≥ 0 and --cpus-per-run > 0, e.g. --gpus-per-run 1 --cpus-per-run 1")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise CavError(f"--max-parallel {self.max_parallel} is invalid: pass 1 or more")


def prepare(manifest, out, recipe: str | None, retry_failed: bool) -> tuple[list[Step], Path]:
    """Everything before Ray: read the recipe and manifest, validate, hash and plan."""
    base = load_recipe(recipe) if recipe else {}
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise CavError(f"--out '{out}' is a file: pass a folder path")
    return plan(load_rows(Path(manifest), base), out, retry_failed), out


def format_plan(steps: list[Step], out: Path, opts: Options) -> str:
    gpu = f"{opts.gpus_per_run:g} GPU(s) on a cluster with GPUs, else " if opts.gpus_per_run > 0 else ""
    lines = [f"plan: {len(steps)} row(s) → {out}",
             f"resources per run: {gpu}{opts.cpus_per_run:g} CPU slot(s); at most "
             f"{opts.max_parallel or 'as many as fit'} at once",
             f"{'line':>5}  {'name':<24} action"]
    for s in steps:
        lines.append(f"{s.row.line:>5}  {s.row.name:<24} {s.action}{' (' + s.detail + ')' if s.detail else ''}")
    todo = sum(s.runs for s in steps)
    lines.append(f"to run: {todo}, skipped: {len(steps) - todo}"
                 + ("; failed rows rerun with --retry-failed" if any(s.action == "skip-failed" for s in steps) else ""))
    return "\n".join(lines)


def run(steps: list[Step], out: Path, opts: Options, manifest: str, echo: Callable[[str], None] = print) -> dict:
    """Run the rows that need it on Ray, then write the index; returns it. Ctrl-C: see ``_drive``."""
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / LOCK, wait=0, busy=f"another `cav batch` is writing '{out}'"):
        todo = [s for s in steps if s.runs]
        for s in steps:
            if not s.runs:
                echo(f"{s.action:<14}{s.row.name}")
        try:
            if todo:
                with _ray(opts.address) as started_here:
                    if not started_here:
                        check_cluster_paths(todo, out)
                    _drive(todo, out, opts, _skipped(steps), lambda: write_index(steps, out, manifest))
        finally:
            index = write_index(steps, out, manifest)
        return index


def _import_ray():
    try:
        import ray
    except ImportError:
        raise CavError("cav batch runs on Ray, which is not installed: pip install 'cav[batch]' (or ray==2.60.0)") from None
    return ray


@contextlib.contextmanager
def _ray(address: str | None):
    """Connect to Ray: an existing cluster (``address``), the one already initialised in this process, or a new
    local one; yields whether this call started a local cluster (then it also shuts it down)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield address is None
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:  # a private local cluster; the object store only carries small results
            ray.init(include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False,
                     logging_level="ERROR")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise CavError(f"could not connect to Ray at '{address}' ({one_line(exc)}): check --address "
                       "(ray://HOST:10001, HOST:6379 or auto) or leave it out to run on this machine") from None
    try:
        yield address is None
    finally:
        ray.shutdown()


def resources(cluster: dict, nodes: list[dict], opts: Options) -> tuple[dict, int]:
    """Ray options of one row's task and how many rows fit at once: GPUs where the cluster has them, else CPUs."""
    gpus = cluster.get("GPU", 0)
    if gpus > 0 and opts.gpus_per_run > 0:
        biggest = max(n.get("Resources", {}).get("GPU", 0) for n in nodes)
        if opts.gpus_per_run > biggest:
            raise CavError(f"--gpus-per-run {opts.gpus_per_run:g} but the largest node has {biggest:g} GPU(s): "
                           f"pass --gpus-per-run {biggest:g} or less")
        need, slots = {"num_gpus": opts.gpus_per_run, "num_cpus": opts.cpus_per_run}, gpus / opts.gpus_per_run
    else:
        cpus = cluster.get("CPU", 0)
        if opts.cpus_per_run > cpus:
            raise CavError(f"--cpus-per-run {opts.cpus_per_run:g} but the cluster has {cpus:g} CPU(s): pass less")
        need, slots = {"num_gpus": 0, "num_cpus": opts.cpus_per_run}, cpus / opts.cpus_per_run
    parallel = max(1, int(math.floor(slots + 1e-9)))
    return need, min(parallel, opts.max_parallel) if opts.max_parallel else parallel


def check_cluster_paths(steps: list[Step], out: Path) -> None:
    """Before submitting to an existing cluster: every node must read the clips and base and write ``out``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = out / f".probe-{uuid.uuid4().hex}"
    write_text(probe, "cav batch probe\n")
    paths = {str(c): f"clip of line {s.row.line}" for s in steps for c in s.row.clips}
    paths.update({v: k for s in steps for k, v in s.row.cfg.keys().items()
                  if k in PATH_KEYS and Path(v or "").is_absolute()})
    paths[str(probe)] = f"--out '{out}'"
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        refs = [ray.remote(_unreadable).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(sorted(paths)) for n in nodes]
        missing = {n["NodeManagerAddress"]: bad for n, bad in zip(nodes, ray.get(refs, timeout=300)) if bad}
    finally:
        probe.unlink(missing_ok=True)
    if missing:
        node, bad = next(iter(missing.items()))
        what = ", ".join(f"{paths[p]} ({p})" for p in bad[:3])
        raise CavError(f"{len(missing)} node(s) of the cluster cannot read the inputs, e.g. node {node}: {what}; "
                       "put the clips, models and --out on a filesystem every node mounts at the same path")


def _unreadable(paths: list[str]) -> list[str]:
    import os

    return [p for p in paths if not os.access(p, os.R_OK)]


def _skipped(steps: list[Step]) -> dict:
    return {"done": sum(s.action == "skip-finished" for s in steps), "failed": sum(s.action == "skip-failed" for s in steps)}


def _drive(todo: list[Step], out: Path, opts: Options, skipped: dict, on_done: Callable[[], object]) -> None:
    """Submit rows while slots are free and report each as it ends (a line each; the index is rewritten).

    Ctrl-C stops submitting and cancels the running tasks, which reach ``api.train`` as KeyboardInterrupt: it
    checkpoints the last step. A second Ctrl-C stops waiting for them. KeyboardInterrupt then goes to the caller.
    """
    import ray
    from tqdm.auto import tqdm

    need, parallel = resources(ray.cluster_resources(), ray.nodes(), opts)
    task = ray.remote(train_row).options(max_retries=2, retry_exceptions=False, **need)
    pending, running = list(todo), {}
    counts = dict(skipped)
    bar = tqdm(total=len(todo) + sum(skipped.values()), initial=sum(skipped.values()), desc="library", unit="row", disable=opts.quiet,
               dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                step = pending.pop(0)
                running[task.remote(_spec(step, out, need))] = step
            bar.set_postfix(done=counts["done"], running=len(running), failed=counts["failed"])
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                record = _result(ref, running.pop(ref), out)
                counts["failed" if record["status"] == "failed" else "done"] += 1
                bar.update(1)
                bar.set_postfix(done=counts["done"], running=len(running), failed=counts["failed"])
                bar.write(_row_line(record))
                on_done()
    except KeyboardInterrupt:
        bar.write(f"stopping: no new rows; {len(running)} running row(s) save a checkpoint (Ctrl-C again: stop now)")
        _cancel(running, out)
        raise
    finally:
        bar.close()


def _spec(step: Step, out: Path, need: dict) -> dict:
    row = step.row
    return {"name": row.name, "line": row.line, "clip": str(row.clip), "recipe": row.cfg.to_dict(),
            **({"clips": [str(c) for c in row.clips]} if row.more else {}),
            "video_options": row.video_options, "hash": row.key, "out": str(out), "cpus": need["num_cpus"]}


def _result(ref, step: Step, out: Path) -> dict:
    """The task's record; a task Ray could not finish (worker lost after its retries) is recorded as failed."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        record = {"name": step.row.name, "line": step.row.line, "hash": step.row.key, "status": "failed",
                  "error": f"the task died: {one_line(exc)}"}
        write_state(out / step.row.name, record)
        return record


def _cancel(running: dict, out: Path) -> None:
    import ray

    for ref in running:
        ray.cancel(ref)
    try:
        ray.wait(list(running), num_returns=len(running), timeout=600)
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)


def _row_line(record: dict) -> str:
    if record["status"] == "failed":
        return f"failed        {record['name']}: {record.get('error', '')}"
    loss = record.get("final_loss")
    return (f"finished      {record['name']} in {record.get('seconds', 0):.1f} s"
            + (f", final loss {loss:.4f}" if loss is not None else "")
            + (f" → {record['contact_sheet']}" if record.get("contact_sheet") else ""))


# ------------------------------------------------------------------------------------------------ the index
def write_index(steps: list[Step], out: Path, manifest: str) -> dict:
    """OUT/index.json, OUT/index.md and OUT/library.png from the rows' run folders (the truth on disk)."""
    rows = [_index_row(s, out) for s in steps]
    counts = {k: sum(r["status"] == k for r in rows) for k in ("finished", "failed", "interrupted", "pending")}
    index = {"manifest": str(manifest), "out": str(out), "counts": counts, "rows": rows}
    write_json(out / "index.json", index)
    write_text(out / "index.md", _markdown(index))
    _library_png(rows, out)
    return index


def _index_row(step: Step, out: Path) -> dict:
    row = step.row
    state = read_state(out / row.name) or {}
    status = state.get("status", "pending")
    if status == "running":
        status = "interrupted"  # nothing runs once the driver has stopped
    if status == "finished" and state.get("hash") != row.key:
        status = "pending"
    return {"row": row.line, "name": row.name, "clip": str(row.clip), "status": status,
            **({"clips": [str(c) for c in row.clips]} if row.more else {}),
            "seconds": state.get("seconds"), "final_loss": state.get("final_loss"), "error": state.get("error"),
            "contact_sheet": state.get("contact_sheet") if status == "finished" else None, "hash": row.key}


def _markdown(index: dict) -> str:
    lines = [f"# Motion library: {index['out']}", "", f"Manifest `{index['manifest']}`: "
             + ", ".join(f"{v} {k}" for k, v in index["counts"].items() if v), "",
             "| row | name | status | seconds | final loss | contact sheet | error |", "|---|---|---|---|---|---|---|"]
    for r in index["rows"]:
        sheet = f"[{r['name']}]({r['contact_sheet']})" if r["contact_sheet"] else ""
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else ""
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
        error = (r["error"] or "").replace("|", "\\|")
        lines.append(f"| {r['row']} | {r['name']} | {r['status']} | {secs} | {loss} | {sheet} | {error} |")
    return "\n".join(lines) + "\n"


def _library_png(rows: list[dict], out: Path) -> None:
    """One strip of validation frames per finished row (its first validation sample)."""
    import numpy as np

    from .data.video import write_contact_sheet

    videos, labels = [], []
    for r in rows:
        sample = out / r["name"] / "samples" / "sample-0.npy"
        if r["status"] == "finished" and sample.is_file():
            videos.append([np.load(sample, allow_pickle=False)])
            labels.append(r["name"])
    if videos:
        write_contact_sheet(out / "library.png", videos, labels=labels)


def summary(index: dict) -> str:
    c = index["counts"]
    text = f"library {index['out']}: " + ", ".join(f"{v} {k}" for k, v in c.items() if v) + \
        f" (of {len(index['rows'])} rows); see {Path(index['out']) / 'index.md'}"
    failed = [r for r in index["rows"] if r["status"] == "failed"]
    if failed:
        text += "\nfailed rows (fix them, then rerun with --retry-failed):"
        text += "".join(f"\n  line {r['row']} {r['name']}: {r['error']}" for r in failed)
    return text
