"""Wan's flow-matching objective and flow inversion."""

import pytest
import torch

from cav.wan.flow import FlowObjective, invert, sample, shift_sigmas
from cav.wan.tiny import TinyWanSpec, build_transformer

SPEC = TinyWanSpec()


def test_shift_matches_diffusers_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 5.0).tolist() == [0.0, 1.0]
    training = FlowMatchEulerDiscreteScheduler(shift=5.0).sigmas  # its training sigmas: shifted 1000/1000 … 1/1000
    assert torch.allclose(shift_sigmas(torch.arange(1000, 0, -1) / 1000, 5.0), training, atol=1e-6)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc.set_timesteps(10)  # Wan's published sampler: its grid lies on the same shifted curve
    u = unipc.sigmas[:-1] / (3.0 - 2.0 * unipc.sigmas[:-1])  # the shift's inverse
    assert torch.allclose(shift_sigmas(u, 3.0), unipc.sigmas[:-1], atol=1e-6) and (u[:-1] - u[1:]).std() < 1e-3


def test_sampled_sigmas_lean_to_noise_with_shift():
    g = torch.Generator().manual_seed(0)
    plain = FlowObjective(shift=1.0).sample_sigmas(4000, generator=g)
    shifted = FlowObjective(shift=3.0).sample_sigmas(4000, generator=torch.Generator().manual_seed(0))
    assert ((plain >= 0) & (plain <= 1)).all() and ((shifted >= 0) & (shifted <= 1)).all()
    assert abs(plain.mean().item() - 0.5) < 0.02
    assert shifted.mean().item() > plain.mean().item() + 0.15
    assert torch.allclose(shifted, shift_sigmas(plain, 3.0))  # same draws u, then the shift
    ln = FlowObjective(weighting="logit_normal", shift=1.0).sample_sigmas(4000, generator=g)
    assert abs(ln.median().item() - 0.5) < 0.03 and ln.std() < plain.std()
    with pytest.raises(ValueError):
        FlowObjective(weighting="cosine")


def test_noisy_target_and_sampler_are_one_convention():
    """An oracle that returns the true velocity ε − x₀ makes one Euler step from any σ land exactly on x₀."""
    obj = FlowObjective()
    x0, eps = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    sigmas = torch.tensor([0.9, 0.3])
    xt = obj.noisy(x0, eps, sigmas)
    assert torch.allclose(xt[0], 0.1 * x0[0] + 0.9 * eps[0]) and torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    oracle = lambda x, t: obj.target(x0, eps)  # noqa: E731
    for grid in (torch.tensor([0.9, 0.0]), obj.sigma_grid(5)):
        start = obj.noisy(x0, eps, grid[:1].expand(2))
        assert torch.allclose(sample(oracle, start, grid), x0, atol=1e-5)
    pred = obj.target(x0, eps).requires_grad_()
    assert obj.loss(pred, x0, eps).item() == 0.0
    (obj.loss(pred + 1.0, x0, eps)).backward()
    assert pred.grad is not None and obj.loss(pred.detach() + 1.0, x0, eps).item() == pytest.approx(1.0)


def test_euler_sampler_equals_stock_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    obj = FlowObjective(shift=3.0)
    velocity = lambda x, t: torch.sin(x) * (t[:, None, None, None, None] / 1000)  # noqa: E731
    noise = torch.randn(1, 4, 2, 3, 3)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x = noise
    for t in sched.timesteps:
        x = sched.step(velocity(x, t.expand(1)), t, x, return_dict=False)[0]
    assert torch.allclose(sample(velocity, noise, obj.sigma_grid(6)), x, atol=1e-6)


@torch.no_grad()
def test_flow_inversion_then_sampling_reconstructs_latents():
    wan = build_transformer(SPEC).eval()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, SPEC.z_dim, 3, 4, 4, generator=g)
    ctx = torch.randn(1, 8, SPEC.text_dim, generator=g)
    velocity = lambda x, t: wan(x, t, ctx, return_dict=False)[0]  # noqa: E731
    obj = FlowObjective(shift=3.0)
    errors = {}
    for steps in (25, 50):
        grid = obj.sigma_grid(steps)
        noise = invert(velocity, x0, grid)
        errors[steps] = ((sample(velocity, noise, grid) - x0).norm() / x0.norm()).item()
    assert 0.8 < noise.std() < 1.3  # inversion lands on something noise-sized
    assert errors[50] < 0.02  # measured 0.92 % (notes)
    assert errors[50] < 0.6 * errors[25]  # first-order: the residual is Euler's discretisation error


def test_image_mode_loss_draws_one_sigma_per_frame_and_trains_the_absorber():
    from cav.adapters.lora import activate, lora_parameters
    from cav.wan.flow import transformer_loss
    from cav.wan.image_mode import fold_frames, image_mode_forward
    from cav.wan.targets import add_absorber_lora

    wan = build_transformer(SPEC)
    obj = FlowObjective(shift=3.0)
    x0 = torch.randn(2, SPEC.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(2, 6, SPEC.text_dim)
    # the same draws by hand: noise for the folded batch, then one σ per frame (2 clips × 3 frames)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(6, SPEC.z_dim, 1, 4, 4, generator=g)
    sigmas = obj.sample_sigmas(6, generator=g)
    noise_clip = noise[:, :, 0].reshape(2, 3, SPEC.z_dim, 4, 4).permute(0, 2, 1, 3, 4)
    s = sigmas.reshape(2, 1, 3, 1, 1)
    noisy = (1 - s) * x0 + s * noise_clip
    with torch.no_grad():
        # image_mode_forward takes one timestep per clip: run each σ's frames through it with that σ
        pred = torch.stack([image_mode_forward(wan, noisy[b:b + 1, :, f:f + 1], obj.timesteps(sigmas[3 * b + f:][:1]),
                                               ctx[b:b + 1])[0, :, 0] for b in range(2) for f in range(3)])
        by_hand = torch.nn.functional.mse_loss(pred, (noise - fold_frames(x0))[:, :, 0])
        ours = transformer_loss(wan, x0, ctx, obj, torch.Generator().manual_seed(7), image_mode=True)
    assert ours.item() == pytest.approx(by_hand.item(), rel=1e-5)

    add_absorber_lora(wan, "s_lora")
    activate(wan, ["s_lora"], trainable="s_lora")
    opt = torch.optim.AdamW(lora_parameters(wan, "s_lora"), lr=3e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = transformer_loss(wan, x0, ctx, obj, torch.Generator().manual_seed(7), image_mode=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # same draws each step: the absorber fits them


def test_frame_difference_loss_ignores_what_every_frame_shares():
    obj = FlowObjective()
    x0, eps = torch.randn(2, 4, 5, 3, 3), torch.randn(2, 4, 5, 3, 3)
    target = obj.target(x0, eps)
    static_error = torch.randn(2, 4, 1, 3, 3).expand_as(target)  # the same wrong appearance in every frame
    assert obj.frame_difference_loss(target + static_error, x0, eps).item() < 1e-10
    assert obj.loss(target + static_error, x0, eps).item() > 0.1
    moving_error = torch.zeros_like(target)
    moving_error[:, :, 2] = 1.0
    # one frame off by 1 in all 4·3·3 entries: two of the four differences are off by ±1
    assert obj.frame_difference_loss(target + moving_error, x0, eps).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        obj.frame_difference_loss(target[:, :, :1], x0[:, :, :1], eps[:, :, :1])
