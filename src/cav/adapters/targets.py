"""Which UNet modules each adapter adapts, as anchored regexes (peft ``re.fullmatch``es a string target).

Anchoring matters: ``temp_attentions`` contains ``attentions``, so spatial patterns require the block prefix
directly before ``attentions``.

One row per base family (see ``backbone.FAMILIES``) in ``TEMPORAL_BLOCKS`` and ``SPATIAL_BLOCKS``:
- ``unet3d`` (ModelScope, Zeroscope): temporal = ``transformer_in`` and every ``temp_attentions.*``;
- ``animatediff`` (``UNetMotionModel``): temporal = every motion module (``motion_modules.*`` of the down, mid and up
  blocks), whose attn1 and attn2 are both self-attention over frames; spatial = the image UNet's attentions;
- ``animatediff-sdxl``: the same module names on SDXL's UNetMotionModel (no motion mid block in the beta adapter;
  SDXL's deeper attentions carry several transformer blocks each, which the patterns already allow).

Placements (supp. A.3 and Table 1 of the seed):
- ``cav``: T-LoRA on temporal cross-frame attention attn1+attn2 (to_q/to_k/to_v/to_out.0); S-LoRA on spatial self-
  and cross-attention attn1+attn2.
- ``motiondirector``: temporal attention + the feed-forward after it; spatial self-attention + feed-forward.
"""

from __future__ import annotations

from ..errors import CavError

_BLOCK = r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)"
_PROJ = r"(?:to_q|to_k|to_v|to_out\.0)"
_FF = r"ff\.net\.(?:0\.proj|2)"
TEMPORAL_BLOCKS = {
    "unet3d": rf"(?:transformer_in|{_BLOCK}temp_attentions\.\d+)\.transformer_blocks\.\d+\.",
    "animatediff": rf"{_BLOCK}motion_modules\.\d+\.transformer_blocks\.\d+\.",
    "animatediff-sdxl": rf"{_BLOCK}motion_modules\.\d+\.transformer_blocks\.\d+\.",
}
SPATIAL_BLOCKS = {
    "unet3d": rf"{_BLOCK}attentions\.\d+\.transformer_blocks\.\d+\.",
    "animatediff": rf"{_BLOCK}attentions\.\d+\.transformer_blocks\.\d+\.",
    "animatediff-sdxl": rf"{_BLOCK}attentions\.\d+\.transformer_blocks\.\d+\.",
}
TEMPORAL_BLOCK = TEMPORAL_BLOCKS["unet3d"]
SPATIAL_BLOCK = SPATIAL_BLOCKS["unet3d"]

# What each placement adapts inside a temporal / spatial transformer block.
PLACEMENTS = {
    "cav": {
        "temporal": rf"(?:attn1|attn2)\.{_PROJ}",
        "spatial": rf"(?:attn1|attn2)\.{_PROJ}",
    },
    "motiondirector": {
        "temporal": rf"(?:(?:attn1|attn2)\.{_PROJ}|{_FF})",
        "spatial": rf"(?:attn1\.{_PROJ}|{_FF})",
    },
}
KINDS = ("temporal", "spatial")


def target_regex(kind: str, placement: str = "cav", family: str = "unet3d") -> str:
    if placement not in PLACEMENTS:
        raise CavError(f"unknown placement '{placement}': use one of {', '.join(PLACEMENTS)}")
    if kind not in KINDS:
        raise CavError(f"unknown adapter kind '{kind}': use temporal or spatial")
    if family not in TEMPORAL_BLOCKS:
        raise CavError(f"unknown base family '{family}': use one of {', '.join(TEMPORAL_BLOCKS)}")
    block = (TEMPORAL_BLOCKS if kind == "temporal" else SPATIAL_BLOCKS)[family]
    return block + PLACEMENTS[placement][kind]
