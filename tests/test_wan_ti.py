"""Textual inversion's analogue on Wan (``--absorbers ti|both``, ``--ti-from``, ``generate --textual-inversion``):
prompt vectors in umT5's output, trained in stage 1, frozen in stage 2, published under ``absorbers/``, reloadable,
resumed exactly, and refused in one line where the file is of the other kind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cav.adapters import lora
from cav.cli import main
from cav.config import TrainConfig
from cav.data.video import read_video
from cav.families import UNET3D, WAN
from cav.wan.prompt_vectors import KIND, PromptVectors

PROMPT = "a red square moving right"
TRAIN = ["--frames", "5", "--size", "16", "--steps", "2", "--absorber-steps", "2", "--sample-steps", "2",
         "--ti-tokens", "2", "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet"]
VECTORS = "absorbers/prompt_vectors.safetensors"


def _train(video, base, out, *extra) -> None:
    assert main(["train", str(video), "--prompt", PROMPT, "--base", str(base), "--out", str(out), *TRAIN,
                 *map(str, extra)]) == 0


def _stages(run) -> list[str]:
    return [json.loads(x)["stage"] for x in (run / "log.jsonl").read_text().splitlines()]


def _same(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line(code, err, *words):
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return WAN.tiny.make(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def both_run(wan, tiny_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("both") / "run"
    _train(tiny_video, wan, out, "--absorbers", "both")
    return out


def test_both_trains_the_vectors_in_stage_one(both_run, wan):
    """The vectors start where the condition's absorber draws them (seed + clip) and stage 1 moves them; the file is
    tagged with its kind; the S-LoRA trains beside them; stage 2 follows."""
    assert _stages(both_run) == ["absorbers", "absorbers", "t_lora", "t_lora"]
    with safe_open(str(both_run / VECTORS), "pt") as fh:
        assert fh.metadata()["kind"] == KIND
    trained = PromptVectors.load(both_run / VECTORS).vectors
    width = json.loads((wan / "text_encoder" / "config.json").read_text())["d_model"]
    start = PromptVectors(2, width, generator=torch.Generator().manual_seed(TrainConfig().seed)).vectors
    assert trained.shape == start.shape and not torch.equal(trained, start)
    assert (both_run / "absorbers" / "s_lora" / lora.WEIGHTS).is_file()
    assert _same(both_run / VECTORS, both_run / "checkpoints" / "absorbers-step-000002" / "prompt_vectors.safetensors")


def test_t_lora_trains_with_the_vectors_frozen(both_run, wan):
    """Stage 2 as a run builds it: the vectors are not among its parameters, need no gradient, and a step of it
    leaves them as they were, while they do change the condition it trains under."""
    from cav import backbone
    from cav.stages import ClipInputs, make_textual_inversion, t_lora_stage
    from cav.trainer import run_stage

    cfg = TrainConfig.of(prompt=PROMPT, base=str(wan), absorbers="ti", ti_from=str(both_run / VECTORS), steps=1,
                      frames=5, size=[16, 16], checkpoint_every=0)
    bb = backbone.load(str(wan), "cpu")
    ti = make_textual_inversion(bb, cfg)
    before = ti.module.vectors.detach().clone()
    frames = torch.rand(5, 3, 16, 16) * 2 - 1
    stage = t_lora_stage(bb, cfg, frames, ti, clips=[ClipInputs(frames, ti, None)])
    assert all(p is not ti.module.vectors for g in stage.param_groups for p in g["params"])
    assert not ti.module.vectors.requires_grad
    run_stage(bb.unet, bb.scheduler, stage, torch.Generator().manual_seed(0), lambda record: None, quiet=True)
    assert torch.equal(ti.module.vectors, before)
    assert not torch.equal(ti.encode(bb, PROMPT), bb.encode_prompt(PROMPT))


def test_ti_from_skips_stage_one_and_trains_under_the_given_vectors(both_run, wan, tiny_video, tmp_path):
    """``--ti-from`` the published file: no stage 1, the file republished bit for bit, the same T-LoRA from the
    same seed each time, and another file (the vectors scaled) trains another T-LoRA: stage 2 reads them."""
    given = both_run / VECTORS
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        _train(tiny_video, wan, out, "--absorbers", "ti", "--ti-from", given)
    assert _stages(runs[0]) == ["t_lora", "t_lora"]
    assert _same(runs[0] / VECTORS, given)
    assert _same(runs[0] / "t_lora" / lora.WEIGHTS, runs[1] / "t_lora" / lora.WEIGHTS)
    other = tmp_path / "other.safetensors"
    save_file({"vectors": load_file(str(given))["vectors"] * 50}, str(other), metadata={"kind": KIND})
    _train(tiny_video, wan, tmp_path / "c", "--absorbers", "ti", "--ti-from", other)
    assert not _same(runs[0] / "t_lora" / lora.WEIGHTS, tmp_path / "c" / "t_lora" / lora.WEIGHTS)


def test_generate_with_the_vectors_differs(both_run, tmp_path):
    """`cav generate --textual-inversion FILE`: another video than without it, the same one twice. The run's own
    vectors moved little in 2 steps and a random tiny Wan barely reads them (the videos round to the same uint8), so
    the file here holds them scaled ×30, the size of the tiny umT5's own outputs."""
    big = PromptVectors.load(both_run / VECTORS)
    with torch.no_grad():
        big.vectors.mul_(30)
    file = big.save(tmp_path / "big.safetensors")
    videos = []
    for name, extra in (("plain", []), ("ti", ["--textual-inversion", file]), ("ti2", ["--textual-inversion", file])):
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", "--prompt", PROMPT, "--adapter", str(both_run), "--out", str(out), "--quiet",
                     *map(str, extra)]) == 0
        videos.append(read_video(out, frames=None, size=(16, 16)))
    assert not np.array_equal(videos[0], videos[1]) and np.array_equal(videos[1], videos[2])


