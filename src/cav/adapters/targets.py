"""Which modules each adapter adapts, as anchored regexes (peft ``re.fullmatch``es a string target).

Anchoring matters: ``temp_attentions`` contains ``attentions``, so spatial patterns require the block prefix
directly before ``attentions``.

This module holds the mechanism: a ``UNetTargets`` (where a UNet family's temporal and spatial transformer blocks
and temporal convolutions are) composed with a placement (what is adapted inside those blocks). Each family's
``UNetTargets`` is a field of its row in ``families.FAMILIES``:
- ``unet3d`` (ModelScope, Zeroscope): temporal = ``transformer_in`` and every ``temp_attentions.*``;
- ``animatediff`` (``UNetMotionModel``): temporal = every motion module (``motion_modules.*`` of the down, mid and up
  blocks), whose attn1 and attn2 are both self-attention over frames; spatial = the image UNet's attentions;
- ``animatediff-sdxl``: the same module names on SDXL's UNetMotionModel (no motion mid block in the beta adapter;
  SDXL's deeper attentions carry several transformer blocks each, which the patterns already allow).

Placements (supp. A.3 and Table 1 of the seed):
- ``cav``: T-LoRA on temporal cross-frame attention attn1+attn2 (to_q/to_k/to_v/to_out.0); S-LoRA on spatial self-
  and cross-attention attn1+attn2.
- ``motiondirector``: temporal attention + the feed-forward after it; spatial self-attention + feed-forward.
- ``motiondirector+tconv``: ``motiondirector`` plus the T-LoRA on the temporal convolutions (``temporal_convs``).
  diffusers' unet3d temporal transformers have no positional embedding, so attention over frames is order-blind;
  the (3, 1, 1) convolutions are the only temporal layers that see which frame is next to which (issue 12's
  hypothesis; measured in docs/DEMO-TUNING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CavError

BLOCK = r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)"
_PROJ = r"(?:to_q|to_k|to_v|to_out\.0)"
_FF = r"ff\.net\.(?:0\.proj|2)"

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


@dataclass(frozen=True)
class UNetTargets:
    """Where a UNet family's adapters go: the prefix of its temporal and spatial transformer blocks, and its temporal
    convolutions' pattern (None: the family has none, and a placement that needs them is refused)."""

    temporal_block: str
    spatial_block: str
    temporal_convs: str | None = None

    def regex(self, kind: str, placement: str, family: str) -> str:
        """The target regex of adapter ``kind`` under ``placement`` (checked by ``target_regex``)."""
        block = self.temporal_block if kind == "temporal" else self.spatial_block
        regex = block + PLACEMENTS[placement][kind]
        if kind == "spatial" or not PLACEMENTS[placement].get("temporal_convs"):
            return regex
        if self.temporal_convs is None:
            raise CavError(f"placement '{placement}' adapts temporal convolutions, which a {family} base does not "
                           "have: use placement cav or motiondirector")
        return rf"(?:{regex}|{self.temporal_convs})"


@dataclass(frozen=True)
class DiTTargets:
    """Where a Wan-style DiT's adapters go (``cav.wan.targets``): the T-LoRA on the placement's self-attention (and
    FFN) projections of every block; the S-LoRA absorber on self- and cross-attention of every block under ``cav``
    (``cav.wan.targets.ABSORBER``), on the placement's own modules otherwise (image mode is what makes it spatial:
    a DiT block is the same module in both stages). A DiT has no temporal convolutions: that placement is refused."""

    temporal_convs = None  # a DiT mixes frames only in self-attention: no temporal convolutions

    def regex(self, kind: str, placement: str, family: str) -> str:
        from ..wan import targets as wan

        if PLACEMENTS[placement].get("temporal_convs") and self.temporal_convs is None:
            raise CavError(f"placement '{placement}' adapts temporal convolutions, which a {family} base does not "
                           "have (a DiT mixes frames only in self-attention): use placement cav or motiondirector")
        temporal = wan.target_regex(placement)
        return temporal if kind == "temporal" or placement != "cav" else wan.absorber_regex()


def target_regex(kind: str, placement: str, family) -> str:
    """The anchored target regex of adapter ``kind`` (temporal / spatial) under ``placement`` on ``family``'s model
    (a ``families.Family``)."""
    if placement not in PLACEMENTS:
        raise CavError(f"unknown placement '{placement}': use one of {', '.join(PLACEMENTS)}")
    if kind not in KINDS:
        raise CavError(f"unknown adapter kind '{kind}': use temporal or spatial")
    return family.targets.regex(kind, placement, family.name)
