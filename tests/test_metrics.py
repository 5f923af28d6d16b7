import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cav.data import toyworld as tw
from cav.data.video import write_video
from cav.errors import CavError
from cav.evaluate import METRICS, evaluate, parse_toy_prompt
from cav.metrics import Undefined
from cav.metrics import lpips as lp
from cav.metrics.clip_score import ClipScorer
from cav.metrics.motion import motion_fidelity, tracks


def _textured(frames=12, size=64, seed=0):
    """A noise-textured square moving right across a flat background."""
    tex = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    v = np.full((frames, size, size, 3), 40, np.uint8)
    for i in range(frames):
        v[i, 20:36, 4 + 3 * i : 20 + 3 * i] = tex
    return v


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """Random LPIPS weights in the published key layout, converted with convert_lpips_weights."""
    torch.manual_seed(0)
    ours = {k: torch.rand(shape) - 0.5 * ("features" in k) for k, shape in lp.weight_shapes().items()}
    alex = {k: v * 0.1 for k, v in ours.items() if k.startswith("features.")} | {"classifier.1.weight": torch.zeros(1)}
    lins = {f"lin{k}.model.1.weight": ours[f"lin{k}.weight"] for k in range(5)}
    return lp.convert_lpips_weights(alex, lins, tmp_path_factory.mktemp("lpips") / "alex.safetensors")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from cav.toy.factory import BASE_WORDS, write_clip_tokenizer

    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_clip_tokenizer(d, BASE_WORDS, 24)
    tok = CLIPTokenizer.from_pretrained(d)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_lpips_known_answers(lpips_file):
    m = lp.LPIPS(lpips_file)
    a, b = _textured(seed=0), _textured(seed=1)
    assert m.distance(a, a) == 0.0
    with pytest.raises(Undefined, match="same image"):  # a still: 0 would read as perfect consistency
        m.temporal_consistency(np.repeat(a[:1], 5, axis=0))
    assert m.temporal_consistency(a) > 0
    d = m.distance(a, b)
    assert d > 0 and m.distance(b, a) == pytest.approx(d, rel=1e-5)
    assert m.diversity([a, b]) == pytest.approx(d, rel=1e-5)
    assert m.distance(a[:, :32, :32], a[:, :32, :32]) == 0.0  # small frames are upsampled, still run
    with pytest.raises(CavError, match="LPIPS weights not found"):
        lp.LPIPS(lpips_file.parent / "missing.safetensors")
    with pytest.raises(CavError, match="lack key"):
        lp.convert_lpips_weights({}, {}, lpips_file.parent / "bad.safetensors")
    bad = lpips_file.parent / "bad.safetensors"
    save_file({k: torch.zeros(2) for k in lp.weight_shapes()}, str(bad))
    with pytest.raises(CavError, match=r"features.0.weight has shape \(2,\)"):
        lp.LPIPS(bad)


def test_motion_fidelity_known_answers():
    a = _textured()
    t = tracks(a)
    assert t.ndim == 3 and t.shape[1:] == (12, 2) and len(t) > 10
    np.testing.assert_allclose(t[:, -1] - t[:, 0], [[33.0, 0.0]] * len(t), atol=0.5)  # moved 11 * 3 px right
    assert motion_fidelity(a, a) == pytest.approx(1.0, abs=1e-6)
    assert motion_fidelity(a[::-1].copy(), a) < 0.5
    assert motion_fidelity(a, a[::2]) > 0.99  # frame counts differ: resampled
    static = np.repeat(a[:1], 12, axis=0)
    assert motion_fidelity(static, static) == 1.0 and motion_fidelity(static, a) == 0.0


def test_clip_score(clip_dir):
    scorer = ClipScorer(str(clip_dir))
    video = _textured(frames=3)
    s = scorer.score(video, "a red circle moving left")
    assert isinstance(s, float) and -100 <= s <= 100
    assert ClipScorer(str(clip_dir)).score(video, "a red circle moving left") == pytest.approx(s, abs=1e-4)
    assert scorer.score(video, "a dog") != pytest.approx(s, abs=1e-6)
    with pytest.raises(CavError, match="--clip PATH"):
        ClipScorer(str(clip_dir.parent / "missing"))


def test_parse_toy_prompt():
    for motion in tw.MOTIONS:
        spec = tw.ToySpec("diamond", "cyan", "navy", motion)
        assert parse_toy_prompt(tw.caption(spec)[0]) == spec
    assert parse_toy_prompt("A Red  circle moving left on a black background.") == tw.ToySpec(
        "circle", "red", "black", "left"
    )
    assert parse_toy_prompt("a man skiing") is None


def _toy_file(path, shape, colour, motion="right"):
    video, _ = tw.render(tw.ToySpec(shape, colour, "black", motion), frames=8, size=32)
    return write_video(path, video, fps=8)


