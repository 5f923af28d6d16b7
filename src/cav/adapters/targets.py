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
- ``motiondirector+tconv``: ``motiondirector`` plus the T-LoRA on the temporal convolutions (``TEMPORAL_CONVS``).
  diffusers' unet3d temporal transformers have no positional embedding, so attention over frames is order-blind;
  the (3, 1, 1) convolutions are the only temporal layers that see which frame is next to which (issue 12's
  hypothesis; measured in docs/DEMO-TUNING.md).
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
# Temporal layers outside the transformer blocks: unet3d's ``TemporalConvLayer`` (``temp_convs.*``: four
# GroupNorm-SiLU-[Dropout]-Conv3d stacks, kernel (3, 1, 1); only the Conv3d is a LoRA target). AnimateDiff's motion
# modules (SD 1.5 and SDXL) are its only temporal layers, so it has none (None: a placement that needs them is
# refused there).
TEMPORAL_CONVS = {
    "unet3d": rf"{_BLOCK}temp_convs\.\d+\.(?:conv1\.2|conv[234]\.3)",
    "animatediff": None,
    "animatediff-sdxl": None,
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
    "motiondirector+tconv": {
        "temporal": rf"(?:(?:attn1|attn2)\.{_PROJ}|{_FF})",
        "spatial": rf"(?:attn1\.{_PROJ}|{_FF})",
        "temporal_convs": True,
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
    regex = block + PLACEMENTS[placement][kind]
    if kind == "spatial" or not PLACEMENTS[placement].get("temporal_convs"):
        return regex
    if TEMPORAL_CONVS[family] is None:
        raise CavError(f"placement '{placement}' adapts temporal convolutions, which a {family} base does not have: "
                       "use placement cav or motiondirector")
    return rf"(?:{regex}|{TEMPORAL_CONVS[family]})"
