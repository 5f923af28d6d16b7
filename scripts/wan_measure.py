"""The numbers behind cav.wan's claims, on tiny random Wans (CPU, seconds): image-mode exactness, flow-inversion
reconstruction error by step count, shipped-config parameter counts.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/wan_measure.py

Prints one JSON object.
"""

import json

import torch

from cav.wan.flow import FlowObjective, invert, sample
from cav.wan.image_mode import frame_local, image_mode_forward
from cav.wan.published import names, parameter_count, published
from cav.wan.tiny import TinyWanSpec, build_transformer


@torch.no_grad()
def image_mode(spec, dtype, frames, size):
    wan = build_transformer(spec).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, spec.z_dim, frames, size, size, generator=g, dtype=dtype)
    ctx = torch.randn(2, 8, spec.text_dim, generator=g, dtype=dtype)
    ts = torch.tensor([700, 300])
    folded = image_mode_forward(wan, x, ts, ctx)
    per_frame = torch.cat([image_mode_forward(wan, x[:, :, f:f + 1], ts, ctx) for f in range(frames)], dim=2)
    loop = torch.stack([torch.cat([wan(x[b:b + 1, :, f:f + 1], ts[b:b + 1], ctx[b:b + 1], return_dict=False)[0]
                                   for f in range(frames)], 2)[0] for b in range(2)])
    with frame_local(wan, frames, size, size):
        masked = wan(x, ts, ctx, return_dict=False)[0]
    full = wan(x, ts, ctx, return_dict=False)[0]
    return {"vs_one_frame_at_a_time": (folded - loop).abs().max().item(),
            "vs_frames_folded_one_by_one": (folded - per_frame).abs().max().item(),
            "vs_frame_local_mask": (folded - masked).abs().max().item(),
            "vs_full_attention (not equal, for scale)": (folded - full).abs().max().item()}


@torch.no_grad()
def inversion(spec, dtype, steps):
    wan = build_transformer(spec).eval().to(dtype)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, spec.z_dim, 3, 4, 4, generator=g, dtype=dtype)
    ctx = torch.randn(1, 8, spec.text_dim, generator=g, dtype=dtype)
    velocity = lambda x, t: wan(x, t, ctx, return_dict=False)[0]  # noqa: E731
    grid = FlowObjective(shift=3.0).sigma_grid(steps)
    rec = sample(velocity, invert(velocity, x0, grid), grid)
    return {"relative_l2": ((rec - x0).norm() / x0.norm()).item(), "max_abs": (rec - x0).abs().max().item()}


def main():
    big = TinyWanSpec(heads=4, head_dim=24, layers=4, ffn_dim=64)
    out = {
        "image_mode": {
            "tiny fp32, 3 frames 4x4": image_mode(TinyWanSpec(), torch.float32, 3, 4),
            "tiny fp64, 3 frames 4x4": image_mode(TinyWanSpec(), torch.float64, 3, 4),
            "4 layers 4x24 heads fp32, 5 frames 8x8": image_mode(big, torch.float32, 5, 8),
        },
        "flow_inversion_fp32 (x0 ~ N(0,1), shift 3, Euler)": {
            str(n): inversion(TinyWanSpec(), torch.float32, n) for n in (10, 25, 50, 100)},
        "parameters": {n: {"built_on_meta": parameter_count(n), "published": published(n)["published_parameters"],
                           "source": published(n)["published_parameters_source"]} for n in names()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