def test_evaluate_toy_world(tmp_path, clip_dir, lpips_file):
    ref = _toy_file(tmp_path / "ref.mp4", "circle", "red")
    prompt = "a red circle moving right on a black background"
    r = evaluate([ref], prompt, reference=ref, clip=str(clip_dir), lpips=lpips_file)
    json.dumps(r)
    assert set(r) == set(METRICS) - {"diversity"} | {"videos"}
    assert r["motion_error"] < 0.01 and r["motion_fidelity"] > 0.99
    assert r["prompt_accuracy"] == 1.0 and r["appearance_leakage"] == 0.0
    assert r["videos"][0]["path"] == str(ref) and -100 <= r["videos"][0]["text_alignment"] <= 100

    # prompt asks for a blue square: a red square leaks the reference's colour, a blue square does not
    leaky = _toy_file(tmp_path / "leaky.mp4", "square", "red")
    clean = _toy_file(tmp_path / "clean.mp4", "square", "blue")
    prompt = "a blue square moving right on a black background"
    r = evaluate([leaky, clean], prompt, reference=ref, clip=None, lpips=lpips_file)
    assert [v["appearance_leakage"] for v in r["videos"]] == [1.0, 0.0]
    assert [v["prompt_accuracy"] for v in r["videos"]] == [0.0, 1.0]
    assert r["appearance_leakage"] == 0.5 and r["diversity"] > 0 and "diversity" not in r["videos"][0]
    assert "text_alignment" not in r


def test_missing_weights_warn_or_fail(tmp_path, monkeypatch, capsys, lpips_file):
    video = write_video(tmp_path / "v.mp4", _textured(frames=4), fps=8)
    monkeypatch.setenv("CAV_LPIPS", str(tmp_path / "none.safetensors"))
    with pytest.raises(CavError, match="nothing could be measured: text_alignment needs CLIP weights"):
        evaluate([video], "a man skiing", clip=str(tmp_path / "no-clip"))
    assert capsys.readouterr().err == ""  # the error says it all: no warnings before it
    r = evaluate([video], "a man skiing", clip=str(tmp_path / "no-clip"), reference=video)
    assert set(r) == {"motion_fidelity", "videos"}
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("cav: warning: skipping text_alignment: CLIP weights not found")
    assert err[1].startswith("cav: warning: skipping temporal_consistency: LPIPS weights not found")
    assert "docs/METRICS.md#clip" in err[0] and "docs/METRICS.md#lpips" in err[1]
    with pytest.raises(CavError, match="cannot compute temporal_consistency: LPIPS weights not found"):
        evaluate([video], "a man skiing", metrics=["temporal_consistency"])
    with pytest.raises(CavError, match="cannot compute text_alignment: CLIP weights not found"):
        evaluate([video], "a man skiing", clip=str(tmp_path / "no-clip"), metrics=["text_alignment"])
    with pytest.raises(CavError, match="diversity: it needs at least 2 videos"):
        evaluate([video], "a man skiing", lpips=lpips_file, metrics=["diversity"])
    with pytest.raises(CavError, match="motion_fidelity: no reference video"):
        evaluate([video], "a man skiing", metrics=["motion_fidelity"])
    with pytest.raises(CavError, match="prompt_accuracy: the prompt is not a toy-world caption"):
        evaluate([video], "a man skiing", metrics=["prompt_accuracy"])
    with pytest.raises(CavError, match="unknown metric 'fvd'"):
        evaluate([video], "a man skiing", metrics=["fvd"])
    r = evaluate([video], "a man skiing", metrics=["temporal_consistency"], lpips=lpips_file)
    assert r["temporal_consistency"] > 0 and set(r) == {"temporal_consistency", "videos"}


