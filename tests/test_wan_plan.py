"""Wan dry-run counts per stage (peft on the meta device) and the bad-input checks that need no weights."""

import pytest
import torch

from cav.adapters.lora import count_parameters
from cav.backbone import chosen_expert
from cav.errors import CavError
from cav.io_utils import save_safetensors
from cav.wan import checks, plan, published, targets
from cav.wan.tiny import TinyWanSpec, build_transformer

TINY = dict(build_transformer(TinyWanSpec(layers=3)).config)
SMALL = published.published("wan2.1-t2v-1.3b")["transformer"]


@pytest.mark.parametrize("placement", list(targets.PLACEMENTS))
def test_meta_counts_are_the_real_model_counts(placement):
    """The dry run (meta device) counts what a real model with the same adapters trains."""
    rows = {r["name"]: r for r in plan.stages(TINY, placement)}
    real = build_transformer(TinyWanSpec(layers=3))
    targets.add_absorber_lora(real, "s")
    heads = None
    if placement == "temporal-heads":
        heads = {b: list(range(TINY["num_attention_heads"])) for b in range(3)}
    targets.add_motion_lora(real, "t", placement, heads=heads)
    assert rows["s_lora"]["trainable_params"] == count_parameters(real, "s")
    assert rows["t_lora"]["trainable_params"] == count_parameters(real, "t")
    assert rows["t_lora"]["modules"] == sum(1 for m in real.modules() if "t" in getattr(m, "lora_A", {}))
    assert rows["prompt_vectors"]["trainable_params"] == 4 * TINY["text_dim"]
    assert ("upper_bound" in rows["t_lora"]) == (placement == "temporal-heads")


def test_wan21_small_counts_by_hand():
    """Wan 2.1 1.3B: width 1536, 30 blocks; a rank-r LoRA on a d×d projection has r·2d parameters."""
    rows = {r["name"]: r for r in plan.stages(SMALL, "cav")}
    assert rows["t_lora"] == {"name": "t_lora", "placement": "cav", "trainable_params": 30 * 4 * 4 * 2 * 1536,
                              "modules": 120}
    assert rows["s_lora"]["trainable_params"] == 30 * 8 * 1 * 2 * 1536 and rows["s_lora"]["modules"] == 240
    assert rows["prompt_vectors"]["trainable_params"] == 4 * 4096


def test_experts_rows_per_trained_expert():
    both = plan.stages(TINY, experts="both", n_experts=2, absorbers="both")
    assert [(r["name"], r.get("expert")) for r in both] == [
        ("s_lora", "transformer"), ("s_lora", "transformer_2"), ("prompt_vectors", None),
        ("t_lora", "transformer"), ("t_lora", "transformer_2")]
    default = plan.stages(TINY, n_experts=2, absorbers="s-lora")
    assert [(r["name"], r["expert"]) for r in default] == [("s_lora", "transformer"), ("t_lora", "transformer")]
    low = plan.stages(TINY, experts="low", n_experts=2, absorbers="none")
    assert [(r["name"], r["expert"]) for r in low] == [("t_lora", "transformer_2")]
    assert [r["name"] for r in plan.stages(TINY, absorbers_given=True)] == ["t_lora"]


# --------------------------------------------------------------------------------------------------- bad input
def test_experts_values_and_one_expert_base():
    assert chosen_expert(None, 2) == "high" and chosen_expert("both", 2) == "both"
    assert chosen_expert(None, 1) is None
    with pytest.raises(CavError, match=r"^--experts low needs a two-expert base \(Wan 2.2 T2V-A14B\), but this base "
                                       r"has one transformer: drop --experts$"):
        chosen_expert("low", 1)
    with pytest.raises(CavError, match=r"^--experts low needs a two-expert base \(Wan 2.2 T2V-A14B\), but base 'x' "
                                       r"has one transformer: drop --experts$"):
        chosen_expert("low", 1, "x")
    with pytest.raises(CavError, match=r"^--experts mid is not a choice: pass --experts high, low or both$"):
        chosen_expert("mid", 2)
    assert checks.experts_of({"transformer_2": [None, None]}) == 1
    assert checks.experts_of({"transformer_2": ["diffusers", "WanTransformer3DModel"]}) == 2
    assert checks.experts_of({}) == 1


