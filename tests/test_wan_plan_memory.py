"""The Wan memory estimate against measured tiny cases: weights, LoRA + AdamW, tokens, saved activations."""

import torch

from cav.adapters.lora import activate, lora_parameters
from cav.wan import memory, targets
from cav.wan.tiny import TinyWanSpec, build_components

SPEC = TinyWanSpec(heads=2, head_dim=16, layers=3, ffn_dim=64)


def _parts(dtype=torch.bfloat16):
    parts = build_components(SPEC)
    memory.to_compute_dtype(parts["transformer"], dtype)
    targets.add_motion_lora(parts["transformer"], "t_lora")
    activate(parts["transformer"], ["t_lora"], trainable="t_lora")
    return parts


def _estimate(parts, **kw):
    trainable = sum(p.numel() for p in lora_parameters(parts["transformer"], "t_lora"))
    base = {k: v for k, v in dict(parts["transformer"].config).items() if not k.startswith("_")}
    return memory.estimate(base, dict(parts["vae"].config), parts["text_encoder"].config.to_dict(),
                           frames=9, height=48, width=48, trainable_params=trainable, text_len=SPEC.max_length, **kw)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_weights_lora_and_text_encoder_bytes_are_the_real_models():
    parts = _parts()
    est = _estimate(parts)
    frozen = [p for n, p in parts["transformer"].named_parameters() if ".lora_" not in n]
    assert est["bytes"]["weights"] == _nbytes(frozen)  # bf16, fp32 where diffusers keeps it
    assert any(p.dtype == torch.float32 for p in frozen) and any(p.dtype == torch.bfloat16 for p in frozen)
    assert est["bytes"]["vae"] == 2 * sum(p.numel() for p in parts["vae"].parameters())
    assert est["text_encoder"] == 2 * sum(p.numel() for p in parts["text_encoder"].parameters())
    assert est["encode_phase"] == est["text_encoder"] + est["bytes"]["embeddings"]
    # LoRA: fp32 weight + gradient + AdamW's two states, measured after a real step
    lora = lora_parameters(parts["transformer"], "t_lora")
    opt = torch.optim.AdamW(lora)
    for p in lora:
        p.grad = torch.ones_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert est["bytes"]["lora"] == _nbytes(lora) + _nbytes([p.grad for p in lora]) + state


def test_tokens_are_the_patch_embedding_sequence():
    parts = _parts(torch.float32)
    latents = parts["vae"].encode(torch.zeros(1, 3, 9, 48, 48)).latent_dist.mode()
    seq = parts["transformer"].patch_embedding(latents).flatten(2).shape[-1]
    cfg = dict(parts["transformer"].config)
    assert memory.tokens(cfg, dict(parts["vae"].config), 9, 48, 48) == seq == 3 * 3 * 3


def test_offload_keeps_the_non_block_parts_and_two_blocks():
    parts = _parts()
    on, off = _estimate(parts, offload_frozen=True)["bytes"], _estimate(parts)["bytes"]
    model = parts["transformer"]
    block = _nbytes(p for n, p in model.blocks[0].named_parameters() if ".lora_" not in n)
    assert off["weights"] - on["weights"] == (len(model.blocks) - 2) * block
    two = _estimate(parts, offload_frozen=True, n_experts=2)["bytes"]["weights"]
    assert two - on["weights"] == off["weights"] - len(model.blocks) * block  # the idle expert: non-block parts


def test_activation_model_predicts_a_measured_step():
    """A size the fit never saw (3 blocks, width 32, ffn 64, 81 tokens): the model within 10 % of the measurement."""
    parts = _parts()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, SPEC.z_dim, 3, 6, 6, generator=g, dtype=torch.bfloat16)
    context = torch.randn(1, SPEC.max_length, SPEC.text_dim, generator=g, dtype=torch.bfloat16)
    got = memory.measure_activations(parts["transformer"], latents, torch.tensor([500.0]), context)
    assert got["total"] == got["blocks"] + got["outside"] and got["blocks"] > got["outside"] > 0
    cfg = dict(parts["transformer"].config)
    predicted = memory.activation_bytes(cfg, 3 * 3 * 3, SPEC.max_length)
    assert abs(predicted / got["total"] - 1) < 0.10, (predicted, got)
    # checkpointing: the checkpoint keeps each block's input (measured: blocks × tokens × width in bf16) and the
    # backward recomputes one block at a time (one block's share of the step measured above)
    ckpt = memory.measure_activations(parts["transformer"], latents, torch.tensor([500.0]), context,
                                      checkpointing=True)
    assert ckpt["blocks"] == 0 and ckpt["block_inputs"] == 3 * 27 * 32 * 2
    measured = ckpt["outside"] + ckpt["block_inputs"] + got["blocks"] / 3
    predicted = memory.activation_bytes(cfg, 27, SPEC.max_length, checkpointing=True)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)
    assert not parts["transformer"].gradient_checkpointing  # the measurement left the model as it was


