"""Two-expert Wan bases (Wan 2.2 T2V-A14B's layout: ``transformer`` for the high-noise steps, ``transformer_2`` for
the low-noise ones, switched at the pipeline's ``boundary_ratio``), on the tiny two-expert Wan: ``--experts high|low``
trains the LoRAs on one expert over its own noise range, ``both`` on both, each draw routed to its expert
(``backbone.Experts``); samples use both experts as stock ``WanPipeline`` does; a run resumes exactly; ``cav export``
writes the ``_high_noise`` / ``_low_noise`` files of the experts trained, which diffusers' own Wan converter and
loader read back to cav's output."""

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
    return {e: (root / e, _train_recording(a14b, tiny_video, root / e, e)) for e in ("high", "low", "both")}


PARTS = {"high": ["transformer"], "low": ["transformer_2"], "both": ["transformer", "transformer_2"]}


@pytest.mark.parametrize("expert", ["high", "low", "both"])
def test_training_runs_on_its_experts_and_ranges_samples_on_both(runs, expert):
    run, calls = runs[expert]
    trained = [c for c in calls if c[1]]
    assert sorted({c[0] for c in trained}) == PARTS[expert]  # absorbers and T-LoRA: the chosen expert(s) only
    for part, ok in (("transformer", lambda t: t >= BOUNDARY), ("transformer_2", lambda t: t < BOUNDARY)):
        steps = [t for c in trained if c[0] == part for t in c[2]]
        assert all(map(ok, steps)), (part, steps)  # each expert only on the timesteps the pipeline gives it
    sampled = {c[0] for c in calls if not c[1]}
    assert sampled == {"transformer", "transformer_2"}  # validation samples: both experts, the pipeline's switch
    meta = json.loads((run / "t_lora" / "cav.json").read_text())
    assert meta["experts"] == expert and meta["expert_parts"] == PARTS[expert]
    assert f"experts: {expert}" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("expert", ["high", "both"])
def test_only_the_trained_experts_carry_lora_updates(runs, a14b, expert):
    bb = backbone.load(a14b, "cpu", experts=expert)
    api.load_adapters(bb, [(str(runs[expert][0]), 1.0)], [(str(runs[expert][0]), 1.0)])
    for part, model in bb.denoisers().items():
        ups = [p for n, p in model.named_parameters() if ".lora_B." in n]
        if part in PARTS[expert]:
            assert ups and any(p.abs().max() > 0 for p in ups), part  # trained: non-zero updates
            assert lora.adapter_names(model) == {"t_lora_0", "image_lora_0"}  # the T-LoRA and the S-LoRA
        else:
            assert not ups and not lora.adapter_names(model), part


def test_both_experts_route_each_row_by_its_timestep(a14b):
    bb = backbone.load(a14b, "cpu", experts="both")
    high, low = bb.denoisers().values()
    x, cond = torch.randn(4, 4, 2, 2, 2), torch.randn(4, 16, 16)
    t = torch.tensor([990.0, 100.0, 875.0, 874.0])
    with torch.no_grad():
        routed = bb.unet(x, t, encoder_hidden_states=cond).sample
        alone = [(high if float(ti) >= BOUNDARY else low)(x[i:i + 1], t[i:i + 1], cond[i:i + 1]).sample
                 for i, ti in enumerate(t)]
        whole = bb.unet(x, torch.full((4,), 900.0), encoder_hidden_states=cond).sample  # all rows: one call
    assert torch.allclose(routed, torch.cat(alone), atol=1e-6)
    assert torch.equal(whole, high(x, torch.full((4,), 900.0), cond).sample)
    assert bb.train_window((0, 1000)) == (0, 1000) and bb.denoiser_at(torch.tensor(880.0)) is high


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


@pytest.mark.parametrize("expert", ["low", "both"])
def test_generate_reproduces_the_checkpoint_sample(runs, tmp_path, expert):
    run = runs[expert][0]
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


def test_image_lora_file_on_both_experts_is_refused(runs, a14b):
    """The family's image-LoRA reader (``--s-lora-from``'s, refused before loading with ``both`` by preflight) on
    the two-expert denoiser from the Python API: one CavError line, nothing loaded."""
    from cav.errors import CavError

    bb = backbone.load(a14b, "cpu", experts="both")
    file = runs["high"][0] / "absorbers" / "s_lora" / lora.DIFFUSERS_WEIGHTS  # a Wan image LoRA file (one model's)
    with pytest.raises(CavError, match=r"^an image LoRA file goes into one expert"):
        WAN.image_lora(bb.unet, file, "look", WAN)
    assert not lora.adapter_names(bb.unet)


