import numpy as np
import pytest
import torch

from cav.toy.factory import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random tiny ModelScope-layout T2V model saved to disk and loaded by path, as real models are."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-t2v")


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory):
    """A 16×16 clip of 6 frames: a bright square moving right on a dark background, as an mp4 file."""
    from cav.data.video import write_video

    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    frames[..., 2] = 60
    for i in range(6):
        frames[i, 10:20, 2 + 3 * i:12 + 3 * i] = (230, 40, 40)
    path = tmp_path_factory.mktemp("videos") / "square.mp4"
    write_video(path, frames, fps=8)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
