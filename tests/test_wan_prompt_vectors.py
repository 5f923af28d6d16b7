"""Wan's textual-inversion analogue: learned vectors in the umT5 output, passed to a stock pipeline as prompt_embeds."""

import pytest
import torch

from cav.errors import CavError
from cav.wan.flow import FlowObjective, transformer_loss
from cav.wan.prompt_vectors import PromptVectors, prompt_lengths
from cav.wan.tiny import TinyWanSpec, build_tokenizer, build_transformer, make_tiny_wan

SPEC = TinyWanSpec()


def test_vectors_fill_the_slots_after_the_real_tokens():
    tok = build_tokenizer(SPEC)
    lengths = prompt_lengths(tok, ["a red circle", "a dog"], 16)
    assert lengths.tolist() == [4, 3]  # words + </s>
    embeds = torch.randn(2, 16, SPEC.text_dim)
    embeds[0, 4:] = 0
    embeds[1, 3:] = 0
    pv = PromptVectors(2, SPEC.text_dim, generator=torch.Generator().manual_seed(0))
    out = pv(embeds, lengths)
    assert torch.equal(out[0, :4], embeds[0, :4]) and torch.equal(out[1, :3], embeds[1, :3])
    assert torch.equal(out[0, 4:6], pv.vectors) and torch.equal(out[1, 3:5], pv.vectors)
    assert (out[0, 6:] == 0).all() and (out[1, 5:] == 0).all()
    with pytest.raises(CavError, match="exceeds the 16-token context: shorten the prompt"):
        PromptVectors(13, SPEC.text_dim)(embeds, lengths)
    with pytest.raises(CavError, match="width 8 but this base's text encoder gives 16"):
        PromptVectors(1, 8)(embeds, lengths)


def test_only_the_vectors_train_and_they_fit():
    wan = build_transformer(SPEC).requires_grad_(False)
    pv = PromptVectors(2, SPEC.text_dim, generator=torch.Generator().manual_seed(0))
    embeds, lengths = torch.randn(1, 16, SPEC.text_dim), torch.tensor([5])
    embeds[:, 5:] = 0
    x0 = torch.randn(1, SPEC.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(pv.parameters(), lr=0.1)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = transformer_loss(wan, x0, pv(embeds, lengths), FlowObjective(), torch.Generator().manual_seed(2))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in wan.parameters())
    assert losses[-1] < losses[0]


def test_saved_vectors_reload_and_drive_a_stock_pipeline(tmp_path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(make_tiny_wan(tmp_path / "tiny-wan"))
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle moving left"
    embeds, negative = pipe.encode_prompt(prompt, "", max_sequence_length=16)
    lengths = prompt_lengths(pipe.tokenizer, [prompt], 16)
    pv = PromptVectors(3, SPEC.text_dim, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    path = pv.save(tmp_path / "prompt_vectors.safetensors", meta={"base": "tiny"})
    back = PromptVectors.load(path)
    assert torch.equal(back.vectors, pv.vectors)
    with torch.no_grad():
        conditioned = back(embeds, lengths)
    kwargs = dict(negative_prompt_embeds=negative, num_frames=5, height=16, width=16, num_inference_steps=2,
                  output_type="latent", guidance_scale=3.0)
    with_vectors = pipe(prompt_embeds=conditioned, **kwargs, generator=torch.Generator().manual_seed(0)).frames
    plain = pipe(prompt_embeds=embeds, **kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert with_vectors.shape == plain.shape and (with_vectors - plain).abs().max() > 1e-4
    with pytest.raises(CavError, match="not a cav Wan prompt-vectors file"):
        from cav.io_utils import save_safetensors

        PromptVectors.load(save_safetensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}))
    with pytest.raises(CavError, match="do not exist"):
        PromptVectors.load(tmp_path / "missing.safetensors")
