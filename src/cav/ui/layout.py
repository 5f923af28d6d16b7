"""The Gradio page (Train, Generate, Runs tabs) wired to ``app.App``'s callbacks, and ``serve`` for ``cav ui``.

Element ids (``elem_id``) name what the browser test drives; keep them stable.
"""

from __future__ import annotations

import html
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .. import runfolder
from ..errors import CavError
from . import form, guard
from . import runs as runs_mod
from .app import TOY_CLIPS, App

POLL_SECONDS = 1.0
CSS = """.cav-grid td, .cav-grid th { padding: 4px; text-align: center; vertical-align: top; }
.cav-line { margin: 2px 0; } .cav-error { color: #c0392b; font-weight: 600; }"""


def _field_component(gr, f, value):
    label, info = f.key, f.field.metadata.get("help", "")
    k, elem = form.kind(f), f"field-{f.key}"
    if k == "choice":
        return gr.Dropdown(list(form.choices(f)), value=value, label=label, info=info, elem_id=elem)
    if k == "bool":
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem)
    if k in ("int", "float"):
        return gr.Number(value=value, label=label, info=info, precision=0 if k == "int" else None, elem_id=elem)
    return gr.Textbox(value=value, label=label, info=info, lines=3 if k == "lines" else 1, elem_id=elem)


