"""Adapters: targets, gradients only where they belong, peft-format save/load, textual inversion rows."""

import json
import re

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from cav import backbone
from cav.families import ANIMATEDIFF, ANIMATEDIFF_SDXL, FAMILIES, UNET3D
from cav.adapters import lora
from cav.adapters.targets import target_regex
from cav.adapters.textual_inversion import TextualInversion
from cav.config import TrainConfig
from cav.errors import CavError
from cav.stages import S_LORA, T_LORA, absorber_stage, t_lora_stage
from cav.trainer import diffusion_loss, run_stage


def test_anchored_targets_separate_temporal_and_spatial():
    t, s = target_regex("temporal", "cav", UNET3D), target_regex("spatial", "cav", UNET3D)
    assert re.fullmatch(t, "down_blocks.0.temp_attentions.1.transformer_blocks.0.attn1.to_q")
    assert re.fullmatch(t, "transformer_in.transformer_blocks.0.attn2.to_out.0")
    assert re.fullmatch(t, "mid_block.temp_attentions.0.transformer_blocks.0.attn2.to_v")
    assert not re.fullmatch(s, "down_blocks.0.temp_attentions.1.transformer_blocks.0.attn1.to_q")
    assert re.fullmatch(s, "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k")
    assert not re.fullmatch(t, "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k")
    assert not re.fullmatch(t, "down_blocks.0.temp_attentions.1.transformer_blocks.0.ff.net.2")
    t_md, s_md = target_regex("temporal", "motiondirector", UNET3D), target_regex("spatial", "motiondirector", UNET3D)
    assert re.fullmatch(t_md, "down_blocks.0.temp_attentions.1.transformer_blocks.0.ff.net.2")
    assert not re.fullmatch(s_md, "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k")



def _adapted(unet, name: str) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in unet.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def test_tconv_placement_adds_exactly_the_temporal_convolutions(tiny_model, tmp_path):
    from diffusers.models.resnet import TemporalConvLayer

    bb = backbone.load(tiny_model, "cpu")
    convs = {f"{n}.{c}" for n, m in bb.unet.named_modules() if isinstance(m, TemporalConvLayer)
             for c, sub in m.named_modules() if isinstance(sub, torch.nn.Conv3d)}
    assert len(convs) == 4 * sum(isinstance(m, TemporalConvLayer) for m in bb.unet.modules()) > 0
    for kind in ("temporal", "spatial"):
        lora.add_lora(bb.unet, f"md_{kind}", lora.lora_config(kind, "motiondirector", 2, 1.0, bb.family))
        cfg = lora.lora_config(kind, "motiondirector+tconv", 2, 1.0, bb.family)
        lora.add_lora(bb.unet, f"tc_{kind}", cfg)
    assert _adapted(bb.unet, "tc_temporal") == _adapted(bb.unet, "md_temporal") | convs
    assert _adapted(bb.unet, "tc_spatial") == _adapted(bb.unet, "md_spatial")  # the S-LoRA is MotionDirector's
    with torch.no_grad():
        for p in lora.lora_parameters(bb.unet, "tc_temporal"):
            p.normal_()
    tconv = lora.lora_config("temporal", "motiondirector+tconv", 2, 1.0, bb.family)
    out = lora.save_lora(bb.unet, "tc_temporal", tconv,
                         tmp_path / "tc", {"kind": "temporal", "base": "tiny"})
    bb2 = backbone.load(tiny_model, "cpu")
    lora.load_lora(bb2.unet, out, "again", expect_kind="temporal")
    assert _adapted(bb2.unet, "again") == _adapted(bb.unet, "tc_temporal")
    src = {n.replace(".tc_temporal.", "."): p for n, p in bb.unet.named_parameters() if ".tc_temporal." in n}
    dst = {n.replace(".again.", "."): p for n, p in bb2.unet.named_parameters() if ".again." in n}
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)


def test_tconv_placement_is_refused_where_the_family_has_no_temporal_convolutions():
    assert target_regex("spatial", "motiondirector+tconv", ANIMATEDIFF) == target_regex(
        "spatial", "motiondirector", ANIMATEDIFF)
    for family in (ANIMATEDIFF, ANIMATEDIFF_SDXL):
        with pytest.raises(CavError, match="temporal convolutions.*use placement cav or motiondirector"):
            target_regex("temporal", "motiondirector+tconv", family)


def test_every_family_says_whether_it_has_temporal_convolutions():
    assert [f.targets.temporal_convs is not None for f in FAMILIES.values()] == [True, False, False, False]

def _frames(n=4, size=32):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _log(_):
    pass


