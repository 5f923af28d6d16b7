"""The web app's callbacks without a browser (``cav.ui.app.App``), on the tiny model: the same checks and messages
as the CLI, one training at a time, Stop leaves a resumable checkpoint, Resume finishes the run, a weights × seeds
grid, and the Runs tab's zip / delete."""

import json
import signal
import time
import zipfile
from pathlib import Path

import pytest

from cav.cli import main
from cav.ui import form, runs
from cav.ui.app import App

PROMPT = "a red square moving right on a navy background"


def _advanced(app, **overrides):
    values = app.preset("")  # TrainConfig's defaults, the server's base
    values.update({"size": "32", "ti_tokens": 2, "absorber_batch": 2, "sample_steps": 1, **overrides})
    return {f.key: values[f.key] for f in form.advanced_fields()}


@pytest.fixture
def app(tiny_model, tmp_path):
    return App(str(tiny_model), tmp_path / "runs", tmp_path / "work")


def _start(app, clip, name="r1", prompt=PROMPT, frames=4, **overrides):
    adv = _advanced(app, **{"steps": 2, "absorber_steps": 1, "checkpoint_every": 1, **overrides})
    return app.start_training(str(clip), None, 0, 0, 0, prompt, "", frames, name, False, adv)


def _wait(app, timeout=300):
    deadline = time.time() + timeout
    while app.jobs.busy():
        assert time.time() < deadline, "training did not end"
        time.sleep(0.2)
    return app.jobs.current.message()


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def test_preset_round_trips_through_the_form(app):
    values = app.preset("toy")
    cfg = form.build_config("p", "", values["frames"], {f.key: values[f.key] for f in form.advanced_fields()})
    from cav.config import TrainConfig, load_recipe

    assert cfg == TrainConfig.from_dict({**load_recipe("toy"), "prompt": "p",
                                         "base": app.base})
    assert "toy" in form.presets()