def build(app: App):
    """The Blocks of the whole app."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    default_preset = "toy" if "toy" in form.presets() else (form.presets() or [""])[0]
    values = app.preset(default_preset)
    fields = form.advanced_fields()
    with gr.Blocks(title="cav", analytics_enabled=False) as demo:
        demo.cav_theme = theme  # gradio 6 takes theme and css at launch (``serve``)
        gr.Markdown(f"## cav — one-shot motion customization\nbase model `{app.base}` · runs in `{app.runs_label}`")
        with gr.Tab("Train", id="train", elem_id="tab-train"):
            with gr.Row():
                with gr.Column():
                    clip = gr.File(label="reference clip (any video ffmpeg reads)", elem_id="clip-upload")
                    toy = gr.Dropdown(list(TOY_CLIPS), value=None, label="…or a toy-world reference clip",
                                      elem_id="toy-clip")
                    with gr.Row():
                        start = gr.Number(0, label="start (s)", elem_id="trim-start")
                        end = gr.Number(0, label="end (s, 0: the clip's end)", elem_id="trim-end")
                    with gr.Row():
                        frames = gr.Number(values["frames"], precision=0, label="frames (spread uniformly)",
                                           elem_id="trim-frames")
                        fps = gr.Number(0, label="fps (0: uniform spread)", elem_id="trim-fps")
                    preview = gr.Video(label="preview: the frames training sees", interactive=False,
                                       elem_id="clip-preview")
                    preview_status = gr.HTML(elem_id="preview-status")
                with gr.Column():
                    prompt = gr.Textbox(label="prompt (appearance + motion)", elem_id="prompt")
                    spatial = gr.Textbox(label="spatial prompt (appearance only; empty: the prompt)",
                                         elem_id="spatial-prompt")
                    with gr.Row():
                        name = gr.Textbox(app.next_run_name(), label="run name (folder under the runs folder)",
                                          elem_id="run-name")
                        preset = gr.Dropdown(form.presets(), value=default_preset, label="recipe preset",
                                             elem_id="preset")
                    overwrite = gr.Checkbox(False, label="replace a run of this name", elem_id="overwrite")
                    with gr.Accordion("advanced recipe fields", open=False, elem_id="advanced"):
                        adv = [_field_component(gr, f, values[f.key]) for f in fields]
                    with gr.Row():
                        start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                        stop_btn = gr.Button("Stop (keeps a resumable checkpoint)", elem_id="stop")
                    with gr.Row():
                        resume_run = gr.Dropdown(app.resumable_choices(), label="resume a stopped run",
                                                 elem_id="resume-run")
                        resume_btn = gr.Button("Resume", elem_id="resume")
            status = gr.HTML(elem_id="train-status")
            job = gr.HTML(elem_id="job-status")
            progress = gr.HTML(elem_id="progress")
            with gr.Row():
                loss = gr.Plot(label="loss", elem_id="loss-plot")
                with gr.Column():
                    sample = gr.Video(label="validation sample", interactive=False, elem_id="train-sample")
                    sample_label = gr.HTML(elem_id="sample-label")
            shown = gr.State({})

        with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column():
                    adapters = gr.Dropdown(app.adapter_choices(), multiselect=True, label="T-LoRA runs",
                                           elem_id="gen-adapters")
                    weights = gr.Textbox("", label="weights: grid columns, e.g. 0.5, 1 (or 0.7/0.3 for two "
                                         "adapters); empty: each run's own weight", elem_id="gen-weights")
                    seeds = gr.Textbox("0", label="seeds, e.g. 0, 1, 2", elem_id="gen-seeds")
                    with gr.Row():
                        image_lora = gr.Dropdown(app.image_lora_choices(), label="image LoRA (a run's S-LoRA)",
                                                 elem_id="gen-image-lora")
                        image_weight = gr.Number(1.0, label="image LoRA weight", elem_id="gen-image-weight")
                    refresh_gen = gr.Button("↻ refresh lists", size="sm", elem_id="gen-refresh")
                with gr.Column():
                    gen_prompt = gr.Textbox(label="prompt", elem_id="gen-prompt")
                    negative = gr.Textbox(label="negative prompt", elem_id="gen-negative")
                    with gr.Row():
                        gen_frames = gr.Number(0, precision=0, label="frames (0: the run's)", elem_id="gen-frames")
                        gen_steps = gr.Number(0, precision=0, label="steps (0: the run's)", elem_id="gen-steps")
                        gen_guidance = gr.Number(0, label="guidance (0: the run's)", elem_id="gen-guidance")
                    motion = gr.Textbox(label="AnimateDiff motion adapter (image-model bases: the run's, typed here)",
                                        elem_id="gen-motion-adapter")
                    with gr.Row():
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-start")
                        gen_stop = gr.Button("Stop", elem_id="gen-stop")
            gen_status = gr.HTML(elem_id="gen-status")
            gen_grid = gr.HTML(elem_id="gen-grid")
            gen_files = gr.File(label="downloads (mp4 and gif)", file_count="multiple", elem_id="gen-files")

        with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
            with gr.Row():
                run_pick = gr.Dropdown(app.run_choices(), label="run", elem_id="runs-pick")
                refresh_runs = gr.Button("↻ refresh", size="sm", elem_id="runs-refresh")
            runs_status = gr.HTML(elem_id="runs-status")
            with gr.Row():
                run_loss = gr.Plot(label="loss", elem_id="runs-loss")
                metrics = gr.JSON(label="summary and metrics", elem_id="runs-metrics")
            sheets = gr.Gallery(label="contact sheets", elem_id="runs-sheets", columns=1, object_fit="contain",
                                height="auto", preview=False)  # whole sheets, full width: no cropped thumbnails
            config = gr.Code(language="yaml", label="config.yaml", elem_id="runs-config")
            with gr.Row():
                zip_btn = gr.Button("Download the adapter (zip)", elem_id="runs-zip")
                zip_file = gr.File(label="adapter zip", elem_id="runs-zip-file")
            with gr.Row():
                gen_pick = gr.Dropdown(app.generation_choices(), label="generated videos (under the runs folder's "
                                       f"{runs_mod.GENERATIONS}/)", elem_id="runs-generations")
            gen_shown = gr.HTML(elem_id="runs-generation")
            with gr.Row():
                confirm = gr.Checkbox(False, label="yes, delete this run and all its files", elem_id="runs-confirm")
                delete_btn = gr.Button("Delete run", variant="stop", elem_id="runs-delete")

        # ---- train
        trim = [clip, toy, start, end, fps, frames, adv[[f.key for f in fields].index("size")],
                adv[[f.key for f in fields].index("fit")]]
        for k, comp in enumerate((clip, start, end, fps, frames)):  # api names: what tests drive over HTTP
            comp.change(_said(app.preview, 1), trim, [preview, preview_status], api_name=f"preview{k}")

        def pick_preset(name):
            vals = app.preset(name)
            return [vals["frames"]] + [vals[f.key] for f in fields]

        toy.change(_said(lambda *v: _pick_toy(gr, app, *v), 3), trim, [prompt, spatial, preview, preview_status])
        preset.change(pick_preset, preset, [frames] + adv)
        start_btn.click(_said(lambda *v: _start(app, fields, v)), [clip, toy, start, end, fps, prompt, spatial, frames, name,
                                                            overwrite] + adv, status, api_name="start")
        # Stop answers at once; the run is offered under Resume when its child has ended with a checkpoint (poll)
        stop_btn.click(_said(app.stop_training), None, status, concurrency_limit=None)
        resume_btn.click(_said(app.resume_training), resume_run, status)

        def poll(state):
            out = app.poll(state)
            label = say(out["sample_label"]) if "sample_label" in out else gr.update()
            ended = out.get("resumable")
            offer = gr.update() if ended is None else gr.update(
                choices=ended, value=app.jobs.current.run.name if app.jobs.current.run.name in ended else None)
            return (say(out["job"]), say(out.get("progress", "")), out.get("figure", gr.update()),
                    out.get("sample", gr.update()), label, offer, out["shown"])

        polled = [job, progress, loss, sample, sample_label, resume_run, shown]
        gr.Timer(POLL_SECONDS).tick(poll, shown, polled, show_progress="hidden", concurrency_limit=None)
        demo.load(poll, shown, polled, show_progress="hidden")

        # ---- generate
        def refresh_lists():
            return (gr.update(choices=app.adapter_choices()), gr.update(choices=app.image_lora_choices()),
                    gr.update(choices=app.resumable_choices()), gr.update(choices=app.run_choices()),
                    gr.update(choices=app.generation_choices()))

        lists = [adapters, image_lora, resume_run, run_pick, gen_pick]
        refresh_gen.click(refresh_lists, None, lists)
        gen_btn.click(_said(app.generate, 2), [adapters, weights, seeds, image_lora, image_weight, gen_prompt, negative,
                                     gen_frames, gen_steps, gen_guidance, motion], [gen_grid, gen_files, gen_status],
                      concurrency_limit=1, concurrency_id="generate")
        gen_stop.click(_said(app.stop_generation), None, gen_status, concurrency_limit=None)

        # ---- runs
        def show_run(name):
            info = app.run_details(name)
            if "config" not in info:
                return say(info["status"]), None, None, [], ""
            return (say(info["status"]), info["figure"], info["metrics"], [str(p) for p in info["sheets"]],
                    info["config"])

        run_pick.change(show_run, run_pick, [runs_status, run_loss, metrics, sheets, config])
        refresh_runs.click(refresh_lists, None, lists)
        gen_pick.change(_said(app.show_generation, 1), gen_pick, [gen_shown, runs_status])
        zip_btn.click(_said(lambda n: _swap(app.zip_adapter(n)), 0), run_pick, [runs_status, zip_file])

        def delete(name, ok):
            line = app.delete_run(name, ok)
            return say(line), gr.update(choices=app.run_choices(), value=None if line.startswith("deleted") else name), \
                False

        delete_btn.click(delete, [run_pick, confirm], [runs_status, run_pick, confirm])
        demo.load(refresh_lists, None, lists, show_progress="hidden")
        demo.load(app.next_run_name, None, name, show_progress="hidden")
    return demo


def say(line: str) -> str:
    """A status line as HTML, verbatim (Markdown would turn the CLI's quotes into typographic ones)."""
    if not line:
        return ""
    cls = "cav-line cav-error" if line.startswith("cav: error:") else "cav-line"
    return f'<p class="{cls}">{html.escape(line)}</p>'


def _said(fn, index: int | None = None):
    """``fn`` with its status line (its result, or the result's ``index``-th item) turned into HTML."""
    def wrapped(*args):
        try:
            out = fn(*args)
        except Exception:  # a bug, not a user's mistake (those come back as lines): keep its trace in the log
            traceback.print_exc()
            raise
        if index is None:
            return say(out)
        out = list(out)
        if isinstance(out[index], str):
            out[index] = say(out[index])
        return tuple(out)
    return wrapped


def _pick_toy(gr, app: App, upload, choice, *trim):
    """A toy clip fills the prompts with its caption and, when no clip is uploaded, shows its preview."""
    if not choice:
        return gr.update(), gr.update(), gr.update(), gr.update()
    _, full, appearance = app.toy_clip(choice)
    if upload:
        return full, appearance, gr.update(), gr.update()
    return (full, appearance, *app.preview(None, choice, *trim))


def _start(app: App, fields, values) -> str:
    main, advanced = values[:10], values[10:]
    return app.start_training(*main, advanced=dict(zip([f.key for f in fields], advanced)))


def _swap(pair):
    path, line = pair
    return line, path


def _free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            raise CavError(f"port {port} on {host} is in use: pass another --port") from None


PASSWORD_ENV = "CAV_UI_PASSWORD"


def credentials(auth: str | None, password_file: str | None) -> tuple[str, str] | None:
    """(user, password) for ``--auth USER``: the password from ``--password-file`` or ``$CAV_UI_PASSWORD``, never
    from the command line (every local user sees a process's arguments in ``ps``)."""
    if not auth:
        if password_file:
            raise CavError("--password-file needs --auth USER: pass the user name too")
        return None
    if ":" in auth:
        raise CavError(f"--auth takes a user name only: a password on the command line shows in ps; pass --auth "
                       f"{auth.split(':', 1)[0]} and put the password in a file (--password-file) or in ${PASSWORD_ENV}")
    if password_file:
        try:
            password = Path(password_file).read_text().strip("\r\n")
        except OSError as exc:
            raise CavError(f"cannot read --password-file '{password_file}' ({exc.strerror or exc}): pass a readable "
                           "file holding the password") from None
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise CavError(f"--auth {auth} needs a password: put it in a file (--password-file FILE) or in ${PASSWORD_ENV}")
    return auth, password


def check_exposure(host: str, share: bool, login) -> None:
    """A server others can reach (another --host than loopback, a share link) needs a login."""
    if login is None and share:
        raise CavError("--share opens the app to the internet: pass --auth USER (password in --password-file or "
                       f"${PASSWORD_ENV}) as well")
    if login is None and host not in guard.LOOPBACK:
        raise CavError(f"--host {host} opens the app to the network: pass --auth USER (password in --password-file "
                       f"or ${PASSWORD_ENV}), or keep --host 127.0.0.1")


def check_runs(runs: str) -> Path:
    """The runs folder must be (or become) a folder this user can write, before the server starts."""
    path = Path(runs).absolute()
    if path.exists() and not path.is_dir():
        raise CavError(f"--runs '{runs}' is a file: pass a folder for the app's runs (it is created if missing)")
    try:
        runfolder.check_writable(path)
    except CavError:
        raise CavError(f"--runs '{runs}' cannot be written: pass a folder you can write") from None
    return path.resolve()


def serve(host: str = "127.0.0.1", port: int = 7860, base: str = "toy", runs: str = "runs", auth: str | None = None,
          share: bool = False, password_file: str | None = None, max_upload_mb: int = 500) -> int:
    """``cav ui``: check the flags, build the app, print its address, serve until Ctrl-C or SIGTERM (a running
    training is then stopped with a checkpoint, and the server's private folder, uploads included, is removed)."""
    login = credentials(auth, password_file)
    check_exposure(host, share, login)
    root = check_runs(runs)
    _free(host, port)
    base = str(Path(base).resolve()) if Path(base).exists() else base  # the server works in its own folder
    work, uploads = _private_folder()
    try:
        import gradio  # noqa: F401
    except ImportError:
        shutil.rmtree(work, ignore_errors=True)
        raise CavError("the web app needs gradio: pip install 'cav[ui]'") from None
    app = App(base, root, work, uploads=uploads, runs_label=runs)
    demo = build(app)
    demo.queue(default_concurrency_limit=4)  # polling, previews and a generation run side by side
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background start inherits Ctrl-C ignored
    from starlette.middleware import Middleware

    shield = Middleware(guard.Guard, runs=root, uploads=uploads, host=host, port=port)
    try:
        demo.launch(server_name=host, server_port=port, auth=login, share=share, prevent_thread_lock=True,
                    quiet=True, footer_links=[], show_error=False, allowed_paths=[str(root)], theme=demo.cav_theme,
                    css=CSS, ssr_mode=False, mcp_server=False, max_file_size=f"{int(max_upload_mb)}mb",
                    app_kwargs={"middleware": [shield], "docs_url": None, "redoc_url": None, "openapi_url": None})
        _guard_first(demo.app)
        print(f"cav ui: http://{host}:{port} (runs in {root}; Ctrl-C stops)", flush=True)
        if share and demo.share_url:
            print(f"cav ui: public link {demo.share_url}", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        app.jobs.close()
        app.grids.close()
        demo.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _private_folder() -> tuple[Path, Path]:
    """A new 0700 folder that is this server's working folder, temp folder and gradio's upload and cache folder
    (set before gradio is imported: it reads them then; gradio accepts outputs from the working and temp folders).
    Returns (folder, uploads)."""
    work = Path(tempfile.mkdtemp(prefix="cav-ui-"))
    uploads = work / "uploads"
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(uploads),
                      GRADIO_EXAMPLES_CACHE=str(work / "cache"), GRADIO_RUN_HISTORY="False")
    tempfile.tempdir = str(work)
    os.chdir(work)
    return work, uploads


def _guard_first(fastapi_app) -> None:
    """Gradio adds its CORS middleware outside the app's own; put the guard outermost instead (so a refused
    request gets no CORS header either) and have Starlette rebuild the stack on the next request. Until then the
    guard already runs, one layer in."""
    fastapi_app.user_middleware.sort(key=lambda m: m.cls is not guard.Guard)
    fastapi_app.middleware_stack = None
