"""The toy base trainer runs on the one training step and resumes exactly from its saved state."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cav.toy.train_base as tb

RECIPE = dict(clips=6, frames=4, size=16, vae_steps=2, vae_batch=4, steps=4, batch=2, image_every=2, save_every=2,
              max_seconds=0)


def _unet(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_interrupted_base_training_resumes_exactly(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    stats = tb.train_base(ref, tb.BaseRecipe(**RECIPE), device="cpu", quiet=True)
    assert stats["unet_steps"] == 4 and (ref / "model_index.json").is_file()

    real, calls = tb.train_step, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # after the state saved at step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(tb, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tb.train_base(out, tb.BaseRecipe(**RECIPE), device="cpu", quiet=True)
    monkeypatch.setattr(tb, "train_step", real)
    assert (out / ".train_state" / "unet" / "state.json").is_file()
    tb.train_base(out, tb.BaseRecipe(**RECIPE), device="cpu", quiet=True)
    a, b = _unet(ref), _unet(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_captions_name_every_motion_held_out_ones_too_and_keep_the_appearance():
    from cav.data import toyworld as tw

    specs = tw.sample_specs(np.random.default_rng(0), 400)
    worded = tb.image_captions(specs, 0.5, torch.Generator().manual_seed(0))
    assert 150 < len(worded) < 250  # about half of the rows
    named = {m for text in worded.values() for m in tw.MOTIONS if f" {tw.MOTION_PHRASES[m]} on " in text}
    assert named == set(tw.MOTIONS)  # the held-out words (zigzag, figure eight, spiral) as well as the seen ones
    for k, text in worded.items():  # the row's own colour, shape and background, only the motion phrase drawn
        s = specs[k]
        assert text.startswith(f"a {s.colour} {s.shape} "), text
        assert text.endswith(f"on a {s.background} background")
    assert tb.image_captions(specs, 0.0, torch.Generator().manual_seed(0)) == {}
