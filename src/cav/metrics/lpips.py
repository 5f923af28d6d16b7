"""LPIPS perceptual distance (AlexNet variant, v0.1), in plain torch: no torchvision needed.

Network: LPIPS scaling layer -> AlexNet ``features`` conv stack, tapped after each of its 5 ReLUs -> per tap,
unit-normalise over channels, squared difference, 1x1 conv with non-negative weights (clamped) and no bias, spatial mean
-> sum over taps. 0 = identical frames.

Weights come from ONE safetensors file with these keys (float tensors):

* ``features.0.weight`` (64, 3, 11, 11), ``features.0.bias`` (64,)    conv 11x11 stride 4 pad 2
* ``features.3.weight`` (192, 64, 5, 5), ``features.3.bias`` (192,)   conv 5x5 pad 2
* ``features.6.weight`` (384, 192, 3, 3), ``features.6.bias`` (384,)  conv 3x3 pad 1
* ``features.8.weight`` (256, 384, 3, 3), ``features.8.bias`` (256,)  conv 3x3 pad 1
* ``features.10.weight`` (256, 256, 3, 3), ``features.10.bias`` (256,) conv 3x3 pad 1
* ``lin0.weight`` (1, 64, 1, 1) ... ``lin4.weight`` (1, 256, 1, 1)   the LPIPS linear layers

The ``features.*`` keys are torchvision's AlexNet names. To build the file from the published weights (torchvision's
``alexnet-owt-7be5be79.pth`` and LPIPS v0.1 ``weights/v0.1/alex.pth``; steps in docs/METRICS.md)::

    python -m cav.metrics.lpips alexnet-owt-7be5be79.pth alex.pth   # writes ~/.cache/cav/lpips_alex.safetensors
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cav.errors import CavError
from cav.metrics import Undefined

CONVS = (0, 3, 6, 8, 10)  # indices of the conv layers in AlexNet's ``features``
CHANNELS = (64, 192, 384, 256, 256)
KERNELS = (11, 5, 3, 3, 3)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 64  # smaller frames are upsampled (bilinear) to this short side: AlexNet needs about 32 px or more
_BATCH = 16  # frame pairs per forward pass
_EPS = 1e-10
STILL_TOL = 2  # largest change (0-255) between consecutive frames of a still (codec noise)
WEIGHTS_DOC = "docs/METRICS.md#lpips"  # how to build the weights file


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """Key name -> shape of every tensor a LPIPS weights file must hold."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c_in, c_out, k in zip(CONVS, (3,) + CHANNELS, CHANNELS, KERNELS):
        shapes |= {f"features.{i}.weight": (c_out, c_in, k, k), f"features.{i}.bias": (c_out,)}
    return shapes | {f"lin{k}.weight": (1, c, 1, 1) for k, c in enumerate(CHANNELS)}


def convert_lpips_weights(
    alexnet_state_dict: Mapping[str, torch.Tensor], lpips_lin_state_dict: Mapping[str, torch.Tensor], out_path
) -> Path:
    """Write our weights file from torchvision AlexNet (``features.{0,3,6,8,10}.*``) + LPIPS ``lin{k}.model.1.weight``.

    Other keys (AlexNet's classifier) are ignored. Returns ``out_path``.
    """
    try:
        tensors = {k: alexnet_state_dict[k] for k in weight_shapes() if k.startswith("features.")}
        tensors |= {f"lin{k}.weight": lpips_lin_state_dict[f"lin{k}.model.1.weight"] for k in range(5)}
    except KeyError as e:
        raise CavError(
            f"weights lack key {e}: pass torchvision's AlexNet state dict and LPIPS v0.1 'alex.pth' state dict"
        ) from None
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out_path))
    return out_path


