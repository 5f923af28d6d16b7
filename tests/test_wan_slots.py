"""cav.wan.slots: a short text with log-count biased zero slots attends exactly as WanPipeline's zero-padded slots."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from cav.toy.wan_base import ToyWanSpec, build_components
from cav.wan import slots
from cav.wan.flow import FlowObjective, transformer_loss

SPEC = ToyWanSpec(heads=2, head_dim=12, layers=2, ffn_dim=16, text_dim=8, text_layers=2, text_heads=2, text_ff=16,
                  z_dim=4, vae_base_dim=4, vae_dim_mult=(1, 1, 1), temporal=4)
TEXTS = ["a red circle moving left on a navy background", "", "a blue square on a black background",
         "a white diamond moving in a figure eight on a grey background"]


def _pipe():
    pipe = WanPipeline(**build_components(SPEC, seed=0))
    pipe.transformer.train()
    pipe.text_encoder.train()
    return pipe


def _loss_and_grads(pipe, short: bool, image_mode: bool, slot_count: int = 64):
    for module in (pipe.transformer, pipe.text_encoder):
        module.zero_grad(set_to_none=True)
    latents = torch.randn(len(TEXTS), 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    if short:
        slots.install(pipe.transformer)
        embeds, bias = slots.short_prompt_embeds(pipe, TEXTS, slot_count)
    else:
        embeds, bias = pipe._get_t5_prompt_embeds(TEXTS, max_sequence_length=slot_count, device=torch.device("cpu"),
                                                  dtype=torch.float32), None
    loss = transformer_loss(pipe.transformer, latents, embeds, FlowObjective(shift=3), generator=gen,
                            image_mode=image_mode, slot_bias=bias)
    loss.backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate((pipe.transformer, pipe.text_encoder))
             for n, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), embeds, grads


@pytest.mark.parametrize("image_mode", [False, True])
def test_short_slots_give_the_padded_loss_and_gradients(image_mode):
    pipe = _pipe()
    full_loss, full_embeds, full_grads = _loss_and_grads(pipe, short=False, image_mode=image_mode)
    short_loss, short_embeds, short_grads = _loss_and_grads(pipe, short=True, image_mode=image_mode)
    assert short_embeds.shape[1] < full_embeds.shape[1] // 3  # the point: far fewer slots
    # the short embeddings are the padded ones' first rows (the encoder saw only the real tokens either way)
    torch.testing.assert_close(short_embeds, full_embeds[:, :short_embeds.shape[1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert short_grads.keys() == full_grads.keys() and any(k.startswith("1.") for k in full_grads)  # text encoder too
    # float rounding only: every tensor's gradient within 1e-4 of its largest entry (measured: ≤ 3.3e-5; the
    # short slots without the bias are off by far more, the test below)
    assert _worst(short_grads, full_grads) < 1e-4


def _worst(grads, reference) -> float:
    return max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in reference.items())


def test_without_the_bias_the_short_slots_would_differ():
    """The bias is what makes it exact: the same short slots without it are another attention."""
    pipe = _pipe()
    full_loss, _, full_grads = _loss_and_grads(pipe, short=False, image_mode=False)
    slots.install(pipe.transformer)
    embeds, bias = slots.short_prompt_embeds(pipe, TEXTS, 64)
    latents = torch.randn(len(TEXTS), 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    pipe.transformer.zero_grad(set_to_none=True)
    pipe.text_encoder.zero_grad(set_to_none=True)
    unbiased = transformer_loss(pipe.transformer, latents, embeds, FlowObjective(shift=3),
                                generator=torch.Generator().manual_seed(2))
    unbiased.backward()
    grads = {f"{i}.{n}": p.grad for i, m in enumerate((pipe.transformer, pipe.text_encoder))
             for n, p in m.named_parameters() if p.grad is not None}
    assert (unbiased - full_loss).abs() > 1e-4 and _worst(grads, full_grads) > 1e-2
    lengths = [len(pipe.tokenizer(t)["input_ids"]) for t in TEXTS]
    for row, n in zip(bias, lengths):  # zero on real tokens; the padding's log-count spread over the zero slots
        assert (row[:n] == 0).all()
        pads = embeds.shape[1] - n
        torch.testing.assert_close(row[n:].exp().sum(), torch.tensor(64.0 - n))
        assert pads >= 1


def test_installed_processor_without_a_bias_is_the_stock_one():
    pipe = _pipe()
    pipe.transformer.eval()
    embeds = pipe._get_t5_prompt_embeds(TEXTS, max_sequence_length=64, device=torch.device("cpu"))
    x = torch.randn(len(TEXTS), 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0] * len(TEXTS))
    with torch.no_grad():
        stock = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
        slots.install(pipe.transformer)
        ours = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
    assert torch.equal(stock, ours)


def test_slot_bias_needs_install():
    pipe = _pipe()
    with pytest.raises(RuntimeError, match="install"):
        with slots.slot_bias(pipe.transformer, torch.zeros(1, 3)):
            pass


def test_collapse_padding_finds_each_videos_padding():
    rows = torch.randn(3, 10, 4)
    rows[0, 4:] = rows[0, -1]  # 4 real rows, 6 copies
    rows[1, 7:] = rows[1, -1]  # 7 real rows, 3 copies
    short, bias = slots.collapse_padding(rows)  # row 2 has only its last row as "padding"
    assert short.shape == (3, 10, 4) and bias is None  # nothing to cut: video 2 needs all 10
    short, bias = slots.collapse_padding(rows[:2])
    assert torch.equal(short, rows[:2, :8])
    assert bias.shape == (2, 1, 1, 8)
    torch.testing.assert_close(bias[0, 0, 0, 4:].exp().sum(), torch.tensor(6.0))
    torch.testing.assert_close(bias[1, 0, 0, 7:].exp().sum(), torch.tensor(3.0))
    assert (bias[0, 0, 0, :4] == 0).all() and (bias[1, 0, 0, :7] == 0).all()


@pytest.mark.parametrize("image_mode", [False, True])
def test_collapsing_processor_gives_the_padded_loss_and_gradients(image_mode):
    """The processor that finds the padding itself (every fp32 Wan cav loads): the 512-slot path's numbers."""
    pipe = _pipe()
    full_loss, _, full_grads = _loss_and_grads(pipe, short=False, image_mode=image_mode)
    slots.install(pipe.transformer, collapse=True)
    seen = []
    original = slots.collapse_padding
    try:
        slots.collapse_padding = lambda text: seen.append(text.shape) or original(text)
        loss, _, grads = _loss_and_grads(pipe, short=False, image_mode=image_mode)
    finally:
        slots.collapse_padding = original
    assert seen and all(shape[1] == 64 for shape in seen)  # it ran, on the padded text
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert _worst(grads, full_grads) < 1e-4


def test_loaded_fp32_wan_collapses_and_samples_as_stock(tmp_path):
    """backbone.load gives an fp32 Wan's cross-attention the collapsing processor (Family.denoiser_setup); a
    validation sample through cav's pipeline equals the stock processor's."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from cav import backbone
    from cav.sampling import sample_videos
    from cav.wan.tiny import make_tiny_wan

    folder = make_tiny_wan(tmp_path / "tiny")
    bb = backbone.load(str(folder), device="cpu", dtype="float32")
    procs = [block.attn2.processor for block in bb.unet.blocks]
    assert all(isinstance(p, slots.SlotBiasProcessor) and p.collapse for p in procs)
    kw = dict(frames=5, size=(16, 16), steps=3, guidance=4.0, seeds=[0, 1])
    ours = sample_videos(bb, ["a red circle moving left", "a cat"], **kw)
    for block in bb.unet.blocks:
        block.attn2.set_processor(WanAttnProcessor())
    stock = sample_videos(bb, ["a red circle moving left", "a cat"], **kw)
    assert np.abs(ours.astype(int) - stock.astype(int)).max() <= 1  # uint8 frames: rounding at most