def test_bad_inputs_get_the_cli_s_line(app, tmp_path, tiny_video, tiny_model, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    cli = _cli_error(capsys, ["train", str(notes), "--prompt", PROMPT, "--base", str(tiny_model), "--out",
                              str(tmp_path / "cli"), "--frames", "4", "--size", "32"])
    assert _start(app, notes) == cli
    assert app.preview(str(notes), None, 0, 0, 0, 4, "32", "crop") == (None, cli)
    short = _cli_error(capsys, ["train", str(tiny_video), "--prompt", PROMPT, "--base", str(tiny_model), "--out",
                                str(tmp_path / "cli"), "--frames", "9", "--size", "32"])
    assert _start(app, tiny_video, frames=9) == short
    empty = _cli_error(capsys, ["train", str(tiny_video), "--prompt", " ", "--out", str(tmp_path / "cli")])
    assert _start(app, tiny_video, prompt=" ") == empty
    bad_lr = _cli_error(capsys, ["train", str(tiny_video), "--prompt", PROMPT, "--t-lora-lr", "0"])
    assert _start(app, tiny_video, t_lora_lr=0) == bad_lr
    odd = _cli_error(capsys, ["train", str(tiny_video), "--prompt", PROMPT, "--base", str(tiny_model), "--out",
                              str(tmp_path / "cli"), "--frames", "4", "--size", "36"])
    assert _start(app, tiny_video, size="36") == odd  # a size the base cannot take (preflight)
    assert _start(app, tiny_video, size="a b") == "cav: error: size (--size): 'a b' is not a size: give H or HxW, e.g. 256 or 256x448"
    assert _start(app, tiny_video, name="../x").startswith("cav: error: run name '../x' is not a plain folder name")
    assert app.start_training(None, None, 0, 0, 0, PROMPT, "", 4, "r", False, _advanced(app)) == \
        "cav: error: no reference video given: upload a clip or pick a toy-world clip"
    assert app.jobs.current is None and not list(app.root.glob("r*"))  # nothing started, nothing written


def test_preview_shows_what_training_reads(app, tiny_video):
    path, line = app.preview(str(tiny_video), None, 0, 0, 0, 3, "32", "crop")
    assert line == "preview: 3 frames of 'square.mp4' at 32×32 (what training sees)"
    from cav.data.video import read_video

    assert read_video(path, frames=None, size=(32, 32)).shape[0] == 3
    path, line = app.preview(None, "red circle, spiral", 0, 0, 0, 8, "32 32", "crop")
    assert path and "8 frames of 'spiral-circle.mp4'" in line


def test_train_generate_runs_tab(app, tiny_video, tmp_path):
    assert _start(app, tiny_video) == f"started training 'r1' in {app.root / 'r1'}"
    assert _start(app, tiny_video, name="r2").startswith("cav: error: a training is already running ('r1')")
    assert _wait(app) == f"finished: T-LoRA in {app.root / 'r1' / 't_lora'}, samples in {app.root / 'r1' / 'samples'}"
    # the app's run is the CLI's run: the same files, the recipe as given, the clip kept for Resume
    cfg = runs.read_config(app.root / "r1")
    assert (cfg["steps"], cfg["prompt"], cfg["frames"]) == (2, PROMPT, 4)
    kept = json.loads((app.root / "r1" / "data.json").read_text())["clip"]
    assert kept.startswith(str(app.root / runs.CLIPS))
    shown = app.poll({})
    assert shown["progress"] == "t_lora step 2/2 · 3/3 steps in all, loss " + \
        f"{runs.read_log(app.root / 'r1')[-1]['loss']:.4f}, about 0 s left"
    assert shown["sample"].endswith("checkpoints/step-000002/samples/sample-0.mp4") and "figure" in shown
    again = app.poll(shown["shown"])  # nothing new: the page keeps its plot and video
    assert "figure" not in again and "sample" not in again
    assert _start(app, tiny_video) == f"cav: error: '{app.root / 'r1'}' already holds a run: pass --resume to " \
        "continue it, --overwrite to replace it, or another --out"

    grid, files, line = app.generate(["r1"], "0.5, 1", "3, 4", "r1", 0.5, "a blue square moving right", "",
                                     4, 2, 0)
    assert line.startswith("4 video(s) in") and grid.count("<video ") == 4
    assert sorted(p.rsplit(".", 1)[1] for p in files) == ["gif"] * 4 + ["mp4"] * 4
    assert "r1:0.5" in grid and "seed 4" in grid
    # issue 28: the videos are kept under --runs (not a temp folder) and the Runs tab lists them
    assert all(p.startswith(str(app.root / "generations")) for p in files) and str(app.root) not in grid
    assert line.endswith(f"in generations/{app.generation_choices()[0]} (listed in the Runs tab)")
    shown, said = app.show_generation(app.generation_choices()[0])
    assert shown == grid and said == f"generation {app.generation_choices()[0]}"
    assert shown.count('src="cav/runs/generations/') == 4
    assert app.generate(["r1"], "0.5/1", "0", None, 1, "x", "", 4, 2, 0)[2].startswith(
        "cav: error: weights '0.5/1' give 2 values for 1 adapters")
    assert app.generate(["r1"], "", "0", None, 1, " ", "", 4, 2, 0)[2] == \
        "cav: error: the prompt is empty: pass --prompt 'a description of the video to generate'"
    assert app.generate(["r1"], "1,2,3,4,5", "0,1,2,3", None, 1, "x", "", 4, 2, 0)[2].startswith(
        "cav: error: the grid has 20 videos")

    info = app.run_details("r1")
    assert "steps: 2" in info["config"] and info["checkpoints"] == ["step-000001", "step-000002"]
    assert info["metrics"]["summary"]["final_checkpoint"] == "step-000002" and info["sheets"]
    path, _ = app.zip_adapter("r1")
    assert "t_lora/adapter_model.safetensors" in zipfile.ZipFile(path).namelist()
    assert app.run_details("../r1")["status"].startswith("cav: error: '../r1' is not a run under")
    assert app.delete_run("r1", False).startswith("cav: error: deleting 'r1' removes all its files")
    assert (app.root / "r1").is_dir()
    assert app.delete_run("r1", True) == "deleted 'r1'" and not (app.root / "r1").exists()
    assert app.poll({})["job"] == "run 'r1' was deleted"
    assert app.run_choices() == []


@pytest.mark.slow
def test_stop_leaves_a_checkpoint_and_resume_finishes(app, tiny_video):
    assert _start(app, tiny_video, steps=30, absorber_steps=1, checkpoint_every=0).startswith("started")
    run = app.root / "r1"
    deadline = time.time() + 300
    while not any(r["stage"] == "t_lora" for r in runs.read_log(run)):
        assert app.jobs.busy() and time.time() < deadline, app.jobs.current.message()
        time.sleep(0.2)
    assert app.delete_run("r1", True) == "cav: error: 'r1' is training: stop it before deleting it"
    assert app.stop_training().startswith("training 'r1' (stopping")
    assert _wait(app) == "stopped: the last step of 'r1' is checkpointed; pick it under Resume to continue"
    assert app.jobs.current.proc.returncode == 130
    assert app.resumable_choices() == ["r1"] and runs.checkpoints(run)
    assert app.poll({})["resumable"] == ["r1"]  # the page offers it under Resume once the child has ended
    stopped_at = len(runs.read_log(run))
    assert app.stop_training() == "cav: error: no training is running: nothing to stop"
    assert app.resume_training("r1") == "resuming 'r1'"
    assert _wait(app).startswith("finished")
    log = runs.read_log(run)
    assert len(log) == 31 and log[-1]["step"] == 30 and len(log) > stopped_at
    assert app.resumable_choices() == []


def test_cav_ui_refuses_a_bad_login_or_a_busy_port(capsys, tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("CAV_UI_PASSWORD", raising=False)
    assert _cli_error(capsys, ["ui", "--auth", "alice"]) == \
        "cav: error: --auth alice needs a password: put it in a file (--password-file FILE) or in $CAV_UI_PASSWORD"
    # issue 25: the password never on the command line (ps shows it to every local user)
    assert _cli_error(capsys, ["ui", "--auth", "alice:secret"]) == \
        "cav: error: --auth takes a user name only: a password on the command line shows in ps; pass --auth alice " \
        "and put the password in a file (--password-file) or in $CAV_UI_PASSWORD"
    # a server others can reach needs a login
    assert _cli_error(capsys, ["ui", "--host", "0.0.0.0"]) == \
        "cav: error: --host 0.0.0.0 opens the app to the network: pass --auth USER (password in --password-file " \
        "or $CAV_UI_PASSWORD), or keep --host 127.0.0.1"
    assert _cli_error(capsys, ["ui", "--share"]).startswith("cav: error: --share opens the app to the internet: "
                                                            "pass --auth USER")
    from cav.ui.layout import credentials

    (tmp_path / "pw").write_text("s3cret\n")
    assert credentials("alice", str(tmp_path / "pw")) == ("alice", "s3cret")
    monkeypatch.setenv("CAV_UI_PASSWORD", "from-env")
    assert credentials("alice", None) == ("alice", "from-env")
    assert _cli_error(capsys, ["ui", "--auth", "alice", "--password-file", str(tmp_path / "none")]).startswith(
        f"cav: error: cannot read --password-file '{tmp_path / 'none'}' (No such file or directory)")
    # issue 28: --runs naming a file is refused before the server starts
    (tmp_path / "afile").write_text("x")
    assert _cli_error(capsys, ["ui", "--runs", str(tmp_path / "afile")]) == \
        f"cav: error: --runs '{tmp_path / 'afile'}' is a file: pass a folder for the app's runs (it is created if missing)"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _cli_error(capsys, ["ui", "--port", str(port)]) == \
            f"cav: error: port {port} on 127.0.0.1 is in use: pass another --port"


def test_the_page_builds_with_every_recipe_field(app):
    pytest.importorskip("gradio")
    from cav.ui import layout

    demo = layout.build(app)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {f"field-{f.key}" for f in form.advanced_fields()} <= ids
    assert {"clip-upload", "start", "stop", "resume", "gen-start", "gen-grid", "runs-delete", "runs-zip"} <= ids
    assert layout.say("cav: error: it's 'x'") == '<p class="cav-line cav-error">cav: error: it&#x27;s &#x27;x&#x27;</p>'


def test_a_clip_must_be_an_upload_of_this_server_and_no_server_path_is_shown(tiny_model, tmp_path, tiny_video):
    """Issue 25: a posted path (``/etc/passwd``) was read as the clip and its copy's path printed."""
    import shutil

    uploads = tmp_path / "work" / "uploads"
    app = App(str(tiny_model), tmp_path / "runs", tmp_path / "work", uploads=uploads, runs_label="runs")
    (uploads / "h1").mkdir(parents=True)
    clip = shutil.copy(tiny_video, uploads / "h1" / "clip.mp4")
    assert app.preview(clip, None, 0, 0, 0, 3, "32", "crop")[1].startswith("preview: 3 frames of 'clip.mp4'")
    (uploads / "h1" / "link.mp4").symlink_to(tiny_video)
    for path in ("/etc/passwd", str(tiny_video), str(uploads / "h1" / "link.mp4"), str(uploads / "h1" / ".." / ".." /
                                                                                      ".." / "runs")):
        assert app.preview(path, None, 0, 0, 0, 3, "32", "crop") == \
            (None, f"cav: error: '{Path(path).name}' is not a clip uploaded to this server: upload it with the clip "
                   "field")
    (uploads / "h1" / "notes.txt").write_text("not a video")
    line = app.preview(str(uploads / "h1" / "notes.txt"), None, 0, 0, 0, 3, "32", "crop")[1]
    assert line.startswith("cav: error: 'notes.txt' is not a video") and str(tmp_path) not in line
    assert _start(app, clip) == "started training 'r1' in runs/r1"  # the runs folder as the user named it
    _wait(app)


def test_a_run_held_by_another_process_cannot_be_deleted(app):
    """Issue 25/28: the run's lock (held by whoever trains it: the CLI, another server, a batch) blocks Delete."""
    from cav import runlock

    run = app.root / "busy"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 1\n")
    with runlock.RunLock(run):
        assert app.delete_run("busy", True) == f"cav: error: run '{run}' is being trained by another process: " \
            "wait for it to finish or stop it, then delete it"
        assert run.is_dir()
    assert app.delete_run("busy", True) == "deleted 'busy'" and not run.exists()


def test_generation_is_a_job_stop_ends_it_and_too_many_steps_is_one_line(app):
    import threading

    # issue 25: steps above the scheduler's timesteps were a raw 500
    assert app.generate([], "", "0", None, 1, "a red square", "", 4, 5000, 0) == \
        ("", [], "cav: error: steps (--steps) 5000 is more than this base's scheduler has timesteps (1000): pass "
                 "--steps 1000 or fewer")
    assert app.stop_generation() == "cav: error: no generation is running: nothing to stop"
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=app.generate(
        [], "", "0, 1, 2, 3", None, 1, "a red square", "", 4, 1000, 0)))
    worker.start()
    deadline = time.time() + 60
    while app.grids.proc is None or app.grids.proc.poll() is not None:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    t0 = time.time()
    assert app.stop_generation() == "stopping the generation"
    worker.join(30)
    assert not worker.is_alive() and time.time() - t0 < 10
    assert result["out"][2].startswith("cav: error: the generation was stopped")
    assert app.grids.proc.returncode != 0


