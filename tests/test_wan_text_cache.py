"""Issue 23, "Memory": on Wan the text encoder runs once per text, at the start of a training run, its encodings are
cached and it is released (``cav.textcache``). Checked on a tiny Wan: one umT5 pass per distinct text, none once
training started (not at checkpoints, not in validation samples), umT5 gone from the backbone (``summary.json``),
and adapters and samples bit for bit those of the run that kept umT5 and encoded as it went (the old path, the same
test), with and without the block swap."""

import json

import pytest
import torch
from transformers import UMT5EncoderModel

from conftest import assert_same_outputs, run_outputs
from cav import api, backbone, run, textcache
from cav.cli import build_config, build_parser, main
from cav.conditioning import UmT5Condition
from cav.families import WAN
from cav.wan import offload
from cav.wan.tiny import TinyWanSpec, make_tiny_wan

PROMPT = "a red square moving right"
SPATIAL = "a red square"
OTHER = "a square sliding"
TRAIN = ["--frames", str(WAN.tiny.frames), "--size", str(WAN.tiny.size), "--steps", "2", "--absorber-steps", "2",
         "--sample-steps", "2", "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet",
         "--spatial-prompt", SPATIAL, "--validation-prompt", PROMPT, "--validation-prompt", OTHER,
         "--t-lora-prompt-dropout", "0.5", "--validation-invert", "--validation-inversion-steps", "2",
         "--absorbers", "both"]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "tiny-wan", TinyWanSpec(layers=3))


def _argv(video, base, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(base), "--out", str(out), *TRAIN, *extra]


def _assert_same(a, b):
    (fa, sa), _ = a, b
    assert any("t_lora" in k for k in fa) and any("prompt_vectors" in k for k in fa)
    assert len(sa) >= 4  # two prompts, two checkpoints, published
    assert_same_outputs(a, b)


class Passes:
    """Every umT5 forward (the real one, wrapped): how many, and how many after the first training step began;
    with the block swap, the blocks on the device while umT5 ran."""

    def __init__(self, monkeypatch):
        from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

        self.count, self.late, self.training, self.swaps, self.blocks_while_encoding = 0, 0, False, [], 0
        self.conditions = []  # every text condition the transformer was given (training steps and samples), in order
        forward, run_stage, swap = UMT5EncoderModel.forward, run.run_stage, offload.swap_transformer_blocks
        denoise = WanTransformer3DModel.forward

        def denoised(module, hidden_states, timestep, encoder_hidden_states, *args, **kwargs):
            self.conditions.append(encoder_hidden_states.detach().clone())
            return denoise(module, hidden_states, timestep, encoder_hidden_states, *args, **kwargs)

        def counted(module, *args, **kwargs):
            self.count += 1
            self.late += self.training
            self.blocks_while_encoding = max([self.blocks_while_encoding] + [len(s.on_device()) for s in self.swaps])
            return forward(module, *args, **kwargs)

        def stage(*args, **kwargs):
            self.training = True
            return run_stage(*args, **kwargs)

        def swapped(*args, **kwargs):
            s = swap(*args, **kwargs)
            self.swaps.append(s)
            return s

        monkeypatch.setattr(UMT5EncoderModel, "forward", counted)
        monkeypatch.setattr(WanTransformer3DModel, "forward", denoised)
        monkeypatch.setattr(run, "run_stage", stage)
        monkeypatch.setattr(offload, "swap_transformer_blocks", swapped)


