"""The lean training step: same loss and gradients as the plain peft step (up to rounding), exact merge restore,
fp32 masters outside the step, and far fewer ops and casts (counted, not timed)."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet3DConditionModel

from cav import lean
from cav.adapters import lora
from cav.opcount import count_ops
from cav.bench.speed import TINY_UNET
from cav.families import UNET3D
from cav.objectives import DDPM
from cav.trainer import Stage, make_optimizer, train_step

S, T = "s", "t"


def _unet(dtype=torch.float32) -> UNet3DConditionModel:
    torch.manual_seed(0)
    unet = UNet3DConditionModel(**TINY_UNET).to(dtype)
    unet.requires_grad_(False)
    lora.add_lora(unet, T, lora.lora_config("temporal", "cav", 4, 1.0, UNET3D))
    lora.add_lora(unet, S, lora.lora_config("spatial", "cav", 1, 0.5, UNET3D))
    with torch.no_grad():  # B = 0 at init would hide both adapters
        for name in (S, T):
            for p in lora.lora_parameters(unet, name):
                p.normal_(0, 0.2)
    lora.activate(unet, [S, T], trainable=T)
    return unet


def _setup(unet, dtype, lean_step: bool):
    """A T-LoRA stage (S-LoRA frozen), plain or lean; returns step() → loss, the merge, the params, their grads."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 4, 3, 8, 8, generator=gen).to(dtype)
    cond = torch.randn(1, 5, 32, generator=gen).to(dtype)
    params = lora.lora_parameters(unet, T)
    stage = Stage(T, 1, [{"params": params, "lr": 1e-3}], batch=lambda g: (lat, cond), objective=DDPM)
    grads = []
    stage.after_backward.append(lambda: grads.append([p.grad.detach().float().clone() for p in params]))
    autocast = dtype if dtype != torch.float32 else None
    frozen = lean.FrozenMerge(unet, [S] if lean_step else [])
    if lean_step:
        lean.use_lean_step(stage, unet, T, autocast)
        optimizer = make_optimizer(stage)
    else:  # the step as it was: peft forward for both adapters, fp32 adapters cast per layer, for-loop AdamW
        optimizer = torch.optim.AdamW(stage.param_groups, weight_decay=0.0, foreach=False)

    def step():
        return train_step(unet, scheduler, stage, optimizer, gen, autocast_dtype=autocast).item()

    return step, frozen, params, grads


def _step(unet, dtype, lean_step: bool):
    """One step: the loss, the T-LoRA gradients and the weights after AdamW."""
    step, frozen, params, grads = _setup(unet, dtype, lean_step)
    with frozen.merged():
        loss = step()
    return loss, grads[0], [p.detach().clone() for p in params]


# fp32: only summation order differs (merged weights, addmm): 1e-5 relative. bf16 autocast: the merged bf16 weights
# round once more than the separate S-LoRA path, which moves a bf16 step by about its own rounding (2^-8 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-5, grad=1e-4, weights=1e-4),
             torch.bfloat16: dict(rtol=2e-2, grad=5e-2, weights=2.1e-3)}  # lr 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_gives_the_plain_step_loss_and_gradients(dtype):
    base = _unet(dtype)
    loss_a, grads_a, after_a = _step(copy.deepcopy(base), dtype, lean_step=False)
    loss_b, grads_b, after_b = _step(copy.deepcopy(base), dtype, lean_step=True)
    tol = TOLERANCE[dtype]
    assert loss_b == pytest.approx(loss_a, rel=tol["rtol"])
    assert len(grads_a) == len(grads_b) > 0
    num = sum((a - b).pow(2).sum() for a, b in zip(grads_a, grads_b)).sqrt()
    den = sum(a.pow(2).sum() for a in grads_a).sqrt()
    assert den > 0 and num / den < tol["grad"], float(num / den)
    for a, b in zip(after_a, after_b):  # AdamW's first step moves each weight by ±lr, the sign of its gradient:
        assert b.dtype == torch.float32  # an element whose gradient rounds across 0 may move the other way
        torch.testing.assert_close(a, b, rtol=0, atol=tol["weights"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_merge_restores_the_weights_bit_exactly(dtype):
    unet = _unet(dtype)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    x = torch.randn(1, 4, 2, 8, 8).to(dtype)
    cond = torch.randn(1, 5, 32).to(dtype)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=cond).sample.float()
        frozen = lean.FrozenMerge(unet, [S])
        with frozen.merged():
            layers = [m for m in unet.modules() if hasattr(m, "merged_adapters") and S in m.merged_adapters]
            assert layers and all(m.merged for m in layers)
            assert any(not torch.equal(before[n], p) for n, p in unet.named_parameters())
            merged = unet(x, 10, encoder_hidden_states=cond).sample.float()
            with frozen.unmerged():  # e.g. a checkpoint's validation samples
                assert all(torch.equal(before[n], p) for n, p in unet.named_parameters())
                again = unet(x, 10, encoder_hidden_states=cond).sample.float()
            assert frozen.is_merged
        assert not any(m.merged for m in layers)
    for n, p in unet.named_parameters():
        assert torch.equal(before[n], p), n
    assert torch.equal(plain, again)
    scale = plain.abs().max()
    assert (merged - plain).abs().max() <= (1e-5 if dtype == torch.float32 else 3e-2) * scale


def test_compute_copies_leave_fp32_masters_in_the_model_outside_a_step():
    unet = _unet(torch.bfloat16)
    masters = lora.lora_parameters(unet, T)
    stage = Stage(T, 1, [{"params": masters, "lr": 1e-3}], batch=lambda g: None, objective=DDPM)
    copies = lean.use_lean_step(stage, unet, T, torch.bfloat16)
    assert copies is not None and all(p.dtype == torch.float32 for p in masters)
    with stage.forward_backward_context():
        inside = lora.lora_parameters(unet, T)
        assert all(p.dtype == torch.bfloat16 for p in inside)
        assert all(torch.equal(c.float(), m.bfloat16().float()) for c, m in zip(inside, masters))
        assert all("forward" in m.__dict__ for m in unet.modules() if hasattr(m, "lora_A") and T in m.lora_A)
    assert all(a is b for a, b in zip(lora.lora_parameters(unet, T), masters))
    with pytest.raises(RuntimeError):  # an error inside a step (a non-finite loss, Ctrl-C) still puts them back
        with stage.forward_backward_context():
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(lora.lora_parameters(unet, T), masters))
    assert not any("forward" in m.__dict__ for m in unet.modules())
    no_copies = lean.use_lean_step(Stage(T, 1, [], batch=None, objective=DDPM), unet, T, None)
    assert no_copies is None  # fp32 step: no copies