def test_the_train_tab_shows_the_child_s_own_end(app, tiny_video):
    """Issue 28: a training that ended before its folder existed said 'run was deleted'; a Stop before the first
    checkpoint said the last step was checkpointed."""
    ghost = app.root / "ghost"
    app.jobs.start(ghost, [str(app.root / "missing.mp4"), "--out", str(ghost), "--prompt", PROMPT])
    _wait(app)
    said = app.poll({})["job"]
    assert said.startswith("cav: error:") and "missing.mp4" in said and "deleted" not in said
    assert _start(app, tiny_video, steps=50, checkpoint_every=0).startswith("started")
    app.stop_training()
    assert _wait(app) == "stopped before 'r1' had a checkpoint: nothing to resume; start it again"
    assert app.resumable_choices() == []
    first = app.poll({})
    assert first["resumable"] == [] and "resumable" not in app.poll(first["shown"])  # Resume offers nothing
    # a Stop the child does not answer (it is busy in a library that holds Ctrl-C): Stop again ends it at once
    assert _start(app, tiny_video, name="r2", steps=50, checkpoint_every=0).startswith("started")
    time.sleep(2)
    assert app.stop_training().endswith("Stop again ends it at once, without a checkpoint)")
    t0 = time.time()
    assert app.stop_training().startswith("stopped")
    assert not app.jobs.busy() and time.time() - t0 < 5


