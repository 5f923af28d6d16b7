import itertools

import numpy as np
import pytest

from cav.data import toyworld as tw
from cav.errors import CavError
from cav.metrics import toy as mt


def test_constants():
    assert len(tw.SHAPES) >= 4 and len(tw.COLOURS) >= 6 and len(tw.BACKGROUNDS) >= 4
    assert len(tw.SEEN_MOTIONS) >= 8 and len(tw.HELDOUT_MOTIONS) >= 3
    assert not set(tw.SEEN_MOTIONS) & set(tw.HELDOUT_MOTIONS)
    assert set(tw.MOTION_PHRASES) == set(tw.MOTIONS)
    names = tw.SHAPES + tw.COLOURS + tw.BACKGROUNDS + tw.MOTIONS
    assert all(n.isalnum() and n == n.lower() for n in names)
    rgb = {k: np.array(v, float) for k, v in tw.RGB.items()}
    assert min(np.linalg.norm(rgb[c] - rgb[b]) for c in tw.COLOURS for b in tw.BACKGROUNDS) > 120
    assert min(np.linalg.norm(rgb[c] - rgb[d]) for c, d in itertools.combinations(tw.COLOURS, 2)) > 120
    assert min(np.linalg.norm(rgb[c] - rgb[d]) for c, d in itertools.combinations(tw.BACKGROUNDS, 2)) > 90


@pytest.mark.parametrize("field", ["shape", "colour", "background", "motion"])
def test_unknown_names_raise(field):
    kw = dict(shape="circle", colour="red", background="black", motion="left")
    kw[field] = "nope"
    with pytest.raises(CavError, match="unknown"):
        tw.ToySpec(**kw)


def test_bad_scale_phase_and_motion_raise():
    with pytest.raises(CavError):
        tw.ToySpec("circle", "red", "black", "left", scale=0.9)
    with pytest.raises(CavError):
        tw.ToySpec("circle", "red", "black", "left", phase=1.0)
    with pytest.raises(CavError):
        tw.trajectory("sideways", 8)
    with pytest.raises(CavError):
        tw.sample_specs(np.random.default_rng(0), 3, motions=("left", "nope"))


@pytest.mark.parametrize("motion", tw.MOTIONS)
def test_trajectory_inside_and_moves(motion):
    for phase in (0.0, 0.37, 0.81):
        tr = tw.trajectory(motion, 8, phase)
        assert tr.shape == (8, 3)
        assert (tr[:, :2] > 0.15).all() and (tr[:, :2] < 0.85).all()
        extent = np.linalg.norm(tr[:, None, :2] - tr[None, :, :2], axis=-1).max()  # farthest two positions
        growth = tr[:, 2].max() / tr[:, 2].min()
        assert extent >= 0.35 or growth >= 2.0


def test_phase_only_shifts_position():
    for m in tw.MOTIONS:
        a, b = tw.trajectory(m, 8, 0.0), tw.trajectory(m, 8, 0.6)
        np.testing.assert_allclose(a - a[0], b - b[0], atol=1e-12)


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_render_truth_is_exact(shape):
    for motion in tw.MOTIONS:
        for scale, phase in ((0.28, 0.5), (tw.MAX_SCALE, 0.0), (tw.MAX_SCALE, 0.25), (tw.MAX_SCALE, 0.75)):
            spec = tw.ToySpec(shape, "cyan", "navy", motion, scale, phase)
            video, truth = tw.render(spec, frames=8, size=32)
            assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
            m = truth["mask"]
            assert m.shape == (8, 32, 32) and m.dtype == bool and m.sum(axis=(1, 2)).min() > 10
            # object stays strictly inside the frame
            assert not (m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any() or m[:, :, -1].any())
            assert (video[m] == tw.RGB["cyan"]).all() and (video[~m] == tw.RGB["navy"]).all()
            # the measured track equals the truth centroid, which follows the trajectory
            np.testing.assert_allclose(mt.track(video), truth["centroid"], atol=0.5)
            traj = tw.trajectory(motion, 8, phase)
            np.testing.assert_allclose(truth["centroid"], traj[:, :2] * 32, atol=0.75)
            np.testing.assert_allclose(truth["scale"], traj[:, 2] * scale)
            assert truth["spec"] == spec
    v1, _ = tw.render(spec)
    v2, _ = tw.render(spec)
    assert np.array_equal(v1, v2)


def test_caption():
    spec = tw.ToySpec("circle", "red", "blue" if "blue" in tw.BACKGROUNDS else "navy", "zigzag")
    full, appearance = tw.caption(spec)
    assert full == f"a red circle moving in a zigzag on a {spec.background} background"
    assert appearance == f"a red circle on a {spec.background} background"
    for s in tw.sample_specs(np.random.default_rng(0), 50, tw.MOTIONS):
        full, appearance = tw.caption(s)
        for word in (s.shape, s.colour, s.background):
            assert word in full.split() and word in appearance.split()
        assert tw.MOTION_PHRASES[s.motion] in full and tw.MOTION_PHRASES[s.motion] not in appearance


def test_sample_specs_and_new_appearances():
    rng = np.random.default_rng(3)
    specs = tw.sample_specs(rng, 200)
    assert {s.motion for s in specs} <= set(tw.SEEN_MOTIONS)
    assert all(tw.SCALE_RANGE[0] <= s.scale <= tw.SCALE_RANGE[1] and 0 <= s.phase < 1 for s in specs)
    held = tw.sample_specs(rng, 30, tw.HELDOUT_MOTIONS)
    assert {s.motion for s in held} <= set(tw.HELDOUT_MOTIONS)
    spec = specs[0]
    new = tw.new_appearances(spec, 10, rng)
    assert len(new) == 10 and len(set(new)) == 10
    for s in new:
        assert s.motion == spec.motion and s.shape != spec.shape
        assert s.colour != spec.colour and s.background != spec.background


def test_dataset():
    v, caps, specs = tw.dataset(40, 8, 32, seed=7)
    assert v.shape == (40, 8, 32, 32, 3) and v.dtype == np.uint8
    assert len(caps) == len(specs) == 40 and caps[5] == tw.caption(specs[5])[0]
    assert np.array_equal(v[5], tw.render(specs[5])[0])
    v2, caps2, specs2 = tw.dataset(40, 8, 32, seed=7)
    assert np.array_equal(v, v2) and caps == caps2 and specs == specs2
    v3, _, _ = tw.dataset(40, 8, 32, seed=8)
    assert not np.array_equal(v, v3)
    vh, _, sh = tw.dataset(10, 4, 16, seed=0, motions=tw.HELDOUT_MOTIONS)
    assert vh.shape == (10, 4, 16, 16, 3) and {s.motion for s in sh} <= set(tw.HELDOUT_MOTIONS)
