"""The web app's callbacks, without Gradio: each takes the page's values and returns what the page shows.

A user's mistake comes back as the CLI's own line (``cav: error: ...``) in a status field; the server goes on.
Training runs in a child process (``jobs.py``) writing the same run folder the CLI writes; a generation grid runs in
another (``grid.py``) writing under ``--runs/generations/``. Lines never show a server path (``App.public``).
``layout.py`` wires these callbacks to Gradio components.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from .. import preflight, runfolder, runlock, versioned
from ..config import TrainConfig, dump_yaml
from ..data import toyworld as tw
from ..errors import CavError
from . import form, grid, guard, runs
from .jobs import GridJobs, TrainingJobs

# the toy world's held-out motions (the base model never saw them), one appearance each: clips to customize on
TOY_CLIPS = {
    "red circle, spiral": tw.ToySpec("circle", "red", "navy", "spiral", scale=0.3),
    "yellow square, zigzag": tw.ToySpec("square", "yellow", "black", "zigzag", scale=0.3),
    "cyan triangle, figure eight": tw.ToySpec("triangle", "cyan", "grey", "figure8", scale=0.3),
}
TOY_FRAMES, TOY_SIZE = 16, 64


def error_line(exc: CavError) -> str:
    return f"cav: error: {exc}"


class App:
    """The state of one server: its base model, its runs folder, a scratch folder and its training job.

    ``uploads``: the only folder a clip may come from (the server's own upload folder; None for library use, where
    the caller's paths are trusted). ``runs_label``: how lines name the runs folder (as the user typed it)."""

    def __init__(self, base: str, runs_root: Path, work: Path, uploads: Path | None = None,
                 runs_label: str | None = None):
        self.base = base
        self.root = Path(runs_root).resolve()
        self.work = Path(work).resolve()
        self.uploads = Path(uploads).absolute() if uploads is not None else None
        self.runs_label = runs_label or str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs = TrainingJobs(self.work / "jobs")
        self.grids = GridJobs()
        self.deleted: set[Path] = set()  # runs deleted from the Runs tab (so the Train tab can say so)

    def public(self, line: str) -> str:
        """``line`` without server paths: a file in the server's private folder (an upload, a preview) by its name,
        the runs folder as the user named it."""
        line = re.sub(re.escape(str(self.work)) + r"/(?:[^/\s']+/)*", "", line)
        if self.uploads is not None:
            line = re.sub(re.escape(str(self.uploads)) + r"/(?:[^/\s']+/)*", "", line)
        return line.replace(str(self.root), self.runs_label)

    def error(self, exc: CavError) -> str:
        return self.public(error_line(exc))

    # ------------------------------------------------------------------------------------------------ train
    def preset(self, name: str) -> dict:
        return form.preset_values(name, self.base)

    def toy_clip(self, name: str) -> tuple[Path, str, str]:
        """Render a toy-world reference clip (once); returns (path, prompt, spatial prompt)."""
        if name not in TOY_CLIPS:
            raise CavError(f"unknown toy clip '{name}': pick one of {', '.join(TOY_CLIPS)}")
        from ..data.video import write_video

        spec = TOY_CLIPS[name]
        path = self.work / "toy" / f"{spec.motion}-{spec.shape}.mp4"
        if not path.is_file():
            write_video(path, tw.render(spec, frames=TOY_FRAMES, size=TOY_SIZE)[0])
        prompt, spatial = tw.caption(spec)
        return path, prompt, spatial

    def clip_path(self, upload, toy: str | None) -> Path:
        """The uploaded clip, else the picked toy clip."""
        if upload:
            path = Path(upload if isinstance(upload, (str, Path)) else upload.name)  # gradio 6: a path string
            if self.uploads is not None and guard.plain_path(path, self.uploads) is None:
                raise CavError(f"'{path.name}' is not a clip uploaded to this server: upload it with the clip field")
            return path
        if toy:
            return self.toy_clip(toy)[0]
        raise CavError("no reference video given: upload a clip or pick a toy-world clip")

    def preview(self, upload, toy, start, end, fps, frames, size, fit) -> tuple[str | None, str]:
        """The frames training will see (the same read as ``cav train``): (mp4 or None, status line)."""
        from ..data.video import read_video, write_video

        try:
            clip = self.clip_path(upload, toy)
            cfg = TrainConfig.from_dict({"frames": frames, "size": size, "fit": fit, **form.selection(start, end, fps)})
            data = cfg.data
            video = read_video(clip, frames=data.frames, size=tuple(data.size), fit=data.fit, **data.frame_selection())
        except CavError as exc:
            return None, self.error(exc)
        out = write_video(self.work / "preview" / f"preview-{time.time_ns()}.mp4", video)
        return str(out), f"preview: {len(video)} frames of '{clip.name}' at {video.shape[1]}×{video.shape[2]} " \
                         "(what training sees)"

    def start_training(self, upload, toy, start, end, fps, prompt, spatial_prompt, frames, name, overwrite,
                       advanced: dict) -> str:
        """Check everything the CLI would check, then start ``cav train`` in a child process."""
        from ..data.video import read_video

        try:
            self.jobs.check_idle()
            clip = self.clip_path(upload, toy)
            cfg = form.build_config(prompt, spatial_prompt, frames, advanced, form.selection(start, end, fps))
            if not cfg.prompt.strip():
                raise CavError("the prompt is empty: pass --prompt 'a description of the video and its motion'")
            preflight.check_train(cfg)  # size/frames the base takes, prompts its text encoder reads
            run = self._new_run_path(name)
            runfolder.check(run, bool(overwrite), False)
            read_video(clip, frames=cfg.data.frames, size=tuple(cfg.data.size), fit=cfg.data.fit,
                       **cfg.data.frame_selection())  # a bad clip fails here, as in api.train
            recipe = self.work / "jobs" / f"{run.name}-{time.time_ns()}.yaml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(dump_yaml(cfg))
            args = [str(self._keep_clip(clip)), "--out", str(run), "--recipe", str(recipe)]  # trimming is in it
            self.jobs.start(run, args + (["--overwrite"] if overwrite and (run / "config.yaml").exists() else []))
        except CavError as exc:
            return self.error(exc)
        return self.public(f"started training '{run.name}' in {run}")

    def _new_run_path(self, name: str) -> Path:
        name = str(name or "").strip()
        if not name:
            raise CavError("the run name is empty: type a name for the run's folder")
        if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise CavError(f"run name '{name}' is not a plain folder name: use letters, digits, '-', '_' and '.'")
        if name == runs.GENERATIONS:
            raise CavError(f"'{name}' is the folder of generated videos: pick another run name")
        return self.root / name

    def _keep_clip(self, clip: Path) -> Path:
        """Copy an uploaded or rendered clip under the runs folder, named by content, so Resume still finds it
        after the server (and its temporary files) are gone; a folder of images is used where it is."""
        if clip.is_dir():
            return clip.resolve()
        digest = runfolder.clip_record(clip, None)["sha256"][:16]
        kept = self.root / runs.CLIPS / f"{digest}{clip.suffix.lower()}"
        if not kept.is_file():
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip, kept)
        return kept

    def stop_training(self) -> str:
        try:
            return self.jobs.stop()
        except CavError as exc:
            return self.error(exc)

    def resume_training(self, name: str) -> str:
        """``cav train CLIP --out RUN --resume``, with the clip and frame selection the run recorded."""
        try:
            self.jobs.check_idle()
            run = runs.inside(self.root, name or "")
            data = run / "data.json"
            if not data.is_file():
                raise CavError(f"run '{run.name}' has no data.json (it never started training): start it anew")
            clip = Path(versioned.read(data)["clip"])
            if not clip.exists():
                raise CavError(f"the clip run '{run.name}' trained on is gone ({clip}): resume it from the command "
                               "line with that clip")
            runfolder.check(run, False, True)
            self.jobs.start(run, [str(clip), "--out", str(run), "--resume"])
        except CavError as exc:
            return self.error(exc)
        return f"resuming '{run.name}'"

    def poll(self, shown: dict) -> dict:
        """What changed in the current job's run since the page last showed it (``shown``: records, sample)."""
        job = self.jobs.current
        if job is None:
            return {"job": "no training started from this server yet", "shown": shown}
        out = {"shown": dict(shown)}
        if not job.running and shown.get("ended") != job.started:  # once per job: what Resume can offer now
            out["resumable"] = self.resumable_choices()
            out["shown"]["ended"] = job.started
        if not job.run.is_dir():  # deleted from the Runs tab, or ended before its folder was made: say which
            out["job"] = f"run '{job.run.name}' was deleted" if job.run in self.deleted else self.public(job.message())
            return out
        records = runs.read_log(job.run)
        out.update(job=self.public(job.message()), progress=runs.progress(job.run, records).text())
        if job.run != shown.get("run") or len(records) != shown.get("records"):
            out["figure"] = runs.loss_figure(records, f"loss: {job.run.name}")
            out["shown"].update(run=job.run, records=len(records))
        sample = runs.latest_sample(job.run)
        if sample and str(sample[1]) != shown.get("sample"):
            out["sample"], out["sample_label"] = str(sample[1]), f"validation sample at T-LoRA step {sample[0]}"
            out["shown"]["sample"] = str(sample[1])
        return out

    def next_run_name(self) -> str:
        k = 1
        while (self.root / f"run-{k:03d}").exists():
            k += 1
        return f"run-{k:03d}"

    # --------------------------------------------------------------------------------------------- generate
    def adapter_choices(self) -> list[str]:
        return [d.name for d in runs.adapter_runs(self.root)]

    def image_lora_choices(self) -> list[str]:
        return [d.name for d in runs.image_lora_runs(self.root)]

    def generate(self, adapters: list[str], weights: str, seeds: str, image_lora: str | None, image_weight,
                 prompt: str, negative_prompt: str, frames, steps, guidance,
                 motion_adapter: str = "") -> tuple[str, list[str], str]:
        """A weights × seeds grid of ``cav.api.generate`` in a child process (Stop ends it), written under
        ``--runs/generations/<stamp>/``: (HTML grid of <video>s, mp4+gif files, status)."""
        import json

        try:
            if not str(prompt or "").strip():
                raise CavError("the prompt is empty: pass --prompt 'a description of the video to generate'")
            paths = [runs.inside(self.root, a) for a in adapters or []]
            for path in paths:
                self._check_base(path, str(motion_adapter or "").strip())
            columns, seed_list = form.parse_weights(weights, len(paths)), form.parse_seeds(seeds)
            form.check_grid(columns, seed_list)
            image = [(str(runs.inside(self.root, image_lora)), float(image_weight or 1.0))] if image_lora else []
            folder = runs.new_generation(self.root)
            cells = [{"weights": ws, "seed": seed, "file": f"w{row}-seed{seed}.mp4"}
                     for row, ws in enumerate(columns) for seed in seed_list]
            spec = {"prompt": prompt, "adapters": [str(p) for p in paths], "names": [p.name for p in paths],
                    "seeds": seed_list, "image_loras": image, "base": self.base, "cells": cells,
                    "frames": int(frames) if frames else None, "steps": int(steps) if steps else None,
                    "guidance": guidance if guidance else None, "negative_prompt": negative_prompt or None,
                    "motion_adapter": str(motion_adapter or "").strip() or None}
            (folder / grid.SPEC).write_text(json.dumps(spec, indent=1))
            rc, said = self.grids.run(folder / grid.SPEC)
            if rc != 0 and not any((folder / c["file"]).is_file() for c in cells):
                shutil.rmtree(folder, ignore_errors=True)  # nothing to list in the Runs tab
            if self.grids.stopped:
                raise CavError("the generation was stopped" + (f": what was done is in {runs.GENERATIONS}/{folder.name}"
                                                               if folder.is_dir() else ""))
            if rc != 0:
                raise CavError(said.removeprefix("cav: error: ") or f"the generation ended with exit code {rc}")
        except CavError as exc:
            return "", [], self.error(exc)
        done = [folder / c["file"] for c in cells]
        files = [str(p) for p in done] + [str(p.with_suffix(".gif")) for p in done]
        return runs.generation_html(self.root, folder), files, \
            f"{len(done)} video(s) in {runs.GENERATIONS}/{folder.name} (listed in the Runs tab)"

    def stop_generation(self) -> str:
        try:
            return self.grids.stop()
        except CavError as exc:
            return self.error(exc)

    def _check_base(self, run: Path, motion_adapter: str) -> None:
        """A run's recorded base and motion adapter are compared with the server's base and the page's field, never
        loaded from (adapters are data): the user names what is loaded."""
        from ..adapters import lora

        meta = lora.read_meta(lora.find_adapter_dir(run, "temporal"))
        recorded, motion = meta.get("base"), meta.get("motion_adapter")
        if recorded is not None and str(recorded) != str(self.base):
            raise CavError(f"run '{run.name}' was trained on base '{recorded}', but this server serves '{self.base}': "
                           f"start cav ui --base {recorded} to generate with it")
        if motion and not motion_adapter:
            raise CavError(f"run '{run.name}' was trained with the motion adapter '{motion}': type it in the motion "
                           "adapter field to load it")

    def generation_choices(self) -> list[str]:
        return [d.name for d in runs.generations(self.root)]

    def show_generation(self, name: str) -> tuple[str, str]:
        try:
            folder = runs.generation(self.root, name or "")
        except CavError as exc:
            return "", self.error(exc)
        return runs.generation_html(self.root, folder), f"generation {name}"

    # ------------------------------------------------------------------------------------------------- runs
    def run_choices(self) -> list[str]:
        return [d.name for d in runs.list_runs(self.root)]

    def resumable_choices(self) -> list[str]:
        return [d.name for d in runs.resumable_runs(self.root)]

    def run_details(self, name: str) -> dict:
        try:
            run = runs.inside(self.root, name or "")
            info = runs.details(run)  # refuses a data.json of a newer cav
        except CavError as exc:
            return {"status": self.error(exc)}
        info["figure"] = runs.loss_figure(info["records"], f"loss: {run.name}")
        info["status"] = f"{run.name}: {len(info['records'])} logged steps, checkpoints " \
                         f"{', '.join(info['checkpoints']) or 'none'}"
        return info

    def zip_adapter(self, name: str) -> tuple[str | None, str]:
        try:
            run = runs.inside(self.root, name or "")
            path = runs.zip_adapter(run, self.work / "zips" / str(time.time_ns()))
        except CavError as exc:
            return None, self.error(exc)
        return str(path), f"adapter of '{run.name}' zipped: {path.name}"

    def delete_run(self, name: str, confirmed: bool) -> str:
        try:
            run = runs.inside(self.root, name or "")
            if not confirmed:
                raise CavError(f"deleting '{run.name}' removes all its files: tick the confirmation box first")
            job = self.jobs.busy()
            if job is not None and job.run.resolve() == run:
                raise CavError(f"'{run.name}' is training: stop it before deleting it")
            runlock.refuse_if_held(run, "delete it")  # a training by any process: this server's, the CLI's, a batch
            runs.delete_run(run)
            self.deleted.add(run)
        except CavError as exc:
            return self.error(exc)
        return f"deleted '{run.name}'"