class LPIPS:
    """LPIPS (AlexNet) from a local safetensors file (see the module docstring for its keys)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise CavError(f"LPIPS weights not found at '{path}': pass --lpips PATH to a lpips_alex.safetensors "
                           f"file (how to build it from the published weights: {WEIGHTS_DOC})")
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            why = " ".join(str(e).split())
            raise CavError(f"cannot read LPIPS weights '{path}' ({why}): pass a valid safetensors file") from e
        for key, shape in weight_shapes().items():
            if key not in state or tuple(state[key].shape) != shape:
                got = "is missing" if key not in state else f"has shape {tuple(state[key].shape)}, not {shape}"
                raise CavError(f"LPIPS weights '{path}': {key} {got}: build the file with convert_lpips_weights")
        self.device = torch.device(device)
        self.w = {k: state[k].float().to(self.device) for k in weight_shapes()}
        self.w |= {f"lin{k}.weight": self.w[f"lin{k}.weight"].clamp_min(0) for k in range(5)}
        self.shift = torch.tensor(SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(SCALE, device=self.device).view(1, 3, 1, 1)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised activations after AlexNet's 5 ReLUs for ``x`` (N, 3, H, W) in [-1, 1]."""
        x = (x - self.shift) / self.scale
        taps = []
        for k, i in enumerate(CONVS):
            if k in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            stride, pad = (4, 2) if i == 0 else (1, 2) if i == 3 else (1, 1)
            x = F.relu(F.conv2d(x, self.w[f"features.{i}.weight"], self.w[f"features.{i}.bias"], stride, pad))
            taps.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + _EPS))
        return taps

    @torch.no_grad()
    def frame_distances(self, frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
        """(F,) LPIPS between paired uint8 frames (F, H, W, 3) of equal shape."""
        a, b = np.asarray(frames_a), np.asarray(frames_b)
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise CavError(f"frames have shapes {a.shape} and {b.shape}: pass two (F, H, W, 3) arrays of equal shape")
        out = []
        for s in range(0, len(a), _BATCH):
            x = torch.cat([self._tensor(a[s : s + _BATCH]), self._tensor(b[s : s + _BATCH])])
            n = len(x) // 2
            d = sum(
                F.conv2d((t[:n] - t[n:]).pow(2), self.w[f"lin{k}.weight"]).mean((1, 2, 3))
                for k, t in enumerate(self._taps(x))
            )
            out.append(d.cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def _tensor(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        side = min(x.shape[-2:])
        if side < MIN_SIDE:
            x = F.interpolate(x, scale_factor=MIN_SIDE / side, mode="bilinear", align_corners=False)
        return x

    def distance(self, video_a: np.ndarray, video_b: np.ndarray) -> float:
        """Mean LPIPS over paired frames (``video_b`` is resampled to ``video_a``'s frame count and size if needed)."""
        a, b = match(video_a, video_b)
        return float(self.frame_distances(a, b).mean())

    def temporal_consistency(self, video: np.ndarray) -> float:
        """Mean LPIPS between consecutive frames (lower = smoother); ``Undefined`` for one frame or a still video,
        whose 0 would read as perfect consistency."""
        v = np.asarray(video)
        if len(v) < 2:
            raise Undefined(f"the video has {len(v)} frame: temporal consistency needs at least 2 frames")
        if np.abs(np.diff(v.astype(np.int16), axis=0)).max() <= STILL_TOL:
            raise Undefined(f"all {len(v)} frames are the same image: a still has no temporal change to measure")
        return float(self.frame_distances(v[:-1], v[1:]).mean())

    def diversity(self, videos: Sequence[np.ndarray]) -> float:
        """Mean LPIPS distance over all pairs of videos (higher = more diverse)."""
        if len(videos) < 2:
            raise CavError(f"got {len(videos)} video: diversity needs at least 2 videos")
        return float(np.mean([self.distance(a, b) for a, b in combinations(videos, 2)]))


def match(video_a: np.ndarray, video_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``video_b`` resampled to ``video_a``'s frame count (uniform indices) and size (area/bilinear), if needed."""
    a, b = np.asarray(video_a), np.asarray(video_b)
    if len(b) != len(a):
        b = b[np.linspace(0, len(b) - 1, len(a)).round().astype(int)]
    if b.shape[1:3] != a.shape[1:3]:
        h, w = a.shape[1:3]
        interp = cv2.INTER_AREA if b.shape[1] * b.shape[2] > h * w else cv2.INTER_LINEAR
        b = np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in b])
    return a, b


def main(argv: list[str] | None = None) -> int:
    """``python -m cav.metrics.lpips ALEXNET.pth LPIPS_ALEX.pth [OUT]``: build the weights file from the published ones."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m cav.metrics.lpips", description=main.__doc__)
    p.add_argument("alexnet", help="torchvision's alexnet-owt-7be5be79.pth")
    p.add_argument("lpips", help="LPIPS v0.1 weights/v0.1/alex.pth (in the lpips wheel)")
    p.add_argument("out", nargs="?", default="~/.cache/cav/lpips_alex.safetensors", help="weights file to write")
    args = p.parse_args(argv)
    try:
        # weights_only: plain tensors, nothing else is unpickled; the published LPIPS file was saved on a GPU
        states = [torch.load(f, map_location="cpu", weights_only=True) for f in (args.alexnet, args.lpips)]
        print(f"wrote {convert_lpips_weights(*states, args.out)}")
    except (OSError, RuntimeError) as e:
        print(f"cav: error: cannot read the weights ({' '.join(str(e).split())[:200]}): pass the two .pth files", file=sys.stderr)
        return 2
    except CavError as e:
        print(f"cav: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
