"""Wan LoRA formats: stock diffusers loads cav's diffusers-layout and ComfyUI files and gives the peft model's output;
diffusers' own Wan converter reads the ComfyUI export back to the same weights."""

import re

import pytest
import torch
from safetensors.torch import load_file

from cav.adapters.lora import activate, lora_parameters
from cav.errors import CavError
from cav.wan.formats import adapter_state, export_comfyui, save_diffusers, to_comfyui
from cav.wan.targets import add_absorber_lora, add_motion_lora
from cav.wan.tiny import make_tiny_wan

GEN = dict(prompt="a red circle moving left", num_frames=5, height=16, width=16, num_inference_steps=3,
           max_sequence_length=16, output_type="latent", guidance_scale=3.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def _open(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomize(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _latents(pipe):
    return pipe(**GEN, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("placement, fmt", [("cav", "diffusers"), ("motiondirector", "diffusers"),
                                            ("cav", "comfyui"), ("temporal-heads", "comfyui")])
def test_stock_pipeline_loads_the_motion_lora_and_matches_cav(folder, tmp_path, placement, fmt):
    cav = _open(folder)
    base = _latents(cav)
    heads = {1: [0]} if placement == "temporal-heads" else None
    config = add_motion_lora(cav.transformer, "motion", placement, heads=heads)
    _randomize(cav.transformer, "motion")
    activate(cav.transformer, ["motion"])
    ours = _latents(cav)
    if fmt == "diffusers":
        saved = save_diffusers(cav.transformer, "motion", config, tmp_path / "lora")
    else:
        saved = export_comfyui(cav.transformer, "motion", config, tmp_path / "motion_comfyui.safetensors")

    stock = _open(folder)  # from here on: diffusers only
    stock.load_lora_weights(str(saved), adapter_name="motion")
    stock.set_adapters(["motion"], [1.0])
    theirs = _latents(stock)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the output: the comparison is not vacuous
    assert (theirs - ours).abs().max() < 1e-5


def _delta(state, module, scale):
    return state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"] * scale


@pytest.mark.parametrize("kind, alpha", [("motion", 1.0), ("motion", 4.0), ("absorber", 0.5)])
def test_diffusers_converter_reads_the_comfyui_export_back(tmp_path, kind, alpha):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    from cav.wan.tiny import TinyWanSpec, build_transformer

    wan = build_transformer(TinyWanSpec(layers=3))
    if kind == "motion":
        config = add_motion_lora(wan, "x", "motiondirector", alpha=alpha)
    else:
        config = add_absorber_lora(wan, "x", alpha=alpha)
    _randomize(wan, "x", seed=1)
    path = export_comfyui(wan, "x", config, tmp_path / "x.safetensors")
    exported = load_file(str(path))
    pattern = (r"diffusion_model\.blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])"
               r"\.(?:lora_[AB]\.weight|alpha)")
    assert all(re.fullmatch(pattern, k) for k in exported)
    assert "diffusion_model.blocks.2.self_attn.o.lora_A.weight" in exported
    if kind == "absorber":
        assert "diffusion_model.blocks.0.cross_attn.v.lora_B.weight" in exported

    ours = adapter_state(wan, "x")
    converted = _convert_non_diffusers_wan_lora_to_diffusers(exported)
    back = {k.removeprefix("transformer."): v for k, v in converted.items()}
    assert set(back) == set(ours)
    scale = alpha / config.r
    for key in (k[: -len(".lora_A.weight")] for k in ours if k.endswith("lora_A.weight")):
        # diffusers folds alpha / rank into the weights; the LoRA's update B·A·alpha/rank is unchanged
        assert torch.allclose(_delta(back, key, 1.0), _delta(ours, key, scale), atol=1e-6)
        if scale == 1.0:
            assert torch.equal(back[f"{key}.lora_A.weight"], ours[f"{key}.lora_A.weight"])
            assert torch.equal(back[f"{key}.lora_B.weight"], ours[f"{key}.lora_B.weight"])


def test_comfyui_export_refuses_non_wan_tensors():
    with pytest.raises(CavError, match="only motion and absorber LoRAs of a Wan transformer"):
        to_comfyui({"down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(1, 2)}, 1.0)


@pytest.mark.parametrize("trained", [("transformer",), ("transformer", "transformer_2")])
def test_a14b_pair_loads_into_both_experts_with_stock_diffusers(tmp_path, trained):
    from cav.wan.formats import export_comfyui_experts

    folder = make_tiny_wan(tmp_path / "tiny-a14b", experts=2)
    cav = _open(folder)
    base = _latents(cav)
    config = None
    for seed, component in enumerate(trained):
        config = add_motion_lora(getattr(cav, component), "motion", "cav")
        _randomize(getattr(cav, component), "motion", seed=seed)
        activate(getattr(cav, component), ["motion"])
    ours = _latents(cav)
    files = export_comfyui_experts({"transformer": cav.transformer, "transformer_2": cav.transformer_2}, "motion",
                                   config, tmp_path / "motion.safetensors")
    assert sorted(p.name for p in files.values()) == sorted(
        f"motion_{'high' if c == 'transformer' else 'low'}_noise.safetensors" for c in trained)

    stock = _open(folder)  # diffusers only: the high-noise file into transformer, the low-noise one into transformer_2
    stock.load_lora_weights(str(files["transformer"]), adapter_name="motion")
    assert (ours - base).abs().max() > 1e-3
    if "transformer_2" in files:
        assert (_latents(stock) - ours).abs().max() > 1e-3  # the low-noise expert's LoRA matters too
        stock.load_lora_weights(str(files["transformer_2"]), adapter_name="motion", load_into_transformer_2=True)
    stock.set_adapters(["motion"], [1.0])
    assert (_latents(stock) - ours).abs().max() < 1e-5


def test_expert_export_needs_a_trained_expert(tmp_path):
    from cav.wan.formats import export_comfyui_experts
    from cav.wan.tiny import TinyWanSpec, build_transformer

    with pytest.raises(CavError, match="no expert carries the LoRA 'motion'"):
        export_comfyui_experts({"transformer": build_transformer(TinyWanSpec())}, "motion", None, tmp_path / "m")


def _fake_lora(path, width, blocks, base=None, prefix="diffusion_model.blocks.{}.self_attn.q"):
    """A LoRA file with a published base's shapes (rank 1, so no big tensors are needed)."""
    from cav.io_utils import save_safetensors

    tensors = {}
    for b in blocks:
        tensors[prefix.format(b) + ".lora_A.weight"] = torch.zeros(1, width)
        tensors[prefix.format(b) + ".lora_B.weight"] = torch.zeros(width, 1)
    return save_safetensors(path, tensors, metadata={"format": "pt", **({"cav_base": base} if base else {})})


def test_lora_that_does_not_fit_the_base_is_refused_from_its_header(tmp_path):
    from cav.wan.formats import check_lora_file
    from cav.wan.published import published

    small = published("wan2.1-t2v-1.3b")["transformer"]
    a14b = published("wan2.2-t2v-a14b")["transformer"]
    check_lora_file(_fake_lora(tmp_path / "ok.safetensors", 1536, range(30)), small, "wan2.1-t2v-1.3b")
    check_lora_file(_fake_lora(tmp_path / "d.safetensors", 1536, [0, 29], prefix="transformer.blocks.{}.attn1.to_q"),
                    small)
    with pytest.raises(CavError, match=r"^LoRA 'big.safetensors' is for a Wan of width 5120 \(trained on "
                                       r"wan2.1-t2v-14b\), this base has width 1536 \(30 blocks\): use a LoRA"):
        check_lora_file(_fake_lora(tmp_path / "big.safetensors", 5120, [0], "wan2.1-t2v-14b"), small)
    with pytest.raises(CavError, match="adapts block 35, this base has 30 blocks"):
        check_lora_file(_fake_lora(tmp_path / "deep.safetensors", 1536, [35]), small)
    with pytest.raises(CavError, match=r"trained on wan2.1-t2v-14b, a Wan 2.1 base, but this base is "
                                       r"wan2.2-t2v-a14b \(Wan 2.2\): use a LoRA trained on a Wan 2.2 base"):
        check_lora_file(_fake_lora(tmp_path / "v21.safetensors", 5120, [0], "wan2.1-t2v-14b"), a14b, "wan2.2-t2v-a14b")
    musubi = _fake_lora(tmp_path / "m.safetensors", 1536, [0], prefix="lora_unet_blocks_{}_self_attn_q")
    with pytest.raises(CavError, match="musubi's lora_unet_"):
        check_lora_file(musubi, small)
    with pytest.raises(CavError, match="does not exist"):
        check_lora_file(tmp_path / "none.safetensors", small)


def test_cav_export_passes_its_own_check_and_records_the_base(tmp_path):
    from cav.wan.formats import check_lora_file
    from cav.wan.tiny import TinyWanSpec, build_transformer

    wan = build_transformer(TinyWanSpec())
    config = add_motion_lora(wan, "m", "cav")
    path = export_comfyui(wan, "m", config, tmp_path / "m.safetensors", base="wan2.1-t2v-1.3b")
    check_lora_file(path, dict(wan.config), "wan2.1-t2v-1.3b")
    with pytest.raises(CavError, match="a Wan 2.1 base, but this base is wan2.2-ti2v-5b"):
        check_lora_file(path, dict(wan.config), "wan2.2-ti2v-5b")


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_load_lora_file_rebuilds_the_adapter_in_either_layout(tmp_path, fmt):
    """``--s-lora-from``: an image LoRA in diffusers or ComfyUI layout becomes a named adapter with the same effect."""
    from cav.wan.formats import load_lora_file
    from cav.wan.tiny import TinyWanSpec, build_transformer

    src = build_transformer(TinyWanSpec()).eval()
    config = add_absorber_lora(src, "s_lora")
    _randomize(src, "s_lora", seed=3)
    if fmt == "diffusers":
        path = save_diffusers(src, "s_lora", config, tmp_path / "lora")
    else:
        path = export_comfyui(src, "s_lora", config, tmp_path / "s.safetensors")
    dst = build_transformer(TinyWanSpec()).eval()  # same seed: same base weights
    load_lora_file(dst, path, "image")
    x, ctx, ts = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 6, 16), torch.tensor([400])
    with torch.no_grad():
        ours, theirs = src(x, ts, ctx, return_dict=False)[0], dst(x, ts, ctx, return_dict=False)[0]
        activate(dst, [])
        bare = dst(x, ts, ctx, return_dict=False)[0]
    assert (ours - theirs).abs().max() < 1e-5 and (ours - bare).abs().max() > 1e-3
    with pytest.raises(CavError, match="width 24, this base has width 48"):
        load_lora_file(build_transformer(TinyWanSpec(heads=4)), path, "image")