def test_a_stop_before_the_child_turns_ctrl_c_on_is_not_lost(app, tiny_video):
    """A server started in the background (`cav ui &`) ignores SIGINT and its child inherits that until it turns
    Ctrl-C back on; a Stop right after Start used to be lost there, and the run trained to its end."""
    was = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert _start(app, tiny_video, name="r3", steps=50, checkpoint_every=0).startswith("started")
        app.stop_training()
    finally:
        signal.signal(signal.SIGINT, was)
    assert _wait(app) == "stopped before 'r3' had a checkpoint: nothing to resume; start it again"


def test_the_app_loads_its_own_base_never_the_one_a_run_names(app):
    """Issue 25: a run's t_lora/cav.json named the base (a folder or hub id) that generation then loaded."""
    run = app.root / "foreign"
    (run / "t_lora").mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 1\n")
    (run / "t_lora" / "adapter_model.safetensors").write_bytes(b"")
    (run / "t_lora" / "cav.json").write_text(json.dumps({"kind": "temporal", "base": "/etc"}))
    assert app.generate(["foreign"], "", "0", None, 1, "x", "", 4, 2, 0)[2] == \
        f"cav: error: run 'foreign' was trained on base '/etc', but this server serves '{app.base}': start cav ui " \
        "--base /etc to generate with it"
    (run / "t_lora" / "cav.json").write_text(json.dumps({"kind": "temporal", "base": app.base,
                                                          "motion_adapter": "someone/motion"}))
    assert app.generate(["foreign"], "", "0", None, 1, "x", "", 4, 2, 0)[2] == \
        "cav: error: run 'foreign' was trained with the motion adapter 'someone/motion': type it in the motion " \
        "adapter field to load it"
    assert not (app.root / "generations").exists()  # refused before anything was written


