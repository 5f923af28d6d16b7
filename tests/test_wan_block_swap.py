"""``cav train --offload-frozen`` on Wan = block swap (``Family.block_swap``, ``backbone.load(swap_blocks=True)``):
the frozen block weights rest on the CPU from load to the end of the run and visit the device one or two blocks at
a time, and the run comes out bit for bit as without it. On a machine without a GPU the swap runs with the CPU as
both devices (``api.train(swap_on_cpu=True)``, the explicit parameter for this): its copies, hooks, write-backs and
ledger (``offload.Residency``) are the ones a GPU run goes through. Unasked, ``--offload-frozen`` on a CPU warns once
and swaps nothing."""

import json
import logging

import numpy as np
import pytest
import torch

from conftest import assert_same_outputs, run_outputs
from cav import api, families, sampling, trainer
from cav.cli import build_config, build_parser, main
from cav.families import WAN
from cav.wan import checks, offload
from cav.wan.tiny import TinyWanSpec, make_tiny_wan

BLOCKS = 5

PROMPT = "a red square moving right"
TRAIN = ["--frames", str(WAN.tiny.frames), "--size", str(WAN.tiny.size), "--steps", "2", "--absorber-steps", "2",
         "--sample-steps", "2", "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    """The tests' tiny Wan with 5 blocks: a budget of two blocks on the device means something."""
    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "tiny-wan", TinyWanSpec(layers=BLOCKS))


@pytest.fixture(scope="module")
def wan_a14b(tmp_path_factory):
    """A two-expert tiny Wan (2.2 A14B's layout): two swaps sharing one ledger."""
    return make_tiny_wan(tmp_path_factory.mktemp("tiny-a14b") / "tiny-a14b", TinyWanSpec(layers=BLOCKS), experts=2)


def _argv(video, base, out, *extra):
    return ["train", str(video), "--prompt", PROMPT, "--base", str(base), "--out", str(out), *TRAIN, *extra]


def _train(video, base, out, *extra):
    assert main(_argv(video, base, out, *extra)) == 0
    return out


def _train_swapped(video, base, out, *extra, resume=False):
    """The same run through the API with the swap on the CPU (what `cav train --offload-frozen` does on a GPU)."""
    args = build_parser("train").parse_args(_argv(video, base, out, "--offload-frozen", *extra))
    return api.train(video, build_config(args), out, quiet=True, resume=resume, estimate=False, swap_on_cpu=True)


def _assert_same(a, b):
    (fa, sa), _ = a, b
    assert any("t_lora" in k for k in fa) and any("s_lora" in k for k in fa) and sa
    assert_same_outputs(a, b)


class Watch:
    """The real swaps a run makes (``offload.swap_transformer_blocks`` wrapped, not replaced), checked from the
    tensors themselves at every block arrival: never more than the ledger's budget of blocks off their home copies;
    and every call of ``Module.to`` that would move a whole transformer or block (what a load without the swap does)."""

    def __init__(self, monkeypatch):
        from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

        self.swaps, self.moved, self.seen, self.sampling_uses, self.used = [], [], 0, 0, {}
        real, to = offload.swap_transformer_blocks, torch.nn.Module.to

        def swap(transformer, compute, offload_device="cpu", recorder=None, residency=None, name="blocks"):
            s = real(transformer, compute, offload_device, lambda e, i: self._recorder(name, e, i), residency, name)
            self.swaps.append(s)
            return s

        def moved(module, *args, **kwargs):
            whole = isinstance(module, (WanTransformer3DModel, WanTransformerBlock)) or (
                isinstance(module, torch.nn.ModuleList) and any(isinstance(m, WanTransformerBlock) for m in module))
            if whole:
                self.moved.append(type(module).__name__)
            return to(module, *args, **kwargs)

        real_sample = sampling.sample_videos

        def sample(*args, **kwargs):  # the validation samples: the swap works through them
            before = self.uses
            out = real_sample(*args, **kwargs)
            self.sampling_uses += self.uses - before
            return out

        self.uses = 0
        monkeypatch.setattr(offload, "swap_transformer_blocks", swap)
        monkeypatch.setattr(torch.nn.Module, "to", moved)
        monkeypatch.setattr(sampling, "sample_videos", sample)

    def _recorder(self, name, event, i):
        if event == "use":
            self.uses += 1
            self.used.setdefault(name, set()).add(i)
        if event == "in":
            on = sum(len(s.on_device()) for s in self.swaps)
            self.seen = max(self.seen, on)
            assert on <= offload.BUDGET, f"{on} blocks on the device"


