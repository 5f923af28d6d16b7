import numpy as np
import pytest
import torch

from cav.families import UNET3D


def run_outputs(run):
    """Every adapter file and validation sample of a run folder (checkpoints and published), by relative path."""
    from safetensors.torch import load_file

    files = {str(p.relative_to(run)): load_file(str(p)) for p in sorted(run.rglob("*.safetensors"))}
    samples = {str(p.relative_to(run)): np.load(p, allow_pickle=False) for p in sorted(run.rglob("sample-*.npy"))}
    return files, samples


def assert_same_outputs(a, b):
    """Two runs' ``run_outputs`` are equal bit for bit: the same files, keys, tensors and samples."""
    (fa, sa), (fb, sb) = a, b
    assert fa.keys() == fb.keys() and sa.keys() == sb.keys()
    for name in fa:
        assert fa[name].keys() == fb[name].keys(), name
        for key in fa[name]:
            assert torch.equal(fa[name][key], fb[name][key]), (name, key)
    for name in sa:
        assert np.array_equal(sa[name], sb[name]), name


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
