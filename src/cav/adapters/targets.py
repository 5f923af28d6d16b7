"""Which UNet3D modules each adapter adapts, as anchored regexes (peft ``re.fullmatch``es a string target).

Anchoring matters: ``temp_attentions`` contains ``attentions``, so spatial patterns require the block prefix
directly before ``attentions``.

Placements (supp. A.3 and Table 1 of the seed):
- ``cav``: T-LoRA on temporal cross-frame attention attn1+attn2 (to_q/to_k/to_v/to_out.0), ``transformer_in``
  included; S-LoRA on spatial self- and cross-attention attn1+attn2.
- ``motiondirector``: temporal attention + the feed-forward after it; spatial self-attention + feed-forward.
"""

from __future__ import annotations

from ..errors import CavError

_BLOCK = r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)"
_PROJ = r"(?:to_q|to_k|to_v|to_out\.0)"
_FF = r"ff\.net\.(?:0\.proj|2)"
TEMPORAL_BLOCK = rf"(?:transformer_in|{_BLOCK}temp_attentions\.\d+)\.transformer_blocks\.\d+\."
SPATIAL_BLOCK = rf"{_BLOCK}attentions\.\d+\.transformer_blocks\.\d+\."

PLACEMENTS = {
    "cav": {
        "temporal": rf"{TEMPORAL_BLOCK}(?:attn1|attn2)\.{_PROJ}",
        "spatial": rf"{SPATIAL_BLOCK}(?:attn1|attn2)\.{_PROJ}",
    },
    "motiondirector": {
        "temporal": rf"{TEMPORAL_BLOCK}(?:(?:attn1|attn2)\.{_PROJ}|{_FF})",
        "spatial": rf"{SPATIAL_BLOCK}(?:attn1\.{_PROJ}|{_FF})",
    },
}
KINDS = ("temporal", "spatial")


def target_regex(kind: str, placement: str = "cav") -> str:
    if placement not in PLACEMENTS:
        raise CavError(f"unknown placement '{placement}': use one of {', '.join(PLACEMENTS)}")
    if kind not in KINDS:
        raise CavError(f"unknown adapter kind '{kind}': use temporal or spatial")
    return PLACEMENTS[placement][kind]
