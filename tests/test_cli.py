"""The CLI as a new user meets it: help for every flag, one-line errors for every bad value (from a recipe or a
flag) before any work, one rule for adapter weights, generate's outputs checked first, exact Ctrl-C hints, and the
frame selection recorded so a resumed run trains on the same frames."""

import os
import shlex
import sys

import pytest
import torch
from safetensors.torch import load_file

from cav.cli import build_parser, main

PROMPT = "a red square moving right on a navy background"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err.strip(), out


def _refused(code, err, *keywords):
    """Exit 2, exactly one line on stderr in cav's format, no traceback, and the words that name the problem."""
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert "Traceback" not in err
    for word in keywords:
        assert word in err, (word, err)


def _parse_error(capsys, *argv):
    """argparse exits with SystemExit; main() never sees it."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err.strip()


def _train(video, model, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(model), "--out", str(out), "--frames", "3",
            "--size", "32", "--steps", "2", "--absorber-steps", "1", "--sample-steps", "1", "--ti-tokens", "2",
            "--absorber-batch", "2", "--t-lora-lr", "1e-2", "--checkpoint-every", "1", "--quiet", *extra]


def _no_step_ran(out):
    log = out / "log.jsonl"
    assert not log.exists() or log.read_text() == "", "a training step ran"


# ------------------------------------------------------------------------------------------------------ help
def _commands(parser, prefix=()):
    """Every (command path, parser) reachable from ``parser``."""
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


def test_every_command_has_help_for_every_flag_with_its_default(capsys):
    commands = list(_commands(build_parser()))
    assert {c for c, _ in commands} >= {("train",), ("generate",), ("demo",), ("eval",), ("toy", "train-base"),
                                        ("toy", "check-base"), ("bench", "speed"), ("bench", "ablation")}
    for path, parser in commands:
        code, err = _parse_error(capsys, *path, "--help")  # `cav bench --help` crashed on a '%' once
        assert code == 0, (path, err)
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                assert action.help, f"cav {' '.join(path)} {action.option_strings[0]} has no help"
                takes_value = action.nargs != 0 and not action.option_strings[0].startswith("--no-")
                if takes_value and action.dest not in ("prompt",) and not action.required:
                    assert "default" in action.help, f"cav {' '.join(path)} {action.option_strings[0]}: no default"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for shown in ("[default: 300 steps]", "[default: 256x256 pixels]", "[default: 0.0005]", "--stride K",
                  "--start SECONDS", "--validation-prompt PROMPT"):
        assert shown in " ".join(text.split()), shown


def test_version(capsys):
    import cav

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cav {cav.__version__}"


@pytest.mark.parametrize("argv, names", [((), "train, generate"), (("bench",), "speed, ablation"),
                                         (("toy",), "train-base, check-base")])
def test_a_missing_command_is_named_for_the_user(capsys, argv, names):
    code, err, _ = _run(capsys, *argv)
    _refused(code, err, names)
    assert "_command" not in err and "required" not in err


@pytest.mark.parametrize("argv, keyword", [
    (("train", "--steps"), "--steps"),  # a flag without its value
    (("generate",), "--prompt"),  # a required flag
    (("train", "--no-such-flag"), "--no-such-flag"),
    (("bench", "speed", "--size", "huge"), "huge"),
    (("generate", "--prompt", "x", "--dtype", "fp8"), "fp8"),
    (("toy", "check-base", "--videos", "0"), "--videos"),
])
def test_parse_errors_are_one_line(capsys, argv, keyword):
    code, err = _parse_error(capsys, *argv)
    _refused(code, err, keyword)


# ------------------------------------------------------------------------------------ recipe values and flags
GOOD_NUMBERS = ["t_lora_lr: 1e-3", "t_lora_lr: 1E-3", "t_lora_lr: '5.0e-4'", "steps: '2'", "steps: 2.0",
                "size: 32", "size: '32x32'", "steps: 1_0"]


@pytest.mark.parametrize("line", GOOD_NUMBERS)
def test_recipe_numbers_as_users_write_them(tmp_path, capsys, line):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    code, err, out = _run(capsys, "train", "--dry-run", "--json", "--recipe", recipe, "--prompt", "x")
    assert code == 0, err
    from cav.config import TrainConfig, load_recipe

    cfg = TrainConfig.from_dict(load_recipe(recipe))
    assert isinstance(cfg.motion.lr, float) and isinstance(cfg.motion.steps, int) and cfg.data.size in ((32, 32), (256, 256))


BAD_VALUES = [  # (recipe line, the flag form, words the error must contain)
    ("steps: two", ["--steps", "two"], ["steps", "whole number"]),
    ("frames: 4.5", ["--frames", "4.5"], ["frames", "whole number"]),
    ("size: big", ["--size", "big"], ["size", "H or HxW"]),
    ("size: [32, 32, 3]", ["--size", "32x32x3"], ["size", "H or HxW"]),
    ("t_lora_lr: fast", ["--t-lora-lr", "fast"], ["t_lora_lr", "not a number"]),
    ("t_lora_lr: .nan", ["--t-lora-lr", "nan"], ["t_lora_lr", "finite"]),
    ("guidance: [1, 2]", ["--guidance", "1,2"], ["guidance"]),
    ("crop_ratio: [0.5]", ["--crop-ratio", "0.5", "x"], ["crop_ratio"]),
    ("t_lora_timesteps: [0, 500, 1000]", ["--t-lora-timesteps", "0", "5e2.5"], ["t_lora_timesteps"]),
    ("absorbers: sometimes", ["--absorbers", "sometimes"], ["absorbers", "none, s-lora, ti, both"]),
    ("cache_inputs: maybe", None, ["cache_inputs", "true or false"]),
    ("steps: true", None, ["steps", "whole number"]),
    ("stride: 1.5", ["--stride", "1.5"], ["stride", "whole number"]),
]


@pytest.mark.parametrize("line, flag, words", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_one_line_naming_the_key_before_any_work(tmp_path, tiny_video, tiny_model, capsys, line,
                                                                flag, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    out = tmp_path / "run"
    code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out), "--recipe", recipe)
    _refused(code, err, *words)
    assert not out.exists()
    if flag:
        code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out), *flag)
        _refused(code, err, *words)
        assert not out.exists()


def test_frame_selection_flags_are_recipe_keys(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stride: 2\nfps: 12.5\nstart: 0.5\nend: 2\n")
    from cav.config import TrainConfig, load_recipe

    cfg = TrainConfig.from_dict({**load_recipe(recipe), "prompt": "x"})
    assert cfg.data.frame_selection() == {"stride": 2, "fps": 12.5, "start": 0.5, "end": 2.0}
    assert TrainConfig.of(prompt="x").data.frame_selection() == {}


# ------------------------------------------------------------------------------- contradictions, frames, dtype
def test_overwrite_with_resume_is_refused_before_anything_is_touched(tmp_path, tiny_video, tiny_model, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("steps: 7\n")
    for order in (("--overwrite", "--resume"), ("--resume", "--overwrite")):
        code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out), *order)
        _refused(code, err, "--overwrite", "--resume")
        assert (out / "config.yaml").read_text() == "steps: 7\n" and sorted(p.name for p in out.iterdir()) == [
            "config.yaml"]


@pytest.mark.parametrize("frames", ["1", "0", "-3"])
def test_a_motion_adapter_needs_two_frames(tmp_path, tiny_video, tiny_model, capsys, frames):
    out = tmp_path / "run"
    code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out), "--frames", frames)
    _refused(code, err, "--frames", "≥ 2 frames")
    assert not out.exists()
    _no_step_ran(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_on_a_cpu_is_refused_before_the_run_is_replaced(tmp_path, tiny_video, tiny_model, capsys, device):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("kept\n")
    code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out), "--overwrite", "--dtype", "fp16",
                        "--device", device)
    _refused(code, err, "fp16 is not for CPUs: use --dtype fp32 or auto")
    assert (out / "config.yaml").read_text() == "kept\n"
    _no_step_ran(out)
    code, err, _ = _run(capsys, "generate", "--prompt", PROMPT, "--base", tiny_model, "--dtype", "fp16", "--device",
                        device, "--out", tmp_path / "v.mp4", "--quiet")
    _refused(code, err, "fp16 is not for CPUs")
    assert not (tmp_path / "v.mp4").exists()


# ------------------------------------------------------------------------------------------- adapter weights
BAD_WEIGHTS = ["nan", "-1", "1e9", "abc", "inf", "", "4.5", "-0.1"]


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_one_rule_for_adapter_weights(tmp_path, tiny_model, capsys, weight):
    run = tmp_path / "run"
    run.mkdir()  # exists: a bad weight must not read as "the adapter does not exist"
    for flag in ("--adapter", "--image-lora"):
        code, err, _ = _run(capsys, "generate", "--prompt", PROMPT, "--base", tiny_model, flag, f"{run}:{weight}",
                            "--out", tmp_path / "v.mp4", "--quiet")
        _refused(code, err, f"{flag} weight", "is invalid: pass a weight in [0, 4]")
        assert "does not exist" not in err and not (tmp_path / "v.mp4").exists()
    if weight:  # the same rule, without "off", for the weight a run records
        code, err, _ = _run(capsys, "train", "--dry-run", "--prompt", "x", "--lora-weight", weight)
        _refused(code, err, "lora_weight", "is invalid: pass a weight in (0, 4]")


# -------------------------------------------------------------------------------------- generate's outputs
@pytest.fixture()
def no_sampling(monkeypatch):
    """Refusals must come before the base is loaded (and so before any sampling)."""
    import cav.backbone

    def refuse(*a, **k):
        raise AssertionError("the base was loaded before the outputs were checked")

    monkeypatch.setattr(cav.backbone, "load", refuse)


@pytest.mark.parametrize("flags, words", [
    (["--num-videos", "0"], ["--num-videos", "≥ 1"]),
    (["--steps", "0"], ["--steps", "≥ 1"]),
    (["--frames", "0"], ["--frames", "≥ 1"]),
    (["--size", "4"], ["--size", "too small"]),
    (["--steps", "many"], ["--steps", "whole number"]),
    (["--guidance", "-1"], ["--guidance", "≥ 0"]),
    (["--lora-weight", "0"], ["lora_weight", "(0, 4]"]),
])
def test_generate_refuses_bad_settings(tmp_path, capsys, no_sampling, flags, words):
    code, err, _ = _run(capsys, "generate", "--prompt", PROMPT, "--out", tmp_path / "v.mp4", "--quiet", *flags)
    _refused(code, err, *words)
    assert list(tmp_path.iterdir()) == []


def _unwritable_targets(tmp_path):
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "a_file").write_text("x")
    yield tmp_path / "folder.mp4", "is a folder"  # --out names an existing directory
    yield tmp_path, "is a folder"
    yield tmp_path / "a_file" / "v.mp4", "is a file, not a folder"
    yield tmp_path / "a_file" / "deeper" / "v.gif", "is a file, not a folder"
    yield "/proc/cav-test/v.mp4", "cannot write"  # a read-only file system
    yield tmp_path / "v.avi", ".mp4 or .gif"
    if os.geteuid() != 0:  # root writes through permission bits; the /proc case covers it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        yield ro / "v.mp4", "cannot write"


def test_generate_refuses_unwritable_outputs_before_sampling(tmp_path, capsys, no_sampling):
    for target, words in _unwritable_targets(tmp_path):
        code, err, _ = _run(capsys, "generate", "--prompt", PROMPT, "--out", target, "--quiet")
        _refused(code, err, words)


def test_generate_gif_out_existing_files_and_overwrite(tmp_path, tiny_model, capsys, monkeypatch):
    def gen(out, *extra):
        return _run(capsys, "generate", "--prompt", PROMPT, "--base", tiny_model, "--frames", "2", "--size", "32",
                    "--steps", "1", "--out", out, "--quiet", *extra)

    code, err, printed = gen(tmp_path / "v.gif")
    assert code == 0, err
    assert (tmp_path / "v.gif").is_file() and (tmp_path / "v.mp4").is_file()
    assert "128x128 px" in printed  # says the size it wrote (32x32 scaled up for viewing)
    before = (tmp_path / "v.gif").read_bytes()
    import cav.backbone

    real = cav.backbone.load
    monkeypatch.setattr(cav.backbone, "load", lambda *a, **k: pytest.fail("loaded before the check"))
    for out in (tmp_path / "v.gif", tmp_path / "v.mp4"):  # the sidecar counts too
        code, err, _ = gen(out)
        _refused(code, err, "exists", "--overwrite")
    monkeypatch.setattr(cav.backbone, "load", real)
    code, err, _ = gen(tmp_path / "w.mp4", "--num-videos", "2")
    assert code == 0 and (tmp_path / "w-1.gif").is_file()
    code, err, _ = gen(tmp_path / "w.mp4", "--num-videos", "2", "--seed", "5")
    _refused(code, err, "w-0.mp4", "exists")
    code, err, _ = gen(tmp_path / "v.gif", "--overwrite", "--seed", "3")
    assert code == 0 and (tmp_path / "v.gif").read_bytes() != before


# ----------------------------------------------------------------------------------- Ctrl-C and frame selection
def _interrupt_at(monkeypatch, n):
    """Ctrl-C during the n-th training step (counting absorber steps), as a user at a terminal would."""
    import cav.trainer as trainer

    real, calls = trainer.train_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_step", step)


def test_ctrl_c_hint_promises_a_checkpoint_only_when_there_is_one(tmp_path, tiny_video, tiny_model, capsys,
                                                                  monkeypatch):
    out = tmp_path / "my runs" / "it's here"
    _interrupt_at(monkeypatch, 1)  # before any step finished: nothing to resume
    code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out))
    assert code == 130 and "--resume" not in err and "no checkpoint" in err and "--overwrite" in err, err
    _interrupt_at(monkeypatch, 3)  # the absorber step and one T-LoRA step are checkpointed
    code, err, _ = _run(capsys, *_train(tiny_video, tiny_model, out, "--overwrite"))
    assert code == 130 and "checkpointed" in err, err
    command = err.split("`")[1]
    assert shlex.split(command) == ["cav", "train", str(tiny_video), "--resume", "--out", str(out)]


@pytest.mark.slow
def test_resume_uses_the_recorded_frame_selection(tmp_path, tiny_video, tiny_model, capsys, monkeypatch):
    whole = tmp_path / "whole"
    assert main(_train(tiny_video, tiny_model, whole, "--stride", "2")) == 0
    assert "stride: 2" in (whole / "config.yaml").read_text()
    cut = tmp_path / "cut"
    _interrupt_at(monkeypatch, 3)
    assert main(_train(tiny_video, tiny_model, cut, "--stride", "2")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    code, err, _ = _run(capsys, "train", tiny_video, "--resume", "--out", cut, "--quiet")  # no --stride
    assert code == 0, err
    ref, got = (load_file(str(d / "t_lora" / "adapter_model.safetensors")) for d in (whole, cut))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    uniform = tmp_path / "uniform"  # the other frames give another adapter, so the check above can fail
    assert main(_train(tiny_video, tiny_model, uniform)) == 0
    other = load_file(str(uniform / "t_lora" / "adapter_model.safetensors"))
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_api_generate_takes_a_sample_config_or_its_fields(tmp_path, tiny_model):
    """`api.generate(..., steps=1)` (the UI's call) and `api.generate(..., sample=SampleConfig(steps=1))` agree."""
    from cav import api
    from cav.config import SampleConfig
    from cav.data.video import read_video

    a = api.generate(PROMPT, base=str(tiny_model), frames=2, size=32, steps=1, seed=3, negative_prompt=None,
                     out=tmp_path / "a.mp4", quiet=True)
    b = api.generate(PROMPT, base=str(tiny_model), sample=SampleConfig(frames=2, size=(32, 32), steps=1, seed=3),
                     out=tmp_path / "b.mp4", quiet=True)
    c = api.generate(PROMPT, base=str(tiny_model), frames=2, size=32, steps=1, seed=4, out=tmp_path / "c.mp4",
                     quiet=True)
    va, vb, vc = (read_video(p[0], frames=None, size=(128, 128)) for p in (a, b, c))
    assert (va == vb).all() and not (va == vc).all()


def test_help_and_argument_errors_come_before_the_heavy_imports():
    """`cav --help` and a typo's message do not wait for torch and diffusers to import (seconds on a busy machine)."""
    import subprocess

    code = ("import sys; from cav.cli import main\n"
            "for argv in (['train', '--steps', 'two'], ['generate', '--prompt', 'x', '--adapter', 'r:nan']):\n"
            "    assert main(argv) == 2\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