def test_absorber_stage_is_sized_in_image_mode():
    """The absorber stage runs ``absorber_batch`` frames as 1-frame videos at the full size (crops are resized back):
    its activations are those of that many one-frame clips, its trainable part the absorbers'."""
    parts = _parts()
    est = _estimate(parts, absorber_batch=8, absorber_trainable_params=100)
    stage = est["absorber_stage"]
    cfg = dict(parts["transformer"].config)
    assert stage["tokens"] == 8 * memory.tokens(cfg, dict(parts["vae"].config), 1, 48, 48) == 8 * 9
    assert stage["bytes"]["activations"] == int(memory.activation_bytes(cfg, 72, 8 * SPEC.max_length))
    assert stage["bytes"]["lora"] == 100 * memory.ADAMW_BYTES
    assert est["train_peak"] == max(stage["total"], sum(est["bytes"].values()))
    assert "absorber_stage" not in _estimate(parts)


def test_estimate_is_a_printable_dict():
    import json

    est = _estimate(_parts(), checkpointing=True)
    assert json.loads(json.dumps(est)) == est
    assert est["peak"] == max(sum(p.values()) for p in est["phases"].values())
    assert est["train_peak"] == sum(est["bytes"].values())


def test_the_whole_step_peak_is_a_little_above_the_model():
    """torch.profiler's allocation peak of the step (transients and gradients included) vs the saved-tensor model:
    above it (the model counts what stays alive, not one op's scratch), by a fraction of one block."""
    parts = _parts()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, SPEC.z_dim, 3, 6, 6, generator=g, dtype=torch.bfloat16)
    context = torch.randn(1, SPEC.max_length, SPEC.text_dim, generator=g, dtype=torch.bfloat16)
    cfg = dict(parts["transformer"].config)
    for checkpointing in (False, True):
        peak = memory.measure_peak(parts["transformer"], latents, torch.tensor([500.0]), context,
                                   checkpointing=checkpointing)
        model = memory.activation_bytes(cfg, 27, SPEC.max_length, checkpointing=checkpointing)
        assert model < peak < model + memory.block_activation_bytes(cfg, 27, SPEC.max_length), (checkpointing, peak)


def test_merged_copies_are_what_frozen_merge_keeps():
    """The phases' ``merged_copies``: ``lean.FrozenMerge`` keeps a copy of each base weight it folds an adapter
    into, measured here on a tiny bf16 Wan (the S-LoRA folded under the T-LoRA, then the T-LoRA alone as sampling
    folds it) against ``plan.adapted_base_params``."""
    from cav import lean
    from cav.wan import plan

    model = build_components(SPEC)["transformer"]
    memory.to_compute_dtype(model, torch.bfloat16)
    targets.add_absorber_lora(model, "s_lora")
    targets.add_motion_lora(model, "t_lora")
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    base = plan.adapted_base_params(cfg)
    activate(model, ["s_lora", "t_lora"], trainable="t_lora")
    with lean.FrozenMerge(model, ["s_lora"]).merged() as merged:
        assert _nbytes(w for _, w in merged.saved) == 2 * base["s_lora"] > 0
    activate(model, ["t_lora"])
    with lean.FrozenMerge(model, lean.live_adapters(model)).merged() as merged:
        assert _nbytes(w for _, w in merged.saved) == 2 * base["t_lora"] > 0
    est = _estimate(_parts(), merged_params=base["s_lora"], sample_merged_params=base["t_lora"])
    assert est["phases"]["stage_2"]["merged_copies"] == 2 * base["s_lora"]
    assert est["phases"]["checkpoints"]["merged_copies"] == 2 * base["t_lora"]
    swapped = _estimate(_parts(), offload_frozen=True, merged_params=base["s_lora"], sample_merged_params=1)
    assert swapped["phases"]["stage_2"]["merged_copies"] == swapped["phases"]["checkpoints"]["merged_copies"] == 0