def test_placement_motiondirector_tconv_on_a_dit():
    with pytest.raises(CavError, match=r"^placement 'motiondirector\+tconv' does not exist for Wan \(a DiT has no "
                                       r"temporal convolutions\): use one of cav, qk, motiondirector, temporal-heads$"):
        checks.check_placement("motiondirector+tconv")
    checks.check_placement("qk")


def test_frames_and_size_from_the_configs():
    vae21, vae22 = {}, {"scale_factor_spatial": 16, "scale_factor_temporal": 4}
    five_b = published.published("wan2.2-ti2v-5b")["transformer"]
    checks.check_clip(SMALL, vae21, 17, 480, 832)
    with pytest.raises(CavError, match=r"^--frames 16 does not fit Wan's VAE, which takes 4k\+1 frames: pass "
                                       r"--frames 13 or 17$"):
        checks.check_clip(SMALL, vae21, 16, 480, 832)
    with pytest.raises(CavError, match=r"^--size 720x1280 does not fit Wan: height and width must be multiples of 32 "
                                       r"\(patch 2 × VAE factor 16\): pass --size 704x1280 or --size 736x1280$"):
        checks.check_clip(five_b, vae22, 17, 720, 1280)
    with pytest.raises(CavError, match=r"^--size 8x840 does not fit Wan: .* multiples of 16 \(patch 2 × VAE factor "
                                       r"8\): "
                                       r"pass --size 16x832 or --size 16x848$"):
        checks.check_clip(SMALL, vae21, 17, 8, 840)
    checks.check_clip(five_b, vae22, 121, 704, 1280)


def _lora(path, width, blocks, base=None):
    tensors = {}
    for b in blocks:
        tensors[f"diffusion_model.blocks.{b}.self_attn.q.lora_A.weight"] = torch.zeros(4, width)
        tensors[f"diffusion_model.blocks.{b}.self_attn.q.lora_B.weight"] = torch.zeros(width, 4)
    return save_safetensors(path, tensors, metadata={"format": "pt", **({"cav_base": base} if base else {})})


def test_lora_of_another_wan(tmp_path):
    big = published.published("wan2.1-t2v-14b")["transformer"]
    a14b = published.published("wan2.2-t2v-a14b")["transformer"]
    lora14 = _lora(tmp_path / "w14.safetensors", 5120, range(40), "wan2.1-t2v-14b")
    checks.check_lora(lora14, big, "wan2.1-t2v-14b")
    with pytest.raises(CavError, match=r"^LoRA 'w14.safetensors' is for a Wan of width 5120 \(trained on "
                                       r"wan2.1-t2v-14b\), this base has width 1536 \(30 blocks\): use a LoRA trained "
                                       r"on this base size$"):
        checks.check_lora(lora14, SMALL, "wan2.1-t2v-1.3b")
    with pytest.raises(CavError, match=r"^LoRA 'w14.safetensors' was trained on wan2.1-t2v-14b, a Wan 2.1 base, but "
                                       r"this base is wan2.2-t2v-a14b \(Wan 2.2\): use a LoRA trained on a Wan 2.2 "
                                       r"base$"):
        checks.check_lora(lora14, a14b, "wan2.2-t2v-a14b")


def test_offload_without_gpu_is_a_no_op_with_a_warning():
    assert checks.offload_plan(False, "cpu") == (False, None)
    on, warning = checks.offload_plan(True, "cpu")
    assert not on and warning.startswith("--offload-frozen does nothing on the CPU")
    assert checks.offload_plan(True, "cuda") == (True, None)


def test_check_run_refuses_before_any_weight(tmp_path):
    lora = _lora(tmp_path / "small.safetensors", 1536, range(30), "wan2.1-t2v-1.3b")
    a14b = published.published("wan2.2-t2v-a14b")["transformer"]
    assert checks.check_run(a14b, {}, 2, frames=17, height=480, width=832) == "high"
    assert checks.check_run(SMALL, {}, 1, frames=17, height=480, width=832, lora_files=(lora, None),
                            base="wan2.1-t2v-1.3b") is None
    base = dict(transformer_config=SMALL, vae_config={}, n_experts=1, frames=17, height=480, width=832)
    for change, match in [(dict(placement="motiondirector+tconv"), "temporal convolutions"),
                          (dict(experts="both"), "two-expert base"), (dict(frames=8), r"4k\+1"),
                          (dict(width=840), "multiples of 16"),
                          (dict(transformer_config=a14b, n_experts=2, lora_files=(lora,), base="wan2.2-t2v-a14b"),
                           "width 1536")]:
        with pytest.raises(CavError, match=match):
            checks.check_run(**{**base, **change})


