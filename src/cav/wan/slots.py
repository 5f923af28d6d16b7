"""The text slots of a Wan prompt, collapsed: the same attention at a fraction of the cost.

``WanPipeline`` zero-pads every prompt's umT5 output to 512 slots (``max_sequence_length``). Every zero slot reaches
the transformer's cross-attention as the same key and value (the text projection and the key norm work per slot), so
``n`` identical slots weigh in the softmax as one slot whose logit is raised by ``log n``. A short text (its real
tokens, then at least one zero slot) with that log-count added to the zero slots' logits is therefore the same
attention as the 512-slot one, up to float rounding; ``tests/test_wan_slots.py`` checks the loss and every gradient
against the 512-slot path. On the toy Wan (a 12-token caption) it cuts a training step about threefold: the text
encoder runs on the longest caption instead of 512 slots, and the cross-attention reads a handful of keys.

Two uses:
- the toy Wan's base training (``cav.toy.wan_base``), whose text encoder trains: ``install(transformer)`` once (a
  processor per block's ``attn2``; with no bias set it is the stock processor), then
  ``embeds, bias = short_prompt_embeds(pipe, texts, slots)`` (the encoder runs on the longest text only) and the
  transformer inside ``slot_bias(transformer, bias)``;
- every fp32 Wan that cav loads (``collapse_in_fp32``, the Wan row's ``Family.denoiser_setup``): the processor finds
  the padding itself in the text rows it gets (trailing rows equal to the last, whatever folded the batch: image
  mode repeats the prompt per frame) and attends to one biased copy, in training, sampling and inversion alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


class SlotBiasProcessor(WanAttnProcessor):
    """Wan's attention processor with an additive bias on the keys' logits when one is set (cross-attention), or,
    with ``collapse``, one it finds itself: the trailing rows of the projected text that equal its last row (the
    padding) are cut to one per video, the bias carrying their count."""

    bias: torch.Tensor | None = None  # (B, 1, 1, L): log of how many padded slots each key row stands for

    def __init__(self, collapse: bool = False):
        super().__init__()
        self.collapse = collapse

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is None and encoder_hidden_states is not None and attn.add_k_proj is None:
            if self.bias is not None:
                attention_mask = self.bias.to(device=hidden_states.device, dtype=hidden_states.dtype)
            elif self.collapse:
                encoder_hidden_states, attention_mask = collapse_padding(encoder_hidden_states)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def collapse_padding(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, D) text rows → (the same rows with each video's trailing copies of its last row cut to the fewest the
    batch allows, bias (B, 1, 1, L') or None when there is nothing to cut). Exact: a copy is bitwise equal."""
    length = text.shape[1]
    same = (text == text[:, -1:]).all(-1)  # (B, L): rows equal to the last one
    copies = same.flip(1).long().cumprod(1).sum(1)  # trailing run per video (≥ 1: the last row itself)
    kept = length - copies  # rows before the run
    short = int(kept.max()) + 1
    if short >= length:
        return text, None
    rows = torch.arange(short, device=text.device)[None, :]
    stands_for = (copies.double() / (short - kept).double()).log()[:, None]
    bias = torch.where(rows >= kept[:, None], stands_for, torch.zeros((), dtype=torch.float64, device=text.device))
    return text[:, :short], bias.to(text.dtype)[:, None, None, :]


def install(transformer, collapse: bool = False) -> None:
    """Give every block's cross-attention a ``SlotBiasProcessor`` (the stock computation while no bias is set and
    ``collapse`` is off)."""
    for block in transformer.blocks:
        if not isinstance(block.attn2.processor, SlotBiasProcessor):
            block.attn2.set_processor(SlotBiasProcessor(collapse))
        block.attn2.processor.collapse = collapse


def collapse_in_fp32(transformer, dtype) -> None:
    """``Family.denoiser_setup`` of the Wan row: collapse the text padding in every cross-attention of an fp32
    transformer. Half precision is left stock: a log-count in bf16 is off by up to 1/64, no longer the same
    attention (and on a full-size Wan, 512 text slots against tens of thousands of video tokens cost little)."""
    if dtype == torch.float32:
        install(transformer, collapse=True)


@contextmanager
def slot_bias(transformer, bias: torch.Tensor):
    """Run ``transformer`` (after ``install``) with ``bias`` (B, L) on its cross-attention's logits."""
    procs = [block.attn2.processor for block in transformer.blocks]
    if not all(isinstance(p, SlotBiasProcessor) for p in procs):
        raise RuntimeError("slot_bias needs cav.wan.slots.install(transformer) first")
    for p in procs:
        p.bias = bias[:, None, None, :]
    try:
        yield
    finally:
        for p in procs:
            p.bias = None


def short_prompt_embeds(pipe, texts: list[str], slots: int = 512, device=None, dtype=torch.float32):
    """(embeds (B, L, D), bias (B, L)) that attend as ``pipe._get_t5_prompt_embeds(texts, slots)`` does: L is the
    longest text's token count plus one; rows past a text's tokens are zero, and the bias spreads the log-count of
    its ``slots`` − tokens zero slots evenly over them. Gradients reach the text encoder as they do in the pipeline's
    own function, which encodes the texts here (at L tokens: umT5 masks the padding, so real tokens see the same)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    lengths = pipe.tokenizer([prompt_clean(t) for t in texts], add_special_tokens=True, truncation=True,
                             max_length=slots, return_length=True)["length"]
    lengths = torch.tensor(lengths, dtype=torch.long)
    short = int(lengths.max()) + 1
    if short >= slots:  # nothing to collapse
        return pipe._get_t5_prompt_embeds(texts, max_sequence_length=slots, device=device, dtype=dtype), \
            torch.zeros(len(texts), slots, dtype=dtype)
    embeds = pipe._get_t5_prompt_embeds(texts, max_sequence_length=short, device=device, dtype=dtype)
    rows = torch.arange(short)[None, :]
    pads = (short - lengths)[:, None].to(torch.float64)
    stands_for = ((slots - lengths)[:, None].to(torch.float64) / pads).log()
    bias = torch.where(rows >= lengths[:, None], stands_for, torch.zeros((), dtype=torch.float64))
    return embeds, bias.to(device=embeds.device, dtype=dtype)


__all__ = ["SlotBiasProcessor", "collapse_padding", "install", "collapse_in_fp32", "slot_bias", "short_prompt_embeds"]