def test_block_swap_run_is_bit_identical_and_never_holds_every_block(tiny_video, wan_model, tmp_path, monkeypatch):
    """Absorbers (S-LoRA + prompt vectors) and T-LoRA, a checkpoint every step (the S-LoRA unmerged and merged again,
    saves, validation samples), then an interrupted run resumed: adapters and samples equal the run without the
    swap, bit for bit, and from load to the end at most two blocks were on the compute device."""
    assert WAN.block_swap is not None and all(f.block_swap is None for f in families.FAMILIES.values() if f is not WAN)
    plain = run_outputs(_train(tiny_video, wan_model, tmp_path / "plain"))

    watch = Watch(monkeypatch)
    swapped = _train_swapped(tiny_video, wan_model, tmp_path / "swapped")
    _assert_same(plain, run_outputs(swapped))
    [swap] = watch.swaps  # one swap, made at load, for the whole run
    blocks = len(swap.blocks)
    assert blocks == BLOCKS
    summary = json.loads((swapped / "summary.json").read_text())
    assert summary["block_swap"] == {"device": "cpu", "blocks": blocks, "budget": 2, "peak_blocks_on_device": 2}
    assert swap.residency.peak == 2 and 1 <= watch.seen <= 2  # the ledger, and the tensors themselves
    assert watch.moved == []  # no whole transformer or block moved: not at load, not at a checkpoint
    assert watch.sampling_uses >= 2 * blocks  # the validation samples ran through the swap (every block, each step)
    assert swap._handles  # still attached at the end: nothing ever detached it

    # interrupted (Ctrl-C) at the T-LoRA's second step, resumed: the same files as the uninterrupted runs
    calls = {"n": 0}
    step = trainer.train_step

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # absorbers 2 steps, T-LoRA step 1, then this
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train_swapped(tiny_video, wan_model, tmp_path / "resumed")
    monkeypatch.setattr(trainer, "train_step", step)
    resumed = _train_swapped(tiny_video, wan_model, tmp_path / "resumed", resume=True)
    a, b = run_outputs(swapped), run_outputs(resumed)
    assert {k: a[0][k] for k in ("t_lora/adapter_model.safetensors",)}.keys() <= b[0].keys()
    for name in ("t_lora/adapter_model.safetensors", "absorbers/s_lora/adapter_model.safetensors"):
        for key in a[0][name]:
            assert torch.equal(a[0][name][key], b[0][name][key]), (name, key)
    for name in a[1]:
        if name.startswith("samples/"):
            assert np.array_equal(a[1][name], b[1][name]), name
    assert json.loads((resumed / "summary.json").read_text())["block_swap"]["peak_blocks_on_device"] == 2
    assert all(s.residency.peak <= 2 for s in watch.swaps)


def test_block_swap_on_a_cpu_warns_and_swaps_nothing(tiny_video, wan_model, tmp_path, monkeypatch, caplog):
    made = []
    real = offload.swap_transformer_blocks
    monkeypatch.setattr(offload, "swap_transformer_blocks", lambda *a, **k: made.append(1) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="cav"):
        run = _train(tiny_video, wan_model, tmp_path / "cpu", "--offload-frozen", "--steps", "1",
                     "--absorber-steps", "1")
    [record] = [r for r in caplog.records if "--offload-frozen" in r.getMessage()]
    assert record.getMessage() == f"cav: warning: {checks.offload_plan(True, 'cpu')[1]}"
    assert made == [] and "block_swap" not in json.loads((run / "summary.json").read_text())


def test_block_swap_on_two_experts_shares_one_budget(tiny_video, wan_a14b, tmp_path, monkeypatch):
    """Wan 2.2 A14B's layout: both experts swapped from load (the trained one and the one only samples use), one
    ledger for the two, so bringing a block of one expert releases the other's: never more than two blocks on the
    device in all; the run equals the one without the swap, bit for bit. With ``--placement temporal-heads`` the
    heads are measured on the swapped model too (``temporal_heads.json`` equal)."""
    heads = ("--placement", "temporal-heads")
    plain_run = _train(tiny_video, wan_a14b, tmp_path / "plain", *heads)
    plain = run_outputs(plain_run)
    watch = Watch(monkeypatch)
    swapped = _train_swapped(tiny_video, wan_a14b, tmp_path / "swapped", *heads)
    _assert_same(plain, run_outputs(swapped))
    assert (plain_run / "temporal_heads.json").read_text() == (swapped / "temporal_heads.json").read_text()
    assert [s.name for s in watch.swaps] == ["transformer", "transformer_2"]
    assert watch.swaps[0].residency is watch.swaps[1].residency and watch.swaps[0].residency.peak == 2
    assert watch.used == {"transformer": set(range(BLOCKS)), "transformer_2": set(range(BLOCKS))}  # samples: both
    assert watch.moved == [] and watch.seen <= 2
    summary = json.loads((swapped / "summary.json").read_text())["block_swap"]
    assert summary == {"device": "cpu", "blocks": 2 * BLOCKS, "budget": 2, "peak_blocks_on_device": 2}
