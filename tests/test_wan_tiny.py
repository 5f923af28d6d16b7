"""A tiny Wan built in code and saved in the stock diffusers layout opens and generates with stock diffusers."""

import json

import pytest
import torch

from cav.wan.tiny import A14B_BOUNDARY_RATIO, TinyWanSpec, build_tokenizer, make_tiny_wan


def test_tokenizer_has_umt5_special_ids():
    tok = build_tokenizer(TinyWanSpec())
    ids = tok("A red circle zzz", padding="max_length", max_length=8, truncation=True).input_ids
    assert ids[3:6] == [2, 1, 0]  # unknown word → <unk> 2, then </s> 1, then <pad> 0 (umT5's ids)
    assert ids[0] == tok.convert_tokens_to_ids("a")


@pytest.mark.parametrize("experts", [1, 2])
def test_stock_wan_pipeline_opens_and_generates(tmp_path, experts):
    from diffusers import WanPipeline

    folder = make_tiny_wan(tmp_path / "tiny-wan", experts=experts)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["boundary_ratio"] == (A14B_BOUNDARY_RATIO if experts == 2 else None)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    pipe = WanPipeline.from_pretrained(folder)
    assert (pipe.transformer_2 is not None) == (experts == 2)
    calls = {"high": 0, "low": 0}
    pipe.transformer.register_forward_hook(lambda *a: calls.__setitem__("high", calls["high"] + 1))
    if experts == 2:
        pipe.transformer_2.register_forward_hook(lambda *a: calls.__setitem__("low", calls["low"] + 1))
    kwargs = dict(prompt="a red circle moving left", num_frames=5, height=16, width=16, num_inference_steps=4,
                  max_sequence_length=16, output_type="np", guidance_scale=1.0)
    video = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 16, 16, 3) and (video >= 0).all() and (video <= 1).all()
    assert (video == again).all()
    # two runs of 4 steps; with two experts the high-noise one takes the steps above the boundary, the low-noise
    # one the rest
    assert calls["high"] > 0 and (calls["low"] > 0) == (experts == 2) and sum(calls.values()) == 8