def test_stages_train_only_their_parameters_and_never_touch_the_base(tiny_model):
    bb = backbone.load(tiny_model, "cpu")
    base_unet = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in bb.text_encoder.state_dict().items()}
    cfg = TrainConfig.of(prompt="a red square moving right", spatial_prompt="a red square", frames=4, size=[32, 32],
                      absorber_steps=2, steps=2, ti_tokens=2, absorber_batch=2, s_lora_lr=1e-2, t_lora_lr=1e-2,
                      ti_lr=1e-2)
    ti = TextualInversion(bb.tokenizer, bb.text_encoder, cfg.absorbers.ti_token, cfg.absorbers.ti_tokens, cfg.absorbers.ti_init)
    gen = torch.Generator().manual_seed(0)
    stage1 = absorber_stage(bb, cfg, _frames(), ti)
    run_stage(bb.unet, bb.scheduler, stage1, gen, _log, quiet=True)
    s_after1 = {n: p.clone() for n, p in bb.unet.named_parameters() if f".{S_LORA}." in n}
    emb_after1 = ti.weight.detach().clone()

    stage2 = t_lora_stage(bb, cfg, _frames(), ti)
    trainable = {n for n, p in bb.unet.named_parameters() if p.requires_grad}
    assert trainable and all(f".{T_LORA}." in n for n in trainable)
    assert not any(p.requires_grad for p in bb.text_encoder.parameters())
    t_before = {n: p.clone() for n, p in bb.unet.named_parameters() if f".{T_LORA}." in n}
    # one manual step: gradients reach T-LoRA parameters only
    from cav.trainer import diffusion_loss
    latents, cond = stage2.batch(gen)
    diffusion_loss(bb.unet, bb.scheduler, latents, cond, gen, objective=bb.family.objective).backward()
    with_grad = {n for n, p in bb.unet.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in trainable}
    bb.unet.zero_grad(set_to_none=True)
    run_stage(bb.unet, bb.scheduler, stage2, gen, _log, quiet=True)

    state = bb.unet.state_dict()
    for k, v in base_unet.items():  # base weights never change
        if ".lora_" not in k:
            assert torch.equal(state[k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
                               if k not in state else state[k], v), k
    for n, p in bb.unet.named_parameters():
        if f".{S_LORA}." in n:
            assert torch.equal(p, s_after1[n]), "absorbers are frozen in stage 2"
    assert any(not torch.equal(p, t_before[n]) for n, p in bb.unet.named_parameters() if f".{T_LORA}." in n)
    assert torch.equal(ti.weight, emb_after1)
    # textual inversion: only the new rows changed, every other row bit for bit
    old_rows = base_text["embeddings.token_embedding.weight"]
    new = ti.weight.detach()
    assert torch.equal(new[: old_rows.shape[0]], old_rows)
    assert not torch.equal(new[ti.ids], ti.weight.detach()[bb.tokenizer(cfg.absorbers.ti_init, add_special_tokens=False).input_ids[0]].expand(2, -1))
    for k, v in base_text.items():
        if "token_embedding" not in k:
            assert torch.equal(bb.text_encoder.state_dict()[k], v)


def test_save_load_peft_format_round_trip(tiny_model, tmp_path):
    bb = backbone.load(tiny_model, "cpu")
    cfg = lora.lora_config("temporal", "cav", 4, 1.0, bb.family)
    lora.add_lora(bb.unet, "t_lora", cfg)
    with torch.no_grad():
        for p in lora.lora_parameters(bb.unet, "t_lora"):
            p.normal_()
    out = lora.save_lora(bb.unet, "t_lora", cfg, tmp_path / "t_lora", {"kind": "temporal", "base": "tiny"})
    loaded_cfg = LoraConfig.from_pretrained(str(out))
    assert loaded_cfg.r == 4 and loaded_cfg.lora_alpha == 1.0
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # as peft writes them
    assert any(k.startswith("transformer_in.") for k in keys)
    assert json.loads((out / "cav.json").read_text())["kind"] == "temporal"

    bb2 = backbone.load(tiny_model, "cpu")
    lora.load_lora(bb2.unet, out, "again", expect_kind="temporal")
    src = {n.replace(".t_lora.", "."): p for n, p in bb.unet.named_parameters() if ".t_lora." in n}
    dst = {n.replace(".again.", "."): p for n, p in bb2.unet.named_parameters() if ".again." in n}
    assert src.keys() == dst.keys()
    for k in src:
        assert torch.equal(src[k], dst[k])


def test_textual_inversion_file_loads_in_diffusers(tiny_model, tmp_path):
    bb = backbone.load(tiny_model, "cpu")
    ti = TextualInversion(bb.tokenizer, bb.text_encoder, "<cav>", 3, "object")
    with torch.no_grad():
        ti.weight[ti.ids] = torch.randn(3, ti.weight.shape[1])
    path = ti.save(tmp_path / "ti.safetensors")
    bb2 = backbone.load(tiny_model, "cpu")
    pipe = bb2.pipeline()
    pipe.load_textual_inversion(str(path))
    ids = bb2.tokenizer.convert_tokens_to_ids(["<cav>", "<cav>_1", "<cav>_2"])
    torch.testing.assert_close(bb2.text_encoder.get_input_embeddings().weight[ids], ti.embeddings())
    assert ti.expand("a <cav> moving") == "a <cav> <cav>_1 <cav>_2 moving"
    assert ti.expand("a dog") == "<cav> <cav>_1 <cav>_2 a dog"


def test_t_lora_prompt_dropout_trains_some_steps_on_the_empty_prompt(tiny_model):
    from cav.stages import encode_prompt

    bb = backbone.load(tiny_model, "cpu")
    cfg = TrainConfig.of(prompt="a red square moving right", frames=4, size=[32, 32], absorbers="none",
                      t_lora_prompt_dropout=0.5)
    stage = t_lora_stage(bb, cfg, _frames(), None)
    full, empty = encode_prompt(bb, cfg.prompt), encode_prompt(bb, "")
    gen = torch.Generator().manual_seed(0)
    picks = [stage.batch(gen)[1] for _ in range(40)]
    n_empty = sum(torch.equal(c, empty) for c in picks)
    assert sum(torch.equal(c, full) for c in picks) + n_empty == 40 and 8 <= n_empty <= 32
    # the paper's recipe (no dropout) draws nothing from the generator, so its runs stay as they were
    bb = backbone.load(tiny_model, "cpu")
    stage0 = t_lora_stage(bb, TrainConfig.of(prompt=cfg.prompt, frames=4, size=[32, 32], absorbers="none"), _frames(), None)
    before = gen.get_state()
    assert torch.equal(stage0.batch(gen)[1], full) and torch.equal(gen.get_state(), before)


def test_t_lora_batch_repeats_the_clip_and_drops_the_prompt_per_copy(tiny_model):
    from cav.stages import encode_prompt

    bb = backbone.load(tiny_model, "cpu")
    cfg = TrainConfig.of(prompt="a red square moving right", frames=4, size=[32, 32], absorbers="none",
                      t_lora_batch=3, t_lora_prompt_dropout=0.5)
    stage = t_lora_stage(bb, cfg, _frames(), None)
    full, empty = encode_prompt(bb, cfg.prompt)[0], encode_prompt(bb, "")[0]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(10):
        latents, cond = stage.batch(gen)
        assert latents.shape[0] == cond.shape[0] == 3 and torch.equal(latents[0], latents[2])
        rows += [torch.equal(c, empty) for c in cond if torch.equal(c, empty) or torch.equal(c, full)]
    assert len(rows) == 30 and 6 <= sum(rows) <= 24  # each copy chooses by itself
    # one loss over the three copies, each with its own timestep: finite, and it trains the T-LoRA
    loss = diffusion_loss(bb.unet, bb.scheduler, latents, cond, gen, timesteps=stage.timesteps,
                          objective=bb.family.objective)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in lora.lora_parameters(bb.unet, T_LORA))