def test_lean_step_dispatches_fewer_ops_and_almost_no_casts():
    counts = {}
    for lean_step in (False, True):
        unet = _unet(torch.bfloat16)
        step, frozen, _, _ = _setup(unet, torch.bfloat16, lean_step)
        with frozen.merged():
            step()  # AdamW creates its state on the first step
            counts[lean_step] = count_ops(step)
    plain, lean_ = counts[False], counts[True]
    assert plain.cast_ops["_to_copy"] > 200  # the S-LoRA and T-LoRA casts, per layer per step
    assert lean_.casts <= 0.1 * plain.casts
    assert lean_.total <= 0.7 * plain.total


def test_frozen_merge_folds_every_s_lora_layer_of_a_wan_transformer():
    """On Wan the T-LoRA shares each ``attn1`` projection with the S-LoRA (8 of the tiny model's 16 S-LoRA layers):
    every S-LoRA layer is folded all the same, the T-LoRA keeps running beside it (fused by the lean forward), the
    output and the T-LoRA's gradients equal the unmerged model's to float tolerance, and restore is bit-exact."""
    from cav.families import WAN
    from cav.wan.tiny import TinyWanSpec, build_transformer

    model = build_transformer(TinyWanSpec())
    model.requires_grad_(False)
    lora.add_lora(model, T, lora.lora_config("temporal", "cav", 4, 1.0, WAN))
    lora.add_lora(model, S, lora.lora_config("spatial", "cav", 1, 0.5, WAN))
    with torch.no_grad():
        for name in (S, T):
            for p in lora.lora_parameters(model, name):
                p.normal_(0, 0.2)
    lora.activate(model, [S, T], trainable=T)
    s_layers = [m for m in model.modules() if hasattr(m, "lora_A") and S in m.lora_A]
    shared = [m for m in s_layers if T in m.lora_A]
    assert len(s_layers) == 16 and len(shared) == 8  # 2 blocks × (attn1 + attn2) × q/k/v/o; attn1's carry both
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 3, 4, 4, generator=gen), torch.randn(1, 5, 16, generator=gen)
    t = torch.tensor([500.0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = lora.lora_parameters(model, T)

    def run():
        out = model(x, t, encoder_hidden_states=cond).sample
        grads = torch.autograd.grad(out.pow(2).mean(), params)
        return out.detach(), grads

    plain, plain_grads = run()
    frozen = lean.FrozenMerge(model, [S])
    with frozen.merged():
        assert len(frozen.folded) == len(s_layers) == 16
        assert all(S not in m.active_adapters and T in m.active_adapters for m in shared)
        merged, merged_grads = run()
        with lean.LeanForward(model, T).active():
            assert all("forward" in vars(m) for m in shared)  # the T-LoRA alone is live there: fused
            fused, _ = run()
    assert all(S in m.active_adapters for m in shared) and not frozen.is_merged and not frozen.folded
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p), n
    again, _ = run()
    assert torch.equal(plain, again)
    scale = plain.abs().max()
    assert (merged - plain).abs().max() <= 1e-5 * scale and (fused - plain).abs().max() <= 1e-5 * scale
    for a, b in zip(plain_grads, merged_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    lora.activate(model, [T], trainable=T)  # the S-LoRA matters: without it the output moves (so folding it counts)
    with torch.no_grad():
        assert (model(x, t, encoder_hidden_states=cond).sample - plain).abs().max() > 1e-3 * scale