def test_dry_run_of_a_published_hub_id_offline():
    """The whole Wan dry run from the shipped files of a hub id (what api.plan will call once wired)."""
    from cav.wan import shipped

    hub = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    got = plan.dry_run(lambda name: shipped.read(hub, name), frames=17, height=480, width=832, device="cpu",
                       dtype="fp32", offload_frozen=True)
    assert got["n_experts"] == 1 and got["experts"] is None
    assert [r["name"] for r in got["stages"]] == ["s_lora", "prompt_vectors", "t_lora"]
    assert got["stages"][-1]["trainable_params"] == 1_474_560
    assert got["transformer_params"] == published.parameter_count("wan2.1-t2v-1.3b")
    assert got["warning"].startswith("--offload-frozen does nothing on the CPU") and not got["memory"]["offload_frozen"]
    assert got["memory"]["tokens"] == 5 * 30 * 52
    assert got["memory"]["absorber_stage"]["tokens"] == 4 * 30 * 52  # 4 frames per absorber step, image mode
    with pytest.raises(CavError, match="two-expert base"):
        plan.dry_run(lambda name: shipped.read(hub, name), frames=17, height=480, width=832, experts="high")


def test_the_dry_runs_memory_counts_block_swap_with_offload_frozen():
    """``--offload-frozen`` is block swap on Wan (``backbone.load(swap_blocks=True)``, for the whole run), so the dry
    run counts it on a GPU: in every phase of the run (load + text encoding, stage 1, stage 2, checkpoints) at most
    the non-block parts and two blocks are on the device, FrozenMerge's copies wait on the CPU, umT5 is there in
    the first phase only (released after it) and stage 2 runs with the VAE moved off; the peak is the largest phase. On a CPU nothing is swapped, said in the warning."""
    from cav.config import TrainConfig
    from cav.wan import memory, shipped

    hub = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    read = lambda name: shipped.read(hub, name)  # noqa: E731
    cfg = dict(prompt="p", frames=17, size=[480, 832], device="cuda", gradient_checkpointing="on")
    off, on = (plan.run_memory(TrainConfig.of(**cfg, offload_frozen=o), read) for o in (False, True))
    assert not off["offload_frozen"] and on["offload_frozen"] and "warning" not in on
    assert on["bytes"]["weights"] < off["bytes"]["weights"] / 10
    assert on["train_peak"] < off["train_peak"]
    assert list(on["phases"]) == list(off["phases"]) == list(memory.PHASES)
    for est in (on, off):
        assert all(p["weights"] == est["bytes"]["weights"] for k, p in est["phases"].items() if k != "text_encoding")
        assert est["peak"] == max(sum(p.values()) for p in est["phases"].values())
        assert est["gib"]["peak"] == max(est["gib"][k] for k in memory.PHASES)
        assert est["phases"]["text_encoding"]["text_encoder"] == est["text_encoder"]  # umT5: encodes, then released
        assert all("text_encoder" not in p for k, p in est["phases"].items() if k != "text_encoding")
    # umT5 encodes at load, before any block came in: with the swap only the non-block parts are on the device
    assert off["phases"]["text_encoding"]["weights"] == off["bytes"]["weights"]
    assert 0 < on["phases"]["text_encoding"]["weights"] < on["bytes"]["weights"]
    base = plan.adapted_base_params(read("transformer/config.json"))
    assert off["phases"]["stage_2"]["merged_copies"] == 2 * base["s_lora"] > 0  # the S-LoRA folded: bf16 copies
    assert off["phases"]["checkpoints"]["merged_copies"] == 2 * base["t_lora"] > 0  # the T-LoRA folded to sample
    assert on["phases"]["stage_2"]["merged_copies"] == on["phases"]["checkpoints"]["merged_copies"] == 0  # on the CPU
    assert "vae" not in on["phases"]["stage_2"]
    assert off["phases"]["stage_2"]["vae"] == off["bytes"]["vae"]  # without the flag the VAE stays
    assert on["peak"] < off["bytes"]["weights"] + off["text_encoder"]
    cpu = plan.run_memory(TrainConfig.of(**{**cfg, "device": "cpu"}, offload_frozen=True), read)
    assert not cpu["offload_frozen"] and cpu["warning"] == checks.offload_plan(True, "cpu")[1]