def test_resume_in_stage_one_equals_the_straight_run(both_run, tiny_video, tmp_path):
    """Interrupted after the first absorber step: the resumed run restores the vectors and their optimizer state
    and ends with the straight run's vectors, S-LoRA and T-LoRA, bit for bit."""
    copy = tmp_path / "resumed"
    shutil.copytree(both_run, copy)
    for rel in ("checkpoints/absorbers-step-000002", "checkpoints/step-000001", "checkpoints/step-000002",
                "absorbers", "t_lora", "samples"):
        shutil.rmtree(copy / rel)
    with safe_open(str(copy / "checkpoints" / "absorbers-step-000001" / "state.safetensors"), "pt") as fh:
        assert len(list(fh.keys())) > 0
    assert main(["train", str(tiny_video), "--resume", "--out", str(copy), "--quiet"]) == 0
    for rel in (VECTORS, f"absorbers/s_lora/{lora.WEIGHTS}", f"t_lora/{lora.WEIGHTS}"):
        assert _same(both_run / rel, copy / rel), rel


def test_a_file_of_the_other_kind_is_refused_in_one_line(both_run, wan, tiny_video, tmp_path, run_cli):
    """A CLIP textual-inversion file on Wan (train and generate) and Wan's prompt vectors on a CLIP base: one line
    each, exit 2, no run folder."""
    clip_file = tmp_path / "clip.safetensors"
    save_file({"<cav>": torch.randn(2, 32)}, str(clip_file))
    out = tmp_path / "run"
    code, err = run_cli(["train", tiny_video, "--prompt", PROMPT, "--base", wan, "--out", out, "--absorbers", "ti",
                         "--ti-from", clip_file, *TRAIN])
    _one_line(code, err, str(clip_file), "prompt-vectors")
    assert not out.exists()
    code, err = run_cli(["generate", "--prompt", PROMPT, "--adapter", both_run, "--textual-inversion", clip_file,
                         "--out", tmp_path / "g.mp4", "--quiet"])
    _one_line(code, err, str(clip_file), "prompt-vectors")
    unet3d = UNET3D.tiny.make(tmp_path / "tiny-unet3d")
    code, err = run_cli(["train", tiny_video, "--prompt", "a <cav> moving right", "--base", unet3d, "--out", out,
                         "--absorbers", "ti", "--ti-from", both_run / VECTORS, "--frames", UNET3D.tiny.frames,
                         "--size", UNET3D.tiny.size, "--steps", "1", "--quiet"])
    _one_line(code, err, KIND, "textual-inversion token rows")
    assert not out.exists()


def test_dry_run_row_is_the_prompt_vectors(wan):
    """`cav train --dry-run` on Wan with ``--absorbers both``: the stage row is ``wan.plan.prompt_vector_params``."""
    from cav import api
    from cav.wan.plan import prompt_vector_params

    cfg = TrainConfig.of(prompt=PROMPT, base=str(wan), absorbers="both", frames=5, size=[16, 16], ti_tokens=3)
    rows = {r["name"]: r for r in api.plan(cfg)["stages"]}
    assert list(rows) == ["s_lora", "prompt_vectors", "t_lora"]
    width = json.loads((wan / "transformer" / "config.json").read_text())["text_dim"]
    assert rows["prompt_vectors"]["trainable_params"] == prompt_vector_params(3, width) == 3 * width


def test_several_clips_each_train_their_own_vectors(wan, tiny_video, blue_video, tmp_path):
    """Two clips with ``--absorbers ti``: each clip's vectors (own seed, own spatial prompt) published in its own
    absorbers folder, trained apart from each other."""
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", tiny_video, blue_video, "--prompt", PROMPT, "--spatial-prompt",
                                  "a red square", "--spatial-prompt", "a blue square", "--base", wan, "--out", out,
                                  "--absorbers", "ti", *TRAIN]]) == 0
    first, second = (PromptVectors.load(out / d / "prompt_vectors.safetensors").vectors
                     for d in ("absorbers", "absorbers/clip-1"))
    assert first.shape == second.shape and not torch.equal(first, second)
    assert _stages(out) == ["absorbers"] * 4 + ["t_lora"] * 2
