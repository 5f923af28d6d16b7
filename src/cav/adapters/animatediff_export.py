"""A T-LoRA of an AnimateDiff base in the original AnimateDiff MotionLoRA key layout, and back.

The original AnimateDiff code names a motion module's attention ``<block>.motion_modules.<j>.temporal_transformer.
transformer_blocks.<k>.attention_blocks.<0|1>`` (diffusers: ``...motion_modules.<j>.transformer_blocks.<k>.attn1|2``)
and stores a MotionLoRA as ``...attention_blocks.<i>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``.
Its loader adds ``alpha · up @ down`` to each projection, with no rank scaling, so the peft scale ``lora_alpha / r``
is folded into ``up`` here (and divided out again when converting back).
"""

from __future__ import annotations

import re

import torch

from ..errors import CavError

_PEFT_KEY = re.compile(
    r"(?P<module>(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+)\.transformer_blocks\.(?P<block>\d+)"
    r"\.attn(?P<attn>[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.lora_(?P<ab>[AB])\.weight")
_ORIGINAL_KEY = re.compile(
    r"(?P<module>(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+)\.temporal_transformer"
    r"\.transformer_blocks\.(?P<block>\d+)\.attention_blocks\.(?P<attn>[01])\.processor"
    r"\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight")


def to_animatediff(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """peft T-LoRA state (``...attn1.to_q.lora_A.weight``) → original MotionLoRA state, scale folded into ``up``."""
    scale = float(alpha) / int(rank)
    out = {}
    for key, tensor in state.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise CavError(f"tensor {key} is not a motion-module attention projection: only a T-LoRA with the cav "
                           "placement on an AnimateDiff base exports to the AnimateDiff MotionLoRA layout")
        proj = "to_out" if m["proj"] == "to_out.0" else m["proj"]
        name = (f"{m['module']}.temporal_transformer.transformer_blocks.{m['block']}.attention_blocks."
                f"{int(m['attn']) - 1}.processor.{proj}_lora.{'down' if m['ab'] == 'A' else 'up'}.weight")
        out[name] = (tensor.float() * scale if m["ab"] == "B" else tensor.float()).contiguous()
    return out


def from_animatediff(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Original MotionLoRA state → peft T-LoRA state (``up`` divided by the scale ``alpha / rank`` again)."""
    scale = float(alpha) / int(rank)
    out = {}
    for key, tensor in state.items():
        m = _ORIGINAL_KEY.fullmatch(key)
        if m is None:
            raise CavError(f"tensor {key} is not in the AnimateDiff MotionLoRA layout: pass a MotionLoRA file")
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        name = (f"{m['module']}.transformer_blocks.{m['block']}.attn{int(m['attn']) + 1}.{proj}."
                f"lora_{'A' if m['ud'] == 'down' else 'B'}.weight")
        out[name] = tensor.float() / scale if m["ud"] == "up" else tensor.float()
    return out


def diffusers_module(original_key: str) -> str:
    """The diffusers ``UNetMotionModel`` module a MotionLoRA key adapts (e.g. ``...attn1.to_out.0``)."""
    m = _ORIGINAL_KEY.fullmatch(original_key)
    if m is None:
        raise CavError(f"tensor {original_key} is not in the AnimateDiff MotionLoRA layout: pass a MotionLoRA file")
    proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
    return f"{m['module']}.transformer_blocks.{m['block']}.attn{int(m['attn']) + 1}.{proj}"
