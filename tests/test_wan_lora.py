"""Wan LoRA placements (anchored regexes over module names), named peft adapters, and the temporal-heads selector."""

import re

import pytest
import torch
from peft.tuners.lora import LoraLayer

from cav.errors import CavError
from cav.wan.image_mode import image_mode_forward
from cav.wan.targets import (absorber_regex, add_absorber_lora, add_motion_lora, attention_mass_across_frames,
                             select_temporal_heads, target_regex)
from cav.wan.tiny import TinyWanSpec, build_transformer

SPEC = TinyWanSpec()


def _adapted(model, name):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A)


def _names(model):
    return [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("placement, per_block", [
    ("cav", ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v"]),
    ("qk", ["attn1.to_k", "attn1.to_q"]),
    ("motiondirector", ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "ffn.net.0.proj", "ffn.net.2"]),
])
def test_placements_match_exactly_their_modules(placement, per_block):
    wan = build_transformer(SPEC)
    expected = sorted(f"blocks.{b}.{m}" for b in range(SPEC.layers) for m in per_block)
    assert sorted(n for n in _names(wan) if re.fullmatch(target_regex(placement), n)) == expected
    add_motion_lora(wan, "t_lora", placement)
    assert _adapted(wan, "t_lora") == expected
    a = wan.blocks[0].attn1.to_q.lora_A["t_lora"].weight
    assert a.shape[0] == 4 and wan.blocks[0].attn1.to_q.scaling["t_lora"] == pytest.approx(1 / 4)


def test_absorber_is_rank_one_on_self_and_cross_attention_and_trains_in_image_mode():
    wan = build_transformer(SPEC)
    add_absorber_lora(wan, "s_lora")
    add_motion_lora(wan, "t_lora", "cav")
    assert len(_adapted(wan, "s_lora")) == SPEC.layers * 8 and len(_adapted(wan, "t_lora")) == SPEC.layers * 4
    assert wan.blocks[1].attn2.to_v.lora_A["s_lora"].weight.shape[0] == 1
    assert not any(re.fullmatch(absorber_regex(), n) for n in _names(wan) if "ffn" in n or "norm" in n)
    from cav.adapters.lora import activate, lora_parameters

    activate(wan, ["s_lora"], trainable="s_lora")
    x, ctx = torch.randn(1, SPEC.z_dim, 3, 4, 4), torch.randn(1, 6, SPEC.text_dim)
    image_mode_forward(wan, x, torch.tensor([500]), ctx).square().mean().backward()
    trained = lora_parameters(wan, "s_lora")
    assert all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in lora_parameters(wan, "t_lora"))


def test_bad_placements_are_one_line_errors():
    with pytest.raises(CavError, match=r"a DiT has no temporal convolutions\): use one of cav, qk"):
        target_regex("motiondirector+tconv")
    with pytest.raises(CavError, match="needs measured heads"):
        add_motion_lora(build_transformer(SPEC), "t", "temporal-heads")
    with pytest.raises(CavError, match=r"do not exist in this base \(2 blocks × 2 heads\): measure them on this base"):
        add_motion_lora(build_transformer(SPEC), "t", "temporal-heads", heads={1: [2]})
    with pytest.raises(CavError, match="fraction"):
        select_temporal_heads(torch.rand(2, 2), 0.0)


def _constructed(spec):
    """Block 0's heads made by hand (q, k = biases on the first rotary time pair, scaled up by the qk norms):
    head 0 looks within its frame (q ∥ k), head 1 across frames (q = −k: the other frame scores higher at 2
    frames, since cos(1) > cos(0)·(−1)), head 2 uniformly (q = 0)."""
    wan = build_transformer(spec).eval()
    attn = wan.blocks[0].attn1
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.zero_()
            lin.bias.zero_()
        d = spec.head_dim
        attn.to_q.bias[0], attn.to_k.bias[0] = 1.0, 1.0
        attn.to_q.bias[d], attn.to_k.bias[d] = -1.0, 1.0
        attn.to_k.bias[2 * d] = 1.0
        attn.norm_q.weight.fill_(10.0)
        attn.norm_k.weight.fill_(10.0)
    return wan


@torch.no_grad()
def test_attention_mass_on_a_constructed_case():
    spec = TinyWanSpec(heads=3)
    wan = _constructed(spec)
    x, ctx, ts = torch.randn(2, spec.z_dim, 2, 4, 4), torch.randn(2, 6, spec.text_dim), torch.tensor([500, 200])
    stock = wan(x, ts, ctx, return_dict=False)[0]
    mass = attention_mass_across_frames(wan, x, ts, ctx, chunk=3)
    assert mass.shape == (spec.layers, 3)
    assert mass[0, 0] < 1e-4 and mass[0, 1] > 1 - 1e-4 and abs(mass[0, 2] - 0.5) < 1e-6  # uniform: (F − 1)/F
    assert ((mass >= 0) & (mass <= 1)).all()
    assert torch.equal(wan(x, ts, ctx, return_dict=False)[0], stock)  # the stock processors are back
    assert select_temporal_heads(mass, 1 / 6) == {0: [1]}


def test_recorder_computes_the_same_attention_as_wan():
    """The recording processor's explicit attention (own RoPE, chunked softmax) gives Wan's output."""
    from cav.wan.targets import AttentionMassProcessor

    wan = build_transformer(SPEC).eval()
    x, ctx, ts = torch.randn(1, SPEC.z_dim, 3, 4, 6), torch.randn(1, 6, SPEC.text_dim), torch.tensor([300])
    with torch.no_grad():
        stock = wan(x, ts, ctx, return_dict=False)[0]
        for block in wan.blocks:
            block.attn1.set_processor(AttentionMassProcessor(tokens_per_frame=6, chunk=5))
        recorded = wan(x, ts, ctx, return_dict=False)[0]
    assert (recorded - stock).abs().max() < 1e-5


def test_temporal_heads_lora_trains_only_the_chosen_heads():
    wan = build_transformer(SPEC)
    add_motion_lora(wan, "t_lora", "temporal-heads", heads={1: [0]})
    assert _adapted(wan, "t_lora") == [f"blocks.1.attn1.{m}" for m in ("to_k", "to_out.0", "to_q", "to_v")]
    from cav.adapters.lora import activate, lora_parameters

    activate(wan, ["t_lora"], trainable="t_lora")
    opt = torch.optim.AdamW(lora_parameters(wan, "t_lora"), lr=1e-2, weight_decay=0.01)
    x, ctx = torch.randn(1, SPEC.z_dim, 3, 4, 4), torch.randn(1, 6, SPEC.text_dim)
    for _ in range(3):
        opt.zero_grad()
        wan(x, torch.tensor([500]), ctx, return_dict=False)[0].square().mean().backward()
        opt.step()
    attn, d = wan.blocks[1].attn1, SPEC.head_dim
    for proj in (attn.to_q, attn.to_k, attn.to_v):
        b = proj.lora_B["t_lora"].weight
        assert b[:d].abs().sum() > 0 and b[d:].abs().sum() == 0  # head 0 rows trained, head 1 rows untouched
    a = attn.to_out[0].lora_A["t_lora"].weight
    assert a[:, :d].abs().sum() > 0 and a[:, d:].abs().sum() == 0