def test_an_adapter_is_data_its_patterns_never_run_and_its_base_never_followed(tiny_model, tmp_path):
    """Issue 25: a crafted adapter_config.json regex (catastrophic backtracking over every module name) used to hang
    loading, and cav.json's base named what generation loads; now the weights' own module names are the targets
    (checked against this UNet) and a caller may refuse the recorded base."""
    import time

    from cav import api

    bb = backbone.load(tiny_model, "cpu")
    cfg = lora.lora_config("temporal", "cav", 2, 1.0, bb.family)
    lora.add_lora(bb.unet, "t_lora", cfg)
    out = lora.save_lora(bb.unet, "t_lora", cfg, tmp_path / "t_lora", {"kind": "temporal", "base": "/etc"})
    raw = json.loads((out / "adapter_config.json").read_text())
    raw["target_modules"] = "(?:" + "(?:.*)*" * 12 + ")x"  # hangs re.fullmatch on any name that does not end in x
    raw["rank_pattern"] = {"(a*)*b": 8}
    (out / "adapter_config.json").write_text(json.dumps(raw))
    bb2 = backbone.load(tiny_model, "cpu")
    t0 = time.time()
    lora.load_lora(bb2.unet, out, "again", expect_kind="temporal")
    assert time.time() - t0 < 10
    assert _adapted(bb2.unet, "again") == _adapted(bb.unet, "t_lora")  # the modules its weights name, nothing else
    # a weight naming a module this base does not have is refused
    state = load_file(str(out / "adapter_model.safetensors"))
    key = next(iter(state))
    from safetensors.torch import save_file

    save_file({**state, "nowhere.lora_A.weight": state[key].clone()}, str(out / "adapter_model.safetensors"))
    with pytest.raises(CavError, match=r"module nowhere is not one of its modules"):
        lora.load_lora(backbone.load(tiny_model, "cpu").unet, out, "x", expect_kind="temporal")
    # a rank that is not a number is refused before anything is built
    raw["r"] = "4; import os"
    (out / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(CavError, match="has no valid rank and alpha"):
        lora.load_lora(backbone.load(tiny_model, "cpu").unet, out, "x", expect_kind="temporal")
    # cav.json's base ("/etc" here) is not followed where the caller says adapters are data
    with pytest.raises(CavError, match=r"^no base model given"):
        api.generate("p", [(str(out), 1.0)], recorded=False, out=tmp_path / "o.mp4", steps=1, frames=4)
