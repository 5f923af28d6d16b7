"""Checks before any work: the base's shape limits, prompts against the tokenizer's length, hub ids offline.

Each refusal: exit code 2, exactly one line on stderr, no traceback, and no training step (the run folder is never
created, so no log line, checkpoint or config was written).
"""

import logging
import socket
import time

import pytest

from cav import backbone
from cav.families import ANIMATEDIFF
from cav.cli import main
from cav.errors import CavError
from cav.prompts import check_prompt

PROMPT = "a red square moving right"
MS_HUB_ID = "damo-vilab/text-to-video-ms-1.7b"
LONG = "a red square moving right on a dark blue background " * 4  # ~40 tokens: over the tiny tokenizer's 24


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _refused(code, err, *words):
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def _train(video, base, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(base), "--out", str(out), "--frames", "4",
            "--steps", "1", "--absorber-steps", "1", "--sample-steps", "1", "--quiet", *extra]


# --------------------------------------------------------------------------------------------------- shapes
# toy: VAE 4x, 3 down blocks (4x) -> multiples of 16; tiny test model: VAE 2x, 2 down blocks (2x), pipeline 8 -> 8
@pytest.mark.parametrize("size,nearby", [("36", "use 32 or 48"), ("40", "use 32 or 48"), ("8", "use 16"),
                                         ("24x32", "use 16x32 or 32x32"), ("32x100", "use 32x96 or 32x112")])
def test_toy_sizes_refused_before_any_step(size, nearby, tmp_path, tiny_video, capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, *_train(tiny_video, "toy", out, "--size", size))
    _refused(code, err, "multiples of 16", "VAE shrinks frames 4x", nearby)
    assert not out.exists()


@pytest.mark.parametrize("size,nearby", [("12", "use 8 or 16"), ("20", "use 16 or 24"), ("36x30", "use 32x24 or 40x32")])
def test_tiny_base_sizes_refused_before_any_step(size, nearby, tmp_path, tiny_video, tiny_model, capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, *_train(tiny_video, tiny_model, out, "--size", size))
    _refused(code, err, "multiples of 8", "sampling needs multiples of 8", nearby)
    assert not out.exists()


def test_valid_sizes_pass_and_units_come_from_the_configs(tiny_model):
    for size in ((32, 32), (48, 48), (32, 64), (256, 256)):
        backbone.check_shape("toy", size, 8)
    for size in ((8, 8), (16, 24), (32, 32)):
        backbone.check_shape(tiny_model, size, 4)
    unit, _ = backbone.shape_unit(backbone.read_config(MS_HUB_ID, "unet"), backbone.read_config(MS_HUB_ID, "vae"))
    assert unit == 64  # ModelScope: VAE 8x, 4 down blocks (8x); 256 and Zeroscope's 576x320 are multiples
    backbone.check_shape(MS_HUB_ID, (320, 576), 24)
    with pytest.raises(CavError, match="use 256 or 320"):
        backbone.check_shape(MS_HUB_ID, (300, 300), 16)
    with pytest.raises(CavError, match="--frames 33 is more than"):  # a UNet config that bounds the frame count
        backbone.check_shape("toy", (32, 32), 33, unet_config={**backbone.read_config("toy", "unet"),
                                                               ANIMATEDIFF.frame_limit_key: 32})


def test_dry_run_and_generate_refuse_a_bad_size(tmp_path, tiny_model, capsys):
    _refused(*_run(capsys, "train", "--dry-run", "--prompt", PROMPT, "--size", "36"), "use 32 or 48")
    target = tmp_path / "v.mp4"
    code, err = _run(capsys, "generate", "--prompt", PROMPT, "--base", str(tiny_model), "--size", "12", "--frames",
                     "2", "--steps", "1", "--out", str(target), "--quiet")
    _refused(code, err, "use 8 or 16")
    assert not target.exists() and not target.with_suffix(".gif").exists()


# -------------------------------------------------------------------------------------------------- prompts
def _tokenizer(base):
    from cav.preflight import local_tokenizer

    return local_tokenizer(str(base))


@pytest.mark.parametrize("prompt", [LONG, "word " * 60, PROMPT + " with a shadow, a trail of sparks and a smile " * 3])
def test_any_cut_warns_once_with_the_ignored_words(prompt, tiny_model, caplog):
    tok = _tokenizer(tiny_model)
    with caplog.at_level(logging.WARNING, logger="cav"):
        assert check_prompt(tok, prompt, "--prompt") is True
    [record] = caplog.records
    assert "--prompt is" in record.getMessage() and "text encoder reads 24" in record.getMessage()
    assert "is ignored" in record.getMessage() and "\n" not in record.getMessage()


def test_prompts_that_fit_say_nothing(tiny_model, caplog):
    tok = _tokenizer(tiny_model)
    fits = " ".join(["red"] * 22)  # 22 words + start + end = 24 tokens: exactly the limit
    with caplog.at_level(logging.WARNING, logger="cav"):
        assert not check_prompt(tok, fits) and not check_prompt(tok, PROMPT) and not check_prompt(tok, "")
    assert not caplog.records


