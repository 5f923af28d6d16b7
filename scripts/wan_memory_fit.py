"""Fit the activation model of ``cav.wan.memory`` on measured forward + backward passes of small Wans (CPU), and
check it on a larger Wan it was not fitted on.

Each case builds a random ``WanTransformer3DModel`` in bf16 (fp32 where diffusers keeps it) with cav's motion LoRA
(fp32, trainable) and measures the
bytes autograd saves in one step under bf16 autocast (``memory.measure_activations``). The blocks' part is fitted as
blocks · (tokens · (A·width + B·ffn_dim) + C·text_len·width), the rest as D·tokens·width (least squares).

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/wan_memory_fit.py``; paste the printed fit into
``memory.ACTIVATION_FIT``.
"""

from __future__ import annotations

import itertools
import json

import torch

from cav.adapters.lora import activate
from cav.wan import memory, targets


def build(heads, head_dim, layers, ffn, text_dim=32, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=text_dim, freq_dim=32, ffn_dim=ffn,
                                  num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=64)
    memory.to_compute_dtype(model, torch.bfloat16)  # as from_pretrained(torch_dtype=bf16): norms etc. stay fp32
    targets.add_motion_lora(model, "t_lora")
    activate(model, ["t_lora"], trainable="t_lora")
    return model


def case(heads, head_dim, layers, ffn, frames, side, text_len, peak=False):
    model = build(heads, head_dim, layers, ffn)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, frames, side, side, generator=g, dtype=torch.bfloat16)
    context = torch.randn(1, text_len, 32, generator=g, dtype=torch.bfloat16)
    got = memory.measure_activations(model, latents, torch.tensor([500.0]), context)
    if peak:  # the whole step's allocation peak, without and with checkpointing
        got["peak"] = memory.measure_peak(model, latents, torch.tensor([500.0]), context)
        got["peak_ckpt"] = memory.measure_peak(model, latents, torch.tensor([500.0]), context, checkpointing=True)
    cfg = dict(model.config)
    return {"cfg": cfg, "tokens": frames * side * side // 4, "text_len": text_len, **got}


def fit(rows):
    w = [r["cfg"]["num_attention_heads"] * r["cfg"]["attention_head_dim"] for r in rows]
    blocks = torch.tensor([[r["tokens"] * wi, r["tokens"] * r["cfg"]["ffn_dim"], r["text_len"] * wi]
                           for r, wi in zip(rows, w)], dtype=torch.float64)
    per_block = torch.tensor([r["blocks"] / r["cfg"]["num_layers"] for r in rows], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(blocks, per_block[:, None]).solution[:, 0].tolist()
    outside = torch.tensor([[r["tokens"] * wi] for r, wi in zip(rows, w)], dtype=torch.float64)
    d = torch.linalg.lstsq(outside, torch.tensor([[r["outside"]] for r in rows], dtype=torch.float64)).solution.item()
    return {"A": round(a, 3), "B": round(b, 3), "C": round(c, 3), "D": round(d, 3)}


def predicted(row, f):
    return memory.activation_bytes(row["cfg"], row["tokens"], row["text_len"], fit=f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    calibration = [case(h, 12, 2, ffn_mult * h * 12, frames, side, text_len)
                   for h, ffn_mult, (frames, side), text_len in itertools.product(
                       (2, 4), (2, 6), ((3, 8), (5, 16)), (8, 32))]
    f = fit(calibration)
    worst = max(abs(predicted(r, f) / r["total"] - 1) for r in calibration)
    print("fit", json.dumps(f), f"worst calibration error {worst:.1%}")
    held_out = [(4, 32, 4, 512, 5, 24, 64), (8, 32, 3, 1024, 9, 16, 48)]
    for heads, head_dim, layers, ffn, frames, side, text_len in held_out:
        r = case(heads, head_dim, layers, ffn, frames, side, text_len, peak=True)
        p = predicted(r, f)
        ck = memory.activation_bytes(r["cfg"], r["tokens"], text_len, checkpointing=True, fit=f)
        print(f"held out: width {heads * head_dim}, ffn {ffn}, {layers} blocks, {r['tokens']} tokens, text {text_len}: "
              f"saved {r['total']:,} B, model {p:,.0f} B ({p / r['total'] - 1:+.1%}); whole-step peak "
              f"{r['peak']:,} B = model {r['peak'] / p:.2f}x; checkpointed peak {r['peak_ckpt']:,} B = "
              f"model {r['peak_ckpt'] / ck:.2f}x")