def _same_conditions(a, b):
    """The tiny Wan's samples hardly depend on the text (a uint8 step or so), so the conditions themselves are
    compared: every one the transformer was given, training steps and sampling steps alike, bit for bit."""
    assert len(a.conditions) == len(b.conditions) > 0
    for x, y in zip(a.conditions, b.conditions):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_a_wan_run_encodes_each_text_once_and_releases_umt5(tiny_video, wan_model, tmp_path, monkeypatch):
    """Absorbers (S-LoRA + prompt vectors) under a spatial prompt, T-LoRA with prompt dropout (the empty prompt),
    two validation prompts with guidance, each started from the inverted clip (the empty prompt, unguided), a
    checkpoint every step: with the old path (umT5 kept, encoding as the run goes) as the reference, the new run
    encodes each of its 4 texts once before training, never again, releases umT5, and comes out bit for bit equal."""
    cfg = build_config(build_parser("train").parse_args(_argv(tiny_video, wan_model, tmp_path / "x")))
    texts = textcache.run_texts(cfg, 1)
    assert sorted(texts) == sorted([PROMPT, SPATIAL, "", OTHER])

    with monkeypatch.context() as m:  # the old path: no cache, umT5 stays and encodes at every use
        m.setattr(UmT5Condition, "encode_once", False)
        old = Passes(m)
        assert main(_argv(tiny_video, wan_model, tmp_path / "old")) == 0
        assert old.late > 0  # it encoded while training and at checkpoints (validation samples)
        assert "text_encoder" not in json.loads((tmp_path / "old" / "summary.json").read_text())
    reference = run_outputs(tmp_path / "old")

    new = Passes(monkeypatch)
    assert main(_argv(tiny_video, wan_model, tmp_path / "new")) == 0
    assert (new.count, new.late) == (len(texts), 0)  # one pass per text, all before the first step
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert summary["text_encoder"] == {"texts": 4, "encoder_passes": 4, "released": True, "devices_at_end": []}
    _assert_same(reference, run_outputs(tmp_path / "new"))
    _same_conditions(old, new)

    swapped = Passes(monkeypatch)  # --offload-frozen (block swap with the CPU as both devices): the same run
    args = build_parser("train").parse_args(_argv(tiny_video, wan_model, tmp_path / "swap", "--offload-frozen"))
    api.train(tiny_video, build_config(args), tmp_path / "swap", quiet=True, estimate=False, swap_on_cpu=True)
    assert (swapped.count, swapped.late) == (len(texts), 0) and len(swapped.swaps) == 1
    assert swapped.blocks_while_encoding == 0  # umT5 ran with no block on the device
    assert json.loads((tmp_path / "swap" / "summary.json").read_text())["text_encoder"]["released"] is True
    _assert_same(reference, run_outputs(tmp_path / "swap"))
    _same_conditions(old, swapped)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cached_encodings_are_the_pipeline_s_own(wan_model, dtype):
    """What validation samples pass as ``prompt_embeds`` / ``negative_prompt_embeds`` equals what
    ``WanPipeline.encode_prompt`` computes from the texts (what `cav generate` does), bit for bit; and what training
    reads equals the condition's own encoding."""
    bb = backbone.load(wan_model, "cpu", dtype)
    pipe = bb.pipeline()
    fresh = {t: bb.condition.encode(bb, [t]) for t in (PROMPT, "", "blurry")}
    pipeline = [(g, n, bb.condition.pipeline_encode(pipe, [PROMPT], bb.device, g, n))
                for g, n in ((True, None), (True, ["blurry"]), (False, None))]
    bb.text_cache = textcache.TextCache(bb)
    bb.text_cache.encode([PROMPT, "", "blurry"])
    bb.text_cache.release()
    assert bb.text_encoder is None and bb.text_encoders == []
    for text, want in fresh.items():
        assert torch.equal(bb.encode_prompt(text), want)
    for guidance, negatives, (cond, uncond) in pipeline:
        got, got_uncond = bb.pipeline_condition(bb.pipeline(), [PROMPT], bb.device, guidance, negatives)
        assert got.dtype == cond.dtype and torch.equal(got, cond)
        assert (got_uncond is None) == (uncond is None)
        if uncond is not None:
            assert torch.equal(got_uncond, uncond)
    assert torch.equal(bb.condition.unconditional(bb), fresh[""])
    with pytest.raises(Exception, match="not encoded at the start of the run"):
        bb.encode_prompt("a text nobody encoded")


def test_several_clips_encode_each_spatial_prompt_once(tiny_video, blue_video, wan_model, tmp_path, monkeypatch):
    """Two clips, each with its own spatial prompt: the run's texts are both spatial prompts, the prompt and the
    empty prompt, each encoded once before training, and the run equals the old path bit for bit."""
    argv = ["train", str(tiny_video), str(blue_video), "--prompt", PROMPT, "--base", str(wan_model), *TRAIN[:15],
            "--spatial-prompt", SPATIAL, "--spatial-prompt", "a blue square", "--absorbers", "s-lora"]
    cfg = build_config(build_parser("train").parse_args([*argv, "--out", str(tmp_path / "x")]))
    assert sorted(textcache.run_texts(cfg, 2)) == sorted([PROMPT, SPATIAL, "a blue square", ""])
    with monkeypatch.context() as m:
        m.setattr(UmT5Condition, "encode_once", False)
        old = Passes(m)
        assert main([*argv, "--out", str(tmp_path / "old")]) == 0
    new = Passes(monkeypatch)
    assert main([*argv, "--out", str(tmp_path / "new")]) == 0
    assert (new.count, new.late) == (4, 0) and old.late > 0
    old_outputs = run_outputs(tmp_path / "old")
    assert old_outputs[1]
    assert_same_outputs(old_outputs, run_outputs(tmp_path / "new"))
    _same_conditions(old, new)
