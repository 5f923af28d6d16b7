"""`cav batch` on a local Ray started here (2 CPUs, shared by the module): failures, reruns, retries, kills."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
from safetensors.torch import load_file

from cav import batch, resume
from cav.cli import main
from cav.data.video import write_video
from cav.errors import CavError

RECIPE = """base: {base}
steps: 4
absorber_steps: 3
frames: 4
size: [32, 32]
checkpoint_every: 1
sample_steps: 1
ti_tokens: 2
absorber_batch: 2
t_lora_lr: 0.01
s_lora_lr: 0.01
ti_lr: 0.01
"""
MANIFEST = """clip,prompt,spatial_prompt,name,seed
right.mp4,a red square moving right on a navy background,a red square,,
down.mp4,a red square moving down,a red square,down,1
broken.mp4,a red square moving left,a red square,left,
"""


def _clip(path, dx, dy):
    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    frames[..., 2] = 60
    for i in range(6):
        frames[i, 8 + dy * i:16 + dy * i, 4 + dx * i:12 + dx * i] = (230, 40, 40)
    write_video(path, frames, fps=8)


def _cli(*args):
    """Run `cav` in this process (sharing this module's Ray); returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _spawn(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cav.cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)


def _status(run):
    return (batch.read_state(run) or {}).get("status")


def _adapters(run):
    return {**load_file(str(run / "t_lora" / "adapter_model.safetensors")),
            **load_file(str(run / "absorbers" / "s_lora" / "adapter_model.safetensors")),
            **load_file(str(run / "absorbers" / "textual_inversion.safetensors"))}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (starting one on 2 busy cores takes ~10 s); yields its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False,
             logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    _clip(folder / "right.mp4", 3, 0)
    _clip(folder / "down.mp4", 0, 3)
    (folder / "broken.mp4").write_bytes(b"this is not a video" * 20)
    (folder / "recipe.yaml").write_text(RECIPE.format(base=tiny_model))
    (folder / "m.csv").write_text(MANIFEST)
    return folder


@pytest.fixture(scope="module")
def library(cluster, inputs):
    """The whole life of a library, phase by phase: first run (one bad clip), rerun, fix the clip and retry."""
    out, m, recipe = inputs / "lib", inputs / "m.csv", inputs / "recipe.yaml"
    phases = {"first": _cli("batch", m, "--out", out, "--recipe", recipe, "--quiet")}
    phases["index1"] = json.loads((out / "index.json").read_text())
    phases["md1"] = (out / "index.md").read_text()
    logs = {n: (out / n / "log.jsonl").read_bytes() for n in ("right", "down")}
    mtimes = {n: (out / n / "t_lora" / "adapter_model.safetensors").stat().st_mtime_ns for n in logs}
    phases["dry"] = _cli("batch", m, "--out", out, "--recipe", recipe, "--dry-run")
    phases["rerun"] = _cli("batch", m, "--out", out, "--recipe", recipe, "--quiet")
    phases["unchanged"] = all((out / n / "log.jsonl").read_bytes() == logs[n] and mtimes[n] ==
                              (out / n / "t_lora" / "adapter_model.safetensors").stat().st_mtime_ns for n in logs)
    shutil.copy(inputs / "right.mp4", inputs / "broken.mp4")  # the user fixes the clip
    phases["retry"] = _cli("batch", m, "--out", out, "--recipe", recipe, "--retry-failed", "--address", cluster,
                           "--quiet")
    phases["index3"] = json.loads((out / "index.json").read_text())
    phases["out"] = out
    return phases


def test_one_bad_clip_fails_alone_with_a_one_line_reason(library):
    code, stdout, _ = library["first"]
    assert code == 1
    rows = {r["name"]: r for r in library["index1"]["rows"]}
    assert [rows[n]["status"] for n in ("right", "down", "left")] == ["finished", "finished", "failed"]
    assert [r["row"] for r in library["index1"]["rows"]] == [2, 3, 4]
    err = rows["left"]["error"]
    assert "broken.mp4" in err and "\n" not in err and "Traceback" not in stdout
    assert f"line 4 left: {err}" in stdout and "--retry-failed" in stdout
    out = library["out"]
    for name in ("right", "down"):
        r = rows[name]
        assert r["seconds"] > 0 and np.isfinite(r["final_loss"]) and (out / r["contact_sheet"]).is_file()
        last = json.loads((out / name / "log.jsonl").read_text().splitlines()[-1])
        assert last["stage"] == "t_lora" and last["step"] == 4 and r["final_loss"] == last["loss"]
    md = library["md1"]
    assert "| 2 | right | finished |" in md and "(right/samples/contact_sheet.png)" in md
    assert "| 4 | left | failed |" in md and "broken.mp4" in md


def test_rerun_runs_no_training_step_for_finished_rows(library):
    assert library["unchanged"]
    code, stdout, _ = library["rerun"]
    assert code == 1  # the failed row stays failed without --retry-failed
    assert "skip-finished right" in stdout and "skip-finished down" in stdout and "skip-failed   left" in stdout
    code, stdout, _ = library["dry"]
    assert code == 0 and "to run: 0, skipped: 3" in stdout and "--retry-failed" in stdout


def test_retry_failed_after_the_fix_finishes_the_library(library):
    code, stdout, _ = library["retry"]
    assert code == 0, stdout
    assert [r["status"] for r in library["index3"]["rows"]] == ["finished"] * 3
    assert "finished      left" in stdout and "skip-finished right" in stdout
    from PIL import Image

    sheet = Image.open(library["out"] / "library.png")
    assert sheet.size[1] > 3 * 32  # one strip of 32-px frames per row
    code, stdout, _ = _cli("generate", "--adapter", library["out"] / "left", "--prompt", "a blue circle moving left",
                           "--steps", "1", "--out", library["out"] / "new.mp4", "--quiet")
    assert code == 0 and (library["out"] / "new.mp4").is_file()  # a library row is a run like any other


def test_config_hash_follows_recipe_and_clip_content(inputs, tmp_path):
    recipe = batch.load_recipe(inputs / "recipe.yaml")
    (tmp_path / "a.mp4").write_bytes((inputs / "down.mp4").read_bytes())
    (tmp_path / "m.jsonl").write_text(
        '{"clip": "a.mp4", "prompt": "p", "spatial_prompt": ""}\n'
        '{"clip": "a.mp4", "prompt": "p", "spatial_prompt": "", "name": "b", "steps": 5}\n')
    key = lambda: [batch.config_hash(r) for r in batch.load_rows(tmp_path / "m.jsonl", recipe)]  # noqa: E731
    first = key()
    assert first[0] != first[1] and key() == first
    (tmp_path / "a.mp4").write_bytes((inputs / "right.mp4").read_bytes())
    assert all(a != b for a, b in zip(key(), first))


def test_manifest_errors_name_every_bad_row_and_exit_2(inputs, tmp_path):
    clip = inputs / "right.mp4"
    rows = [{"clip": str(clip), "prompt": "ok", "spatial_prompt": "x", "name": "a"},
            {"clip": str(clip), "prompt": "p", "spatial_prompt": "x", "name": "b", "stepz": 3},
            {"clip": str(clip), "prompt": "p", "spatial_prompt": "x", "name": "a"},
            {"clip": "nowhere.mp4", "prompt": "p", "spatial_prompt": "x"},
            {"clip": str(clip), "spatial_prompt": "x", "name": "c"},
            {"clip": str(clip), "prompt": "p", "spatial_prompt": "x", "name": "d", "steps": "many"}]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = _cli("batch", m, "--out", tmp_path / "lib")
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("cav: error:") and len(lines) == 1 + 5, err
    assert "line 2: unknown key(s) stepz" in lines[1]
    assert "line 3: name 'a' is already used by line 1" in lines[2]
    assert "line 4: clip 'nowhere.mp4' does not exist" in lines[3]
    assert "line 5: missing field(s) prompt" in lines[4]
    assert "line 6: steps (--steps): 'many' is not a whole number" in lines[5]
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("name,text,expect", [
    ("empty.csv", "", "has no rows"),
    ("header.csv", "clip,prompt\n", "line 1: missing column(s) spatial_prompt"),
    ("keys.csv", "clip,prompt,spatial_prompt,learning_rate\n", "unknown column(s) learning_rate"),
    ("empty.yaml", "# nothing yet\n", "has no rows"),
    ("list.yaml", "- clip: right.mp4\n  prompt: p\n  spatial_prompt: s\n\n- clip: gone.mp4\n  prompt: p\n"
                  "  spatial_prompt: s\n", "line 5: clip 'gone.mp4' does not exist"),
    ("m.txt", "clip\n", "use a .csv, .jsonl or .yaml file"),
])
def test_bad_manifest_files(inputs, name, text, expect):
    m = inputs / name
    m.write_text(text)
    code, _, err = _cli("batch", m, "--out", inputs / "never")
    assert code == 2 and expect in err and "Traceback" not in err, err


def test_a_run_folder_batch_did_not_make_is_left_alone(inputs, tmp_path):
    (tmp_path / "lib" / "right").mkdir(parents=True)
    (tmp_path / "lib" / "right" / "config.yaml").write_text("mine\n")
    m = tmp_path / "m.csv"
    m.write_text(f"clip,prompt,spatial_prompt\n{inputs / 'right.mp4'},p,s\n")
    code, _, err = _cli("batch", m, "--out", tmp_path / "lib")
    assert code == 2 and "line 2:" in err and "did not make" in err
    assert (tmp_path / "lib" / "right" / "config.yaml").read_text() == "mine\n"


def test_cluster_probe_names_paths_the_nodes_cannot_read(cluster, inputs, tmp_path):
    row = batch.Row(7, "x", tmp_path / "only-on-my-laptop.mp4", batch.TrainConfig.of(prompt="p"))
    with pytest.raises(CavError, match=r"node .*clip of line 7 .*only-on-my-laptop.mp4.*every node mounts"):
        batch.check_cluster_paths([batch.Step(row, "train")], tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe file is cleaned up


@pytest.mark.slow
def test_killed_driver_then_rerun_gives_the_same_adapters(library, cluster, inputs):
    out = inputs / "lib-killed"
    args = ("batch", inputs / "m.csv", "--out", out, "--recipe", inputs / "recipe.yaml", "--address", cluster,
            "--quiet")
    names = ("right", "down", "left")
    proc = _spawn(*args)

    def mid_way():  # one row finished, another one checkpointed in its absorber stage (all its T-LoRA steps and
        status = {n: _status(out / n) for n in names}  # samples still ahead: margin for the kill on a busy machine)
        return "finished" in status.values() and any(
            status[n] == "running" and (point := resume.latest(out / n)) is not None and point.stage == "absorbers"
            for n in names)

    _wait_for(mid_way, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the driver
    proc.wait()
    cut = [n for n in names if _status(out / n) == "running" and not (out / n / "t_lora").exists()]
    assert cut
    code, stdout, _ = _cli(*args)
    assert code == 0, stdout
    for name in names:
        ref, got = _adapters(library["out"] / name), _adapters(out / name)
        assert ref.keys() == got.keys() and all(ref[k].equal(got[k]) for k in ref), name
        assert len((out / name / "log.jsonl").read_text().splitlines()) == 3 + 4  # no step logged twice
    assert all(f"finished      {n}" in stdout for n in cut)


@pytest.mark.slow
def test_ctrl_c_checkpoints_running_rows_and_says_how_to_continue(cluster, inputs):
    out = inputs / "lib-ctrl-c"
    proc = _spawn("batch", inputs / "m.csv", "--out", out, "--recipe", inputs / "recipe.yaml", "--address", cluster,
                  "--max-parallel", "1", "--quiet")
    _wait_for(lambda: resume.latest(out / "right") is not None, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    again = f"cav batch {inputs / 'm.csv'} --out {out} --recipe {inputs / 'recipe.yaml'} --address {cluster}"
    assert f"continue with `{again}`" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert _status(out / "right") in ("interrupted", "finished") and resume.latest(out / "right") is not None
    assert _status(out / "down") is None  # never submitted
    index = json.loads((out / "index.json").read_text())
    assert [r["status"] for r in index["rows"]][1:] == ["pending", "pending"]


@pytest.mark.slow
def test_a_lost_worker_is_retried_by_ray_and_resumes(library, cluster, inputs):
    m = inputs / "one.csv"
    m.write_text(MANIFEST.splitlines()[0] + "\n" + MANIFEST.splitlines()[1] + "\n")
    out = inputs / "lib-lost"
    killed = []

    def kill_the_worker():
        deadline = time.time() + 600
        while time.time() < deadline and resume.latest(out / "right") is None:
            time.sleep(0.1)
        pid = batch.read_state(out / "right")["pid"]
        os.kill(pid, signal.SIGKILL)  # the worker process dies mid-row, as on a lost node
        killed.append(pid)

    import threading

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    code, stdout, _ = _cli("batch", m, "--out", out, "--recipe", inputs / "recipe.yaml", "--quiet")
    killer.join()
    assert killed and code == 0, stdout
    state = batch.read_state(out / "right")
    assert state["status"] == "finished" and state["pid"] != killed[0]
    ref, got = _adapters(library["out"] / "right"), _adapters(out / "right")
    assert all(ref[k].equal(got[k]) for k in ref)


def test_a_row_on_a_clips_file_trains_one_t_lora_on_all_its_clips(inputs, tmp_path):
    """A row whose clip is a `cav train --clips` file: one run on both clips (each its own absorbers and spatial
    prompt), a config hash over every clip, and the file's spatial prompts not given twice."""
    recipe = batch.load_recipe(inputs / "recipe.yaml")
    (tmp_path / "b.mp4").write_bytes((inputs / "down.mp4").read_bytes())
    (tmp_path / "two.yaml").write_text(f"- clip: {inputs / 'right.mp4'}\n  spatial_prompt: a red square\n"
                                       "- clip: b.mp4\n  spatial_prompt: a red square, again\n")
    (tmp_path / "m.csv").write_text("clip,prompt,spatial_prompt\ntwo.yaml,a red square moving,\n")
    [row] = batch.load_rows(tmp_path / "m.csv", recipe)
    assert row.name == "two" and row.clips == [inputs / "right.mp4", tmp_path / "b.mp4"]
    assert row.cfg.spatial_prompt == ["a red square", "a red square, again"]
    key = batch.config_hash(row)
    (tmp_path / "b.mp4").write_bytes((inputs / "right.mp4").read_bytes())  # the second clip changes: another run
    assert batch.config_hash(row) != key
    row.key = batch.config_hash(row)
    record = batch.train_row(batch._spec(batch.Step(row, "train"), tmp_path / "lib", {"num_cpus": 1}))
    assert record["status"] == "finished", record
    data = json.loads((tmp_path / "lib" / "two" / "data.json").read_text())
    assert [c["clip"] for c in data["clips"]] == [str(c) for c in row.clips]
    assert (tmp_path / "lib" / "two" / "absorbers" / "clip-1" / "s_lora").is_dir()  # clip 2's own absorbers
    (tmp_path / "m.csv").write_text("clip,prompt,spatial_prompt\ntwo.yaml,a red square moving,a red square\n")
    with pytest.raises(CavError, match="spatial prompts are given twice"):
        batch.load_rows(tmp_path / "m.csv", recipe)


def test_a_tiny_wan_row_trains_through_cav_batch(cluster, inputs, tmp_path):
    """`cav batch` on a Wan base (a tiny one): a Wan recipe (4k+1 frames, a DiT placement), one row trained by a
    Ray task as `cav train` trains it, recorded in the library's index; a rerun trains nothing."""
    from cav.wan.tiny import make_tiny_wan

    base = make_tiny_wan(tmp_path / "wan")
    (tmp_path / "recipe.yaml").write_text(f"base: {base}\nsteps: 2\nabsorber_steps: 1\nframes: 5\nsize: [16, 16]\n"
                                          "checkpoint_every: 1\nsample_steps: 1\nabsorber_batch: 2\n"
                                          "placement: temporal-heads\n")
    (tmp_path / "m.csv").write_text(f"clip,prompt,spatial_prompt,name,seed\n{inputs / 'right.mp4'},a red square moving "
                                    "right,a red square,wan-right,\n")
    out = tmp_path / "lib"
    code, stdout, stderr = _cli("batch", tmp_path / "m.csv", "--out", out, "--recipe", tmp_path / "recipe.yaml",
                                "--address", cluster, "--quiet")
    assert code == 0, stdout + stderr
    run = out / "wan-right"
    assert _status(run) == "finished"
    meta = json.loads((run / "t_lora" / "cav.json").read_text())
    assert (meta["family"], meta["placement"]) == ("wan", "temporal-heads")
    assert meta["temporal_heads"] == json.loads((run / "temporal_heads.json").read_text())["heads"]
    index = json.loads((out / "index.json").read_text())
    assert "wan-right" in json.dumps(index)
    log = (run / "log.jsonl").read_bytes()
    assert _cli("batch", tmp_path / "m.csv", "--out", out, "--recipe", tmp_path / "recipe.yaml", "--address",
                cluster, "--quiet")[0] == 0
    assert (run / "log.jsonl").read_bytes() == log  # finished: not trained again