@pytest.mark.parametrize("expert", ["high", "both"])
def test_resume_ends_with_the_same_t_lora(runs, tiny_video, tmp_path, expert):
    run = runs[expert][0]
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


def test_both_experts_export_the_pair_and_stock_loads_it(runs, a14b, tmp_path):
    """A ``--experts both`` run: `cav export` writes the pair in one command; stock ``WanPipeline`` with the high-noise
    file in ``transformer`` and the low-noise one in ``transformer_2`` samples cav's latents, and so does it with the
    run folder's own diffusers-layout files (``pytorch_lora_weights.safetensors`` for ``transformer``,
    ``pytorch_lora_weights_transformer_2.safetensors`` for ``transformer_2``)."""
    from diffusers import WanPipeline

    run = runs["both"][0]
    assert main(["export", str(run), "--out", str(tmp_path / "motion.safetensors")]) == 0
    high, low = tmp_path / "motion_high_noise.safetensors", tmp_path / "motion_low_noise.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [high.name, low.name]
    bb = backbone.load(a14b, "cpu", experts="both")
    api.load_adapters(bb, [(str(run), 1.0)], [])
    ours = _latents(bb.pipeline())
    for first, second in (((str(high), {}), (str(low), {})),
                          ((str(run / "t_lora"), {}),
                           (str(run / "t_lora"), {"weight_name": lora.diffusers_weights("transformer_2")}))):
        stock = WanPipeline.from_pretrained(str(a14b))
        stock.set_progress_bar_config(disable=True)
        stock.load_lora_weights(first[0], adapter_name="motion", **first[1])
        one = _latents(stock)
        stock.load_lora_weights(second[0], adapter_name="motion", load_into_transformer_2=True, **second[1])
        theirs = _latents(stock)
        assert (theirs - one).abs().max() > 1e-3  # the low-noise expert's LoRA matters too
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_bad_experts_input_is_one_line(a14b, tiny_video, tmp_path, run_cli):
    one = WAN.tiny.make(tmp_path / "one")
    out = tmp_path / "run"
    base = ["train", tiny_video, "--prompt", PROMPT, "--out", out, "--steps", "1", "--absorber-steps", "1",
            "--frames", "5", "--size", "16", "--quiet"]
    image_lora = tmp_path / "image_lora.safetensors"
    image_lora.write_bytes(b"")
    for extra, words in ((["--base", one, "--experts", "high"], ("--experts high", "two-expert base", "drop --experts")),
                         (["--base", a14b, "--experts", "both", "--s-lora-from", image_lora],
                          ("--s-lora-from with --experts both", "--experts high or low")),
                         (["--base", a14b, "--experts", "mid"], ("--experts mid", "high, low or both"))):
        code, err = run_cli(base + extra)
        assert code == 2 and "\n" not in err and "Traceback" not in err and all(w in err for w in words), err
        assert not out.exists()


def test_dry_run_counts_the_trained_expert(a14b):
    from cav.config import TrainConfig

    for expert, parts in PARTS.items():
        plan = api.plan(TrainConfig.of(prompt="x", base=str(a14b), frames=5, size=[16, 16], absorbers="s-lora",
                                    experts=expert))
        assert plan["experts"] == expert and [s["expert"] for s in plan["stages"]] == parts + parts
        assert [s["name"] for s in plan["stages"]] == ["s_lora"] * len(parts) + ["t_lora"] * len(parts)
        assert len({s["trainable_params"] for s in plan["stages"] if s["name"] == "t_lora"}) == 1
        assert plan["memory"]["gib"]["peak"] >= 0
    one = api.plan(TrainConfig.of(prompt="x", base=str(a14b), frames=5, size=[16, 16], absorbers="s-lora"))
    assert one["experts"] == "high"
    # the prompt vectors live in the text condition, which both experts share: one row, not one per expert
    both = api.plan(TrainConfig.of(prompt="x", base=str(a14b), frames=5, size=[16, 16], absorbers="both",
                                experts="both"))
    assert [s["name"] for s in both["stages"]].count("prompt_vectors") == 1
