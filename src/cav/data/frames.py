"""Frame-level augmentations for the appearance absorbers: unordered frames and random patch crops.

Customize-A-Video trains its appearance absorbers on the reference frames as a set of unordered images,
each randomly cropped to a patch and resized back, so they learn appearance rather than motion or layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cav.errors import CavError


def random_patch_crop(
    frames: torch.Tensor, generator: torch.Generator, ratio: tuple[float, float] = (0.33, 0.67)
) -> torch.Tensor:
    """Crop each of ``frames`` (float ``(N, C, H, W)``, images or latents) to a random patch, resized back.

    Per frame, independently: a side ratio ``r ~ U[ratio[0], ratio[1]]``, a ``round(r*H) x round(r*W)`` window at a
    uniformly random position, resized to ``(H, W)`` with bilinear interpolation. All randomness comes from
    ``generator``, so the same seed gives the same crops. Returns a new ``(N, C, H, W)`` tensor.
    """
    lo, hi = ratio
    if not 0 < lo <= hi <= 1:
        raise CavError(f"patch crop ratio {tuple(ratio)} is invalid: use 0 < low <= high <= 1, e.g. (0.33, 0.67)")
    if frames.ndim != 4:
        raise ValueError(f"expected frames (N, C, H, W), got shape {tuple(frames.shape)}")
    n, _, h, w = frames.shape
    ratios = (lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)).tolist()
    out = torch.empty_like(frames)
    for i, r in enumerate(ratios):
        ch, cw = min(max(round(r * h), 1), h), min(max(round(r * w), 1), w)
        top = int(torch.randint(h - ch + 1, (1,), generator=generator, device=generator.device))
        left = int(torch.randint(w - cw + 1, (1,), generator=generator, device=generator.device))
        patch = frames[i : i + 1, :, top : top + ch, left : left + cw]
        if (ch, cw) != (h, w):
            patch = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        out[i] = patch[0]
    return out


def shuffle_frames(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(n)`` drawn from ``generator`` (on its device): frames as an unordered set."""
    return torch.randperm(n, generator=generator, device=generator.device)
