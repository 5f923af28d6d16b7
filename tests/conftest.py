import numpy as np
import pytest
import torch

from cav.families import UNET3D


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random tiny ModelScope-layout T2V model saved to disk and loaded by path, as real models are."""
    return UNET3D.tiny.make(tmp_path_factory.mktemp("models") / "tiny-t2v")


def _square_clip(path, square_rgb, background_channel, background_value, top):
    """A 32×32 clip of 6 frames: a 10-pixel square moving right 3 pixels a frame on a flat background, as mp4."""
    from cav.data.video import write_video

    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    frames[..., background_channel] = background_value
    for i in range(6):
        frames[i, top:top + 10, 2 + 3 * i:12 + 3 * i] = square_rgb
    return write_video(path, frames, fps=8)


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory):
    """A red square moving right on a navy background."""
    return _square_clip(tmp_path_factory.mktemp("videos") / "square.mp4", (230, 40, 40), 2, 60, top=10)


@pytest.fixture(scope="session")
def blue_video(tmp_path_factory):
    """A blue square moving right, lower down, on a dark red background: another appearance of the same motion."""
    return _square_clip(tmp_path_factory.mktemp("videos") / "blue.mp4", (40, 40, 230), 0, 90, top=12)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv)`` runs ``cav ARGV`` in-process → (exit code, stderr); argparse's own exits count too."""
    from cav.cli import main

    def run(argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err.strip()
    return run


def config_folder(root, pipeline: str, unet_class: str, **configs: str):
    """A diffusers folder with config files only (no weights), as dry runs read: ``configs`` maps a component to
    the name of a config file shipped in ``cav/assets`` (e.g. ``unet="modelscope_unet_config.json"``)."""
    import json
    import shutil

    from cav.api import ASSETS

    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / comp).mkdir(parents=True, exist_ok=True)
    for comp, asset in configs.items():
        shutil.copy(ASSETS / asset, root / comp / "config.json")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "unet": ["diffusers", unet_class]}))
    return root