def test_a_run_of_a_newer_cav_is_one_line_in_the_runs_tab_and_on_resume(app):
    """``data.json`` of a newer cav (a newer ``format_version``): Runs and Resume show the CLI's line, not a trace;
    the same file without a version (an older cav's) shows as it is."""
    from cav import versioned

    run = app.root / "later"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 1\n")
    record = {"clip": str(run / "gone.mp4"), "sha256": "ab", "selection": {}}
    (run / "data.json").write_text(json.dumps(record))
    assert app.run_details("later")["metrics"]["data"] == record
    (run / "data.json").write_text(json.dumps({versioned.KEY: versioned.CURRENT["data.json"] + 1, **record}))
    for line in (app.run_details("later")["status"], app.resume_training("later")):
        assert line.startswith("cav: error: ") and "written by a newer cav" in line and line.endswith("upgrade cav")
        assert "\n" not in line and "later/data.json" in line


def test_a_tiny_wan_trains_and_generates_through_the_app(tmp_path, tiny_video):
    """The app on a Wan base (a tiny one): a run with a Wan placement trains in the child process as `cav train`
    would (the family's recipe values, flow objective, the T-LoRA recorded as Wan's), and the Generate tab samples
    from it with the stock-layout base."""
    from cav.wan.tiny import make_tiny_wan

    app = App(str(make_tiny_wan(tmp_path / "wan")), tmp_path / "runs", tmp_path / "work")
    adv = _advanced(app, size="16", steps=2, absorber_steps=1, checkpoint_every=1, placement="qk")
    assert app.start_training(str(tiny_video), None, 0, 0, 0, PROMPT, "", 5, "w1", False, adv) == \
        f"started training 'w1' in {app.root / 'w1'}"
    assert _wait(app) == f"finished: T-LoRA in {app.root / 'w1' / 't_lora'}, samples in {app.root / 'w1' / 'samples'}"
    meta = json.loads((app.root / "w1" / "t_lora" / "cav.json").read_text())
    assert (meta["family"], meta["placement"], meta["validation"]["frames"]) == ("wan", "qk", 5)
    grid, files, line = app.generate(["w1"], "1", "3", None, 1, PROMPT, "", 5, 2, 0)
    assert line.startswith("1 video(s) in") and grid.count("<video ") == 1, line
    from cav.data.video import read_video

    video = read_video(next(p for p in files if p.endswith(".mp4")), frames=None, size=(16, 16))
    assert video.shape[0] == 5
