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

    @property
    def names(self) -> tuple[str, ...]:
        """The placements this family's model has (``motiondirector+tconv`` is refused below where it lacks the
        convolutions, naming them)."""
        return tuple(PLACEMENTS)

    def heads(self, placement: str) -> float | None:
        """A UNet family's T-LoRA is never cut to measured heads."""
        return None

    def regex(self, kind: str, placement: str, family: str, blocks=None) -> str:
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
class DiTPlacement:
    """One placement on a DiT, inside every block: the T-LoRA's modules (``temporal``), the S-LoRA's (``spatial``;
    image mode is what makes it spatial: a DiT block is the same module in both stages), and ``heads``: the fraction
    of all self-attention heads the T-LoRA is cut to, the ones whose attention falls most across frames, measured on
    the run's clip (None: every head)."""

    temporal: str
    spatial: str
    heads: float | None = None


@dataclass(frozen=True, eq=False)
class DiTTargets:
    """Where a Wan-style DiT's adapters go: for each placement (``placements``: name → ``DiTPlacement``, the family
    row's table) the T-LoRA's and the S-LoRA's modules inside every block (``blocks``: the blocks' module list, e.g.
    ``blocks``), the T-LoRA optionally on some blocks only (``blocks=`` of ``regex``: the blocks of measured heads).
    A DiT has no temporal convolutions: that placement is refused, naming them."""

    placements: dict
    blocks: str = "blocks"
    temporal_convs = None  # a DiT mixes frames only in self-attention: no temporal convolutions

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.placements)

    def heads(self, placement: str) -> float | None:
        return self.placements[placement].heads if placement in self.placements else None

    def block_regex(self, blocks=None) -> str:
        """Every block (``blocks`` None) or the given block indices."""
        if blocks is None:
            return rf"{self.blocks}\.\d+\."
        blocks = sorted(set(int(b) for b in blocks))
        if not blocks:
            raise CavError("no transformer block selected for the LoRA: measure heads on a clip with motion, or use "
                           "placement cav")
        return rf"{self.blocks}\.(?:{'|'.join(map(str, blocks))})\."

    def measure_heads(self, model, inputs, placement: str, seed: int, sigma: float = 0.5) -> tuple[dict, object]:
        """The heads ``placement`` cuts the T-LoRA to, measured on ``inputs`` (clean latents, condition) per clip at
        noise level ``sigma`` (``cav.wan.targets.measure_temporal_heads``): (block → heads, the measured shares)."""
        from ..wan.targets import measure_temporal_heads

        return measure_temporal_heads(model, inputs, self.heads(placement), seed, sigma)

    def restrict(self, model, name: str, heads: dict):
        """Adapter ``name`` cut to ``heads`` (``cav.wan.targets.restrict_to_heads``); returns its ``mask_grads``."""
        from ..wan.targets import restrict_to_heads

        return restrict_to_heads(model, name, heads)

    def regex(self, kind: str, placement: str, family: str, blocks=None) -> str:
        if PLACEMENTS.get(placement, {}).get("temporal_convs") and self.temporal_convs is None:
            raise CavError(f"placement '{placement}' adapts temporal convolutions, which a {family} base does not "
                           "have (a DiT mixes frames only in self-attention): use placement cav or motiondirector")
        chosen = self.placements[placement]
        if kind == "temporal":
            return self.block_regex(blocks) + chosen.temporal
        return self.block_regex() + chosen.spatial


def target_regex(kind: str, placement: str, family, blocks=None) -> str:
    """The anchored target regex of adapter ``kind`` (temporal / spatial) under ``placement`` on ``family``'s model
    (a ``families.Family``); ``blocks``: the T-LoRA on these block indices only (a DiT's measured heads)."""
    if kind not in KINDS:
        raise CavError(f"unknown adapter kind '{kind}': use temporal or spatial")
    names = family.targets.names
    if placement not in names and placement not in PLACEMENTS:  # (a UNet placement a DiT lacks: its row says why)
        raise CavError(f"placement '{placement}' does not exist on {family.what}: use placement "
                       f"{', '.join(names[:-1])} or {names[-1]}")
    return family.targets.regex(kind, placement, family.name, blocks)
