"""``cav train --offload-frozen`` on Wan = block swap (``Family.block_swap``, ``run.BlockSwapping``): the frozen
block weights leave the device between their uses, the adapters come out bit for bit as without it. Both "devices"
are the CPU here (``offload.py``'s copies still go to fresh tensors), with ``offload_plan``'s CPU check patched so
the swap attaches; unpatched, a CPU run warns once and swaps nothing."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from cav import families
from cav.cli import main
from cav.families import WAN
from cav.wan import checks, offload

PROMPT = "a red square moving right"
TRAIN = ["--frames", str(WAN.tiny.frames), "--size", str(WAN.tiny.size), "--steps", "2", "--absorber-steps", "2",
         "--sample-steps", "2", "--absorber-batch", "2", "--checkpoint-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    return WAN.tiny.make(tmp_path_factory.mktemp("tiny-wan") / "tiny-wan")


class Swaps:
    """Every ``swap_transformer_blocks`` a run makes, its events (recorder) and its detaches."""

    def __init__(self, real):
        self.real, self.swaps, self.events, self.detached = real, [], [], 0

    def __call__(self, transformer, compute, offload_device="cpu", recorder=None):
        k = len(self.swaps)
        swap = self.real(transformer, compute, offload_device, lambda event, i: self.events.append((k, event, i)))
        detach = swap.detach

        def counted():
            self.detached += 1
            detach()
        swap.detach = counted
        self.swaps.append(swap)
        return swap


def _train(video, base, out, *extra):
    assert main(["train", str(video), "--prompt", PROMPT, "--base", str(base), "--out", str(out), *TRAIN,
                 *extra]) == 0
    return out


def _adapters(run):
    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted(run.rglob("*.safetensors"))}


def test_block_swap_trains_the_same_adapters(tiny_video, wan_model, tmp_path, monkeypatch):
    assert WAN.block_swap is not None and all(f.block_swap is None for f in families.FAMILIES.values() if f is not WAN)
    plain = _adapters(_train(tiny_video, wan_model, tmp_path / "plain"))
    swaps = Swaps(offload.swap_transformer_blocks)
    monkeypatch.setattr(offload, "swap_transformer_blocks", swaps)
    monkeypatch.setattr(checks, "offload_plan", lambda offload_frozen, device: (offload_frozen, None))
    swapped = _adapters(_train(tiny_video, wan_model, tmp_path / "swapped", "--offload-frozen"))

    assert plain.keys() == swapped.keys() and any("t_lora" in k for k in plain) and any("s_lora" in k for k in plain)
    for name in plain:
        assert plain[name].keys() == swapped[name].keys(), name
        for key in plain[name]:
            assert torch.equal(plain[name][key], swapped[name][key]), (name, key)
    # attached for each stage's steps and again after each checkpoint (2 stages × (1 + 2 checkpoints)), each one
    # detached (at a checkpoint or at the stage's end); every block ran while swapped, never more than 2 resident
    assert len(swaps.swaps) == 6 and swaps.detached == 6
    blocks = len(swaps.swaps[0].blocks)
    for k, swap in enumerate(swaps.swaps):
        assert swap.peak <= 2 and not swap._handles
        if k % 3 != 2:  # the last attach of a stage runs no step: the stage ends after its last checkpoint
            assert {i for j, e, i in swaps.events if j == k and e == "use"} == set(range(blocks))


def test_block_swap_on_a_cpu_warns_and_swaps_nothing(tiny_video, wan_model, tmp_path, monkeypatch, caplog):
    swaps = Swaps(offload.swap_transformer_blocks)
    monkeypatch.setattr(offload, "swap_transformer_blocks", swaps)
    with caplog.at_level(logging.WARNING, logger="cav"):
        _train(tiny_video, wan_model, tmp_path / "cpu", "--offload-frozen", "--steps", "1", "--absorber-steps", "1")
    [record] = [r for r in caplog.records if "--offload-frozen" in r.getMessage()]
    assert record.getMessage() == f"cav: warning: {checks.offload_plan(True, 'cpu')[1]}"
    assert swaps.swaps == []
