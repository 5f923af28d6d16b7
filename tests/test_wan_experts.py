"""Two-expert Wan bases (Wan 2.2 T2V-A14B's layout: ``transformer`` for the high-noise steps, ``transformer_2`` for
the low-noise ones, switched at the pipeline's ``boundary_ratio``), on the tiny two-expert Wan: ``--experts`` trains
the LoRAs on one expert over its own noise range; samples use both experts as stock ``WanPipeline`` does; a run
resumes exactly; ``cav export`` writes that expert's file of the ``_high_noise`` / ``_low_noise`` pair, which
diffusers' own Wan converter and loader read back to cav's output."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cav import api, backbone
from cav.adapters import lora
from cav.cli import main
from cav.data.video import read_video
from cav.families import WAN
from cav.wan.tiny import A14B_BOUNDARY_RATIO, make_tiny_wan

PROMPT = "a red square moving right"
BOUNDARY = A14B_BOUNDARY_RATIO * 1000  # the tiny scheduler's num_train_timesteps
TRAIN = ["--frames", "5", "--size", "16", "--steps", "2", "--absorber-steps", "2", "--sample-steps", "2",
         "--absorber-batch", "2", "--checkpoint-every", "1", "--absorbers", "s-lora", "--quiet",
         "--t-lora-lr", "0.05"]  # a large step, so two steps change the sample visibly


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("a14b") / "tiny-a14b", experts=2)


def _train_recording(base, video, out, expert: str) -> list[tuple[str, bool, list[float]]]:
    """Train a run on ``expert`` and record every call of either expert: (component, with grad, timesteps)."""
    calls, real_load = [], backbone.load

    def load(*args, **kwargs):
        bb = real_load(*args, **kwargs)
        for part, model in bb.denoisers().items():
            model.register_forward_pre_hook(
                lambda m, a, kw, part=part: calls.append((part, torch.is_grad_enabled(),
                                                          [float(t) for t in (kw.get("timestep", a[1] if len(a) > 1
                                                                                     else None)).reshape(-1)])),
                with_kwargs=True)
        return bb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbone, "load", load)
        assert main(["train", str(video), "--prompt", PROMPT, "--base", str(base), "--out", str(out),
                     "--experts", expert, *TRAIN]) == 0
    return calls


@pytest.fixture(scope="module")
def runs(a14b, tiny_video, tmp_path_factory):
    """A run on each expert, with the calls each expert saw."""
    root = tmp_path_factory.mktemp("runs")
    return {e: (root / e, _train_recording(a14b, tiny_video, root / e, e)) for e in ("high", "low")}


@pytest.mark.parametrize("expert", ["high", "low"])
def test_training_runs_on_its_expert_and_range_samples_on_both(runs, expert):
    run, calls = runs[expert]
    part = {"high": "transformer", "low": "transformer_2"}[expert]
    trained = [c for c in calls if c[1]]
    assert trained and {c[0] for c in trained} == {part}  # absorbers and T-LoRA: the chosen expert only
    steps = [t for c in trained for t in c[2]]
    assert all(t >= BOUNDARY for t in steps) if expert == "high" else all(t < BOUNDARY for t in steps), steps
    sampled = {c[0] for c in calls if not c[1]}
    assert sampled == {"transformer", "transformer_2"}  # validation samples: both experts, the pipeline's switch
    meta = json.loads((run / "t_lora" / "cav.json").read_text())
    assert meta["experts"] == expert and meta["expert_part"] == part
    assert f"experts: {expert}" in (run / "config.yaml").read_text()


def test_only_the_trained_expert_carries_lora_updates(runs, a14b):
    bb = backbone.load(a14b, "cpu", experts="high")
    api.load_adapters(bb, [(str(runs["high"][0]), 1.0)], [(str(runs["high"][0]), 1.0)])
    high, low = bb.denoisers().values()
    assert high is bb.unet
    ups = [p for n, p in high.named_parameters() if ".lora_B." in n]
    assert ups and any(p.abs().max() > 0 for p in ups)  # trained: non-zero updates
    assert not lora.adapter_names(low) and not any(".lora_" in n for n, _ in low.named_parameters())


def test_window_and_timestep_routing(a14b):
    high = backbone.load(a14b, "cpu")  # default: high
    low = backbone.load(a14b, "cpu", experts="low")
    assert high.expert == "high" and high.part == "transformer" and high.boundary == BOUNDARY
    assert high.train_window(None) == (875, 1000) and high.train_window((0, 900)) == (875, 900)
    assert low.train_window(None) == (0, 875) and low.train_window((100, 1000)) == (100, 875)
    t2 = low.denoisers()["transformer_2"]
    assert low.denoiser_at(torch.tensor(875.0)) is low.denoisers()["transformer"]
    assert low.denoiser_at(torch.tensor(874.9)) is t2 is low.unet
    with pytest.raises(Exception, match=r"^--t-lora-timesteps \[0, 500\] lies outside the high-noise expert's range"):
        high.train_window((0, 500))
    one = backbone.load(WAN.tiny.make(a14b.parent / "one"), "cpu")  # one expert: as before
    assert one.train_window((3, 7)) == (3, 7) and one.boundary is None and one.denoiser_at(torch.tensor(1.0)) is one.unet


def test_generate_reproduces_the_checkpoint_sample(runs, tmp_path):
    run = runs["low"][0]
    ckpt, out = run / "checkpoints" / "step-000001", tmp_path / "gen.mp4"
    assert main(["generate", "--prompt", PROMPT, "--adapter", str(ckpt), "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(read_video(out, frames=None, size=(16, 16)),
                          read_video(ckpt / "samples" / "sample-0.mp4", frames=None, size=(16, 16)))


def test_adapters_of_both_experts_are_not_composed(runs, tmp_path, capsys):
    capsys.readouterr()
    code = main(["generate", "--prompt", PROMPT, "--adapter", str(runs["high"][0]), "--adapter",
                 str(runs["low"][0]), "--out", str(tmp_path / "x.mp4"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different experts" in err and "\n" not in err and not (tmp_path / "x.mp4").exists()


def test_resume_ends_with_the_same_t_lora(runs, tiny_video, tmp_path):
    run = runs["high"][0]
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    for rel in ("checkpoints/step-000002", "t_lora", "samples"):
        shutil.rmtree(copy / rel)
    assert main(["train", str(tiny_video), "--resume", "--out", str(copy), "--quiet"]) == 0
    a, b = load_file(str(run / "t_lora" / lora.WEIGHTS)), load_file(str(copy / "t_lora" / lora.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _latents(pipe, frames=5, size=16):
    from cav.sampling import fresh_noise

    latents = fresh_noise((1, 4, (frames - 1) // 4 + 1, size // 8, size // 8), [0])
    with torch.no_grad():
        return pipe(prompt=PROMPT, num_frames=frames, height=size, width=size, num_inference_steps=4,
                    guidance_scale=5.0, latents=latents, output_type="latent").frames


def test_export_pair_is_read_back_by_diffusers(runs, a14b, tmp_path, capsys):
    """Each run's export is its expert's file of the pair (none for the untrained expert); diffusers' Wan converter
    reads it back, and stock ``WanPipeline.load_lora_weights`` (``load_into_transformer_2=True`` for the low-noise
    file) samples what cav samples with the run's T-LoRA."""
    from diffusers import WanPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    target = tmp_path / "motion.safetensors"
    for expert in ("high", "low"):
        capsys.readouterr()
        assert main(["export", str(runs[expert][0]), "--format", "comfyui", "--out", str(target)]) == 0
    files = {"high": tmp_path / "motion_high_noise.safetensors", "low": tmp_path / "motion_low_noise.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())
    only = tmp_path / "only"
    assert main(["export", str(runs["high"][0]), "--out", str(only / "m.safetensors")]) == 0
    assert [p.name for p in only.iterdir()] == ["m_high_noise.safetensors"]  # the low expert trained nothing here
    for expert, path in files.items():
        converted = _convert_non_diffusers_wan_lora_to_diffusers(load_file(str(path)))
        assert converted and all(k.startswith("transformer.blocks.") for k in converted)
        bb = backbone.load(a14b, "cpu", experts=expert)
        api.load_adapters(bb, [(str(runs[expert][0]), 1.0)], [])
        ours = _latents(bb.pipeline())
        stock = WanPipeline.from_pretrained(str(a14b))
        stock.set_progress_bar_config(disable=True)
        plain = _latents(stock)
        stock.load_lora_weights(str(path), adapter_name="motion", load_into_transformer_2=expert == "low")
        theirs = _latents(stock)
        assert (theirs - plain).abs().max() > 1e-3, expert  # the expert's LoRA changes the sample
        assert torch.allclose(ours, theirs, atol=1e-5), (expert, (ours - theirs).abs().max())


def test_experts_on_a_one_expert_base_and_both_are_one_line(a14b, tiny_video, tmp_path, run_cli):
    one = WAN.tiny.make(tmp_path / "one")
    out = tmp_path / "run"
    base = ["train", tiny_video, "--prompt", PROMPT, "--out", out, "--steps", "1", "--absorber-steps", "1",
            "--frames", "5", "--size", "16", "--quiet"]
    for extra, words in ((["--base", one, "--experts", "high"], ("--experts high", "two-expert base", "drop --experts")),
                         (["--base", a14b, "--experts", "both"], ("--experts both", "not supported yet")),
                         (["--base", a14b, "--experts", "mid"], ("--experts mid", "high or low"))):
        code, err = run_cli(base + extra)
        assert code == 2 and "\n" not in err and "Traceback" not in err and all(w in err for w in words), err
        assert not out.exists()


def test_dry_run_counts_the_trained_expert(a14b):
    from cav.config import TrainConfig

    for expert, part in (("high", "transformer"), ("low", "transformer_2")):
        plan = api.plan(TrainConfig(prompt="x", base=str(a14b), frames=5, size=[16, 16], absorbers="s-lora",
                                    experts=expert))
        assert plan["experts"] == expert and [s["expert"] for s in plan["stages"]] == [part, part]
        assert plan["memory"]["gib"]["peak"] >= 0
    one = api.plan(TrainConfig(prompt="x", base=str(a14b), frames=5, size=[16, 16], absorbers="s-lora"))
    assert one["experts"] == "high"
