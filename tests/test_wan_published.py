"""The shipped Wan configs match the published parameter counts; shape rules are one-line errors naming the fix."""

import pytest

from cav.errors import CavError
from cav.wan.published import (build_on_meta, check_frames, check_shape, check_size, names, parameter_count,
                               published)


def test_every_published_base_is_shipped():
    assert names() == ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"]


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"])
def test_config_matches_published_parameter_count(name):
    row = published(name)
    count = parameter_count(name)
    assert abs(count - row["published_parameters"]) / row["published_parameters"] < 0.01, (name, count)
    model = build_on_meta(name)
    assert next(model.parameters()).is_meta
    assert model.config.num_layers == len(model.blocks)
    assert row["experts"] == (2 if row["boundary_ratio"] else 1)


def test_frame_rule():
    for ok in (1, 5, 17, 81):
        check_frames(ok)
    with pytest.raises(CavError, match=r"^--frames 16 does not fit Wan's VAE, which takes 4k\+1 frames: "
                                       r"pass --frames 13 or 17$"):
        check_frames(16)
    with pytest.raises(CavError, match="pass --frames 1 or 5"):
        check_frames(0)


def test_size_rule():
    check_size(480, 832, 16)
    with pytest.raises(CavError, match=r"^--height 500 is not a multiple of 16 \(Wan's patch × VAE factor\): "
                                       r"pass --height 496$"):
        check_size(500, 832, 16)
    with pytest.raises(CavError, match="pass --height 32 and --width 704"):
        check_size(8, 720, 32)


def test_check_shape_uses_each_base_factors():
    check_shape("wan2.1-t2v-1.3b", 81, 480, 832)
    with pytest.raises(CavError, match="multiple of 32"):  # TI2V-5B: patch 2 × VAE 16
        check_shape("wan2.2-ti2v-5b", 121, 720, 1280 + 16)
    check_shape("wan2.2-ti2v-5b", 121, 704, 1280)
    with pytest.raises(CavError, match="unknown Wan base 'wan3'"):
        published("wan3")