WORDS20 = " ".join(["red"] * 20)


@pytest.mark.parametrize("prompt,flag,n_tokens,lost", [
    (LONG + " <cav>", "--prompt", 2, "<cav> <cav>_1"),  # the placeholder at the end of a long prompt
    (WORDS20 + " <cav> square " + WORDS20, "--prompt", 4, "<cav>_2 <cav>_3"),  # straddling the cut: half lost
    (PROMPT, "--spatial-prompt", 2, "<cav> <cav>_1"),  # a long spatial prompt ending with it
])
def test_a_cut_that_drops_the_placeholder_is_refused_before_work(prompt, flag, n_tokens, lost, tmp_path, tiny_video,
                                                                  tiny_model, capsys):
    out = tmp_path / "run"
    argv = _train(tiny_video, tiny_model, out, "--size", "16", "--ti-tokens", str(n_tokens))
    argv[argv.index(PROMPT)] = prompt
    if flag == "--spatial-prompt":
        argv += ["--spatial-prompt", LONG + " <cav>"]
    code, err = _run(capsys, *argv)
    _refused(code, err, flag, f"textual-inversion token(s) {lost},", "shorten it")
    assert not out.exists()


def test_a_placeholder_that_survives_the_cut_once_is_enough(tiny_model, caplog):
    tok = _tokenizer(tiny_model)
    tok.add_tokens(["<cav>"])
    with caplog.at_level(logging.WARNING, logger="cav"):
        assert check_prompt(tok, "<cav> " + LONG + " <cav>", "--prompt")  # cut, warned, not refused
    assert len(caplog.records) == 1


def test_long_prompt_without_placeholder_trains_with_a_warning(tiny_model, caplog, capsys):
    # textual inversion prefixes its tokens when the prompt lacks the placeholder: they survive the cut
    with caplog.at_level(logging.WARNING, logger="cav"):
        code = main(["train", "--dry-run", "--prompt", LONG, "--base", str(tiny_model), "--size", "16"])
    assert code == 0
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == ["cav: warning: --prompt"]


def test_generate_warns_once_per_prompt(tmp_path, tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="cav"):
        code = main(["generate", "--prompt", LONG, "--base", str(tiny_model), "--size", "16", "--frames", "2",
                     "--steps", "1", "--num-videos", "2", "--out", str(tmp_path / "v.mp4"), "--quiet"])
    assert code == 0 and (tmp_path / "v-1.mp4").is_file()
    assert len(caplog.records) == 1 and "is ignored" in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------------------------- hub offline
@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails at once, as on a machine without internet; returns the list of the
    sleeps asked for meanwhile (network retries wait between attempts: ~30 s before this was fixed)."""
    def refuse(*_a, **_k):
        raise OSError("network disabled in this test")

    sleeps = []
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return sleeps


def test_readme_dry_run_with_the_hub_id_works_offline(no_network, capsys):
    import json

    t0 = time.process_time()
    code = main(["train", "--dry-run", "--json", "--prompt", "a man skiing down a slope", "--base", MS_HUB_ID])
    seconds = time.process_time() - t0
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["base"] == MS_HUB_ID
    assert {s["name"]: s["trainable_params"] for s in out["stages"]}["t_lora"] == 831_488
    assert no_network == [] and seconds < 15  # no retry waits; ~1.5 s of CPU (meta-device UNet) once imported


@pytest.mark.parametrize("argv", [
    ["train", "--dry-run", "--prompt", PROMPT, "--base", "nobody/no-such-model"],
    ["generate", "--prompt", PROMPT, "--base", "nobody/no-such-model", "--out", "x.mp4"],
])
def test_an_unknown_hub_id_fails_fast(argv, no_network, capsys):
    t0 = time.process_time()
    code, err = _run(capsys, *argv)
    _refused(code, err, "nobody/no-such-model", "hub cannot be reached", "hf download", "--base DIR")
    assert no_network == [] and time.process_time() - t0 < 5  # one failed request, no retries


def test_animatediff_frame_limit_comes_from_the_motion_adapter(tmp_path):
    import json
    import shutil

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(backbone.ASSETS / "animatediff_motion_adapter_v1_5_2_config.json", adapter / "config.json")
    limit = json.loads((adapter / "config.json").read_text())[ANIMATEDIFF.frame_limit_key]
    configs = dict(unet_config=json.loads((backbone.ASSETS / "sd15_unet_config.json").read_text()),
                   vae_config=json.loads((backbone.ASSETS / "modelscope_vae_config.json").read_text()))
    backbone.check_shape("sd", (512, 512), limit, motion_adapter=str(adapter), **configs)
    with pytest.raises(CavError, match=rf"positions for {limit} frames\): use --frames {limit} or fewer"):
        backbone.check_shape("sd", (512, 512), limit + 1, motion_adapter=str(adapter), **configs)
    with pytest.raises(CavError, match="multiples of 64.*use 512 or 576"):  # SD 1.5: VAE 8x, 4 down blocks 8x
        backbone.check_shape("sd", (520, 520), 16, motion_adapter=str(adapter), **configs)