# ------------------------------------------------------------------------ degenerate inputs: null, never a score
def _noise(frames=12, size=64, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("generated,reference,reason", [
    (_noise(), _textured(), "generated video could be tracked"),  # noise: corners found, none tracked
    (_textured(), _noise(), "reference could be tracked"),
    (np.full((12, 64, 64, 3), 90, np.uint8), _textured(), "generated video could be tracked"),  # flat: no corner
    (_textured(frames=1), _textured(), "generated video has 1 frame"),
    (_textured(), _textured(frames=1), "reference has 1 frame"),
])
def test_motion_fidelity_is_undefined_without_motion_to_compare(generated, reference, reason):
    with pytest.raises(Undefined, match=reason):
        motion_fidelity(generated, reference)


def test_one_frame_and_empty_videos(lpips_file):
    m = lp.LPIPS(lpips_file)
    with pytest.raises(Undefined, match="1 frame"):
        m.temporal_consistency(_textured(frames=1))
    for fn in (lambda v: motion_fidelity(v, _textured()), m.temporal_consistency):
        with pytest.raises(CavError):  # zero frames: refused as bad input, never scored
            fn(np.zeros((0, 64, 64, 3), np.uint8))


def _toy_blank(path, frames=8):
    return write_video(path, np.zeros((frames, 32, 32, 3), np.uint8), fps=8)  # a black background, no object


def test_evaluate_reports_null_with_the_reason(tmp_path, lpips_file, capsys):
    from cav.cli import main

    real = write_video(tmp_path / "real.mp4", _textured(), fps=8)
    noise = write_video(tmp_path / "noise.mp4", _noise(), fps=8)
    still = write_video(tmp_path / "still.mp4", np.repeat(_textured()[:1], 6, axis=0), fps=8)
    r = evaluate([noise], "a man skiing", reference=real, metrics=["motion_fidelity"])
    assert r["motion_fidelity"] is None and "could be tracked" in r["notes"]["motion_fidelity"]
    assert r["videos"][0]["motion_fidelity"] is None and "could be tracked" in r["videos"][0]["notes"]["motion_fidelity"]
    json.dumps(r)
    # three videos, one undefined: the mean of the others (a still has tracked points: a real 0), and a note
    r = evaluate([real, noise, still], "a man skiing", reference=real, lpips=lpips_file,
                 metrics=["motion_fidelity", "temporal_consistency"])
    assert [v["motion_fidelity"] for v in r["videos"]] == [pytest.approx(1.0), None, 0.0]
    assert r["motion_fidelity"] == pytest.approx(0.5)
    assert r["notes"]["motion_fidelity"].startswith("undefined for 1 of 3 videos")
    assert [v["temporal_consistency"] is None for v in r["videos"]] == [False, False, True]
    assert "same image" in r["notes"]["temporal_consistency"]
    # the CLI: JSON null, text "n/a (reason)", exit 0 (the metric was computed and has no value)
    argv = ["eval", str(noise), "--prompt", "a man skiing", "--reference", str(real), "--metrics", "motion_fidelity"]
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["motion_fidelity"] is None
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("motion_fidelity") and "n/a (no point of the generated video could be tracked" in line


def test_toy_metrics_without_an_object_are_null(tmp_path):
    ref = _toy_file(tmp_path / "ref.mp4", "circle", "red")
    blank = _toy_blank(tmp_path / "blank.mp4")
    prompt = "a blue square moving right on a black background"
    r = evaluate([blank], prompt, reference=ref, clip=None, metrics=["motion_error", "appearance_leakage",
                                                                      "prompt_accuracy"])
    assert r["motion_error"] is None and r["appearance_leakage"] is None  # not a perfect 0
    assert "no object" in r["notes"]["motion_error"] and "no object" in r["notes"]["appearance_leakage"]
    assert r["prompt_accuracy"] == 0.0  # measured: the video does not show what the prompt asks for
    one = write_video(tmp_path / "one.mp4", tw.render(tw.ToySpec("square", "blue", "black", "right"), 1, 32)[0])
    r = evaluate([one], prompt, reference=ref, clip=None, metrics=["motion_error"])
    assert r["motion_error"] is None and "1 frame" in r["notes"]["motion_error"]


@pytest.mark.parametrize("extra,needs", [
    ([], ["text_alignment needs CLIP weights", "temporal_consistency needs LPIPS weights", "--reference VIDEO"]),
    (["--metrics", "text_alignment,temporal_consistency"], ["text_alignment"]),  # named: the first one's reason
    (["--lpips", "/nonexistent/x.safetensors", "--clip", "/nonexistent/clip"], ["LPIPS weights", "CLIP weights"]),
])
def test_eval_with_nothing_measurable_exits_2(extra, needs, tmp_path, monkeypatch, capsys):
    from cav.cli import main

    monkeypatch.setenv("CAV_LPIPS", str(tmp_path / "none.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    video = write_video(tmp_path / "v.mp4", _textured(frames=4), fps=8)
    code = main(["eval", str(video), "--prompt", "a man skiing", "--clip", str(tmp_path / "no-clip"), *extra])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cav: error:") and "Traceback" not in err
    assert captured.out == ""
    for n in needs:
        assert n in err, (n, err)
    assert "docs/METRICS.md" in err


def test_lpips_weights_from_the_published_files(tmp_path, lpips_file, capsys):
    """`python -m cav.metrics.lpips ALEXNET.pth ALEX.pth OUT`: the documented step builds a file LPIPS loads."""
    from safetensors.torch import load_file

    ours = load_file(str(lpips_file))
    torch.save({k: v for k, v in ours.items() if k.startswith("features.")}, tmp_path / "alexnet.pth")
    torch.save({f"lin{k}.model.1.weight": ours[f"lin{k}.weight"] for k in range(5)}, tmp_path / "alex.pth")
    out = tmp_path / "built.safetensors"
    assert lp.main([str(tmp_path / "alexnet.pth"), str(tmp_path / "alex.pth"), str(out)]) == 0
    assert lp.LPIPS(out).distance(_textured(), _textured(seed=3)) == pytest.approx(
        lp.LPIPS(lpips_file).distance(_textured(), _textured(seed=3)))
    assert lp.main([str(tmp_path / "missing.pth"), str(tmp_path / "alex.pth"), str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_clip_score_warns_once_when_the_prompt_is_cut(clip_dir, caplog):
    import logging

    scorer = ClipScorer(str(clip_dir))
    long = "a red circle moving left on a black background " * 4  # over the tiny CLIP's 24 positions
    with caplog.at_level(logging.WARNING, logger="cav"):
        scorer.score(_textured(frames=2), long)
        scorer.score(_textured(frames=2, seed=1), long)
        scorer.score(_textured(frames=2), "a red circle")
    assert len(caplog.records) == 1 and "the CLIP prompt" in caplog.records[0].getMessage()
