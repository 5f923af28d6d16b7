"""The ablation's issue-12 rows (cav/bench/rows.py): settings are checked before any work; extra clips never show a
prompt's appearance."""

import numpy as np
import pytest

from cav.bench import rows
from cav.bench.ablation import load_settings
from cav.data import toyworld as tw
from cav.config import load_recipe
from cav.errors import CavError


def test_motion_recipe_loads_with_its_rows_and_comparisons():
    s = load_settings("ablation/motion")
    keys = [r["key"] for r in s["rows"]]
    assert {"both-aa", "md-r4", "both-aa-3clips", "np-0.2", "np-0.5", "inversion", "selected", "image-0.6",
            "best"} <= set(keys)
    best = {**s["overrides"], **next(r for r in s["rows"] if r["key"] == "best")}  # the row is the shipped toy-best
    shipped = load_recipe("toy-best")
    for key, value in shipped.items():
        if key not in ("checkpoint_every", "sample_steps"):  # the ablation's checkpoints and sampler are its own
            assert best.get(key, s["recipe"].get(key)) == value, key
    assert s["compare"] == ["base", "both-aa", "md-r4"]
    assert s["overrides"]["checkpoint_every"] > 0  # the selection row needs checkpoints with samples


@pytest.mark.parametrize("bad, words", [
    ([{"name": "a", "key": "a", "reuse": "b"}], "not an earlier trained row"),
    ([{"name": "b", "key": "b", "train": False}, {"name": "a", "key": "a", "reuse": "b"}], "not an earlier trained"),
    ([{"name": "a", "key": "a", "noise_prior": 2}], "noise_prior"),
    ([{"name": "a", "key": "a", "image_strength": 0}], "image_strength"),
    ([{"name": "a", "key": "a", "clips": 0}], "clips"),
])
def test_bad_rows_are_refused(bad, words):
    with pytest.raises(CavError, match=words):
        rows.check(bad, "x.yaml")


def test_extra_clips_differ_from_the_reference_and_every_prompt():
    ref = tw.ToySpec("circle", "red", "navy", "zigzag", scale=0.3)
    targets = tw.new_appearances(ref, 4, np.random.default_rng(0))
    extra = rows.extra_clips(ref, targets, 2, seed=0)
    looks = {(s.shape, s.colour) for s in extra}
    assert len(extra) == 2 and len(looks) == 2 and all(s.motion == ref.motion for s in extra)
    assert not looks & ({(t.shape, t.colour) for t in targets} | {(ref.shape, ref.colour)})
