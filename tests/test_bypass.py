import torch

from cav import backbone
from cav.families import UNET3D

temporal_bypass, temporal_modules = UNET3D.image_mode, UNET3D.image_mode.modules


def _inputs(unet, frames, batch=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, unet.config.in_channels, frames, 8, 8, generator=g)
    cond = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g)
    return x, cond


def test_bypass_makes_frames_independent(tiny_model):
    unet = backbone.load(tiny_model, "cpu").unet
    x, cond = _inputs(unet, frames=4)
    with torch.no_grad(), temporal_bypass(unet):
        together = unet(x, 10, encoder_hidden_states=cond).sample
        separate = torch.cat([unet(x[:, :, i:i + 1], 10, encoder_hidden_states=cond).sample for i in range(4)], dim=2)
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)


def test_bypass_removes_temporal_layers_and_restores_bit_for_bit(tiny_model):
    unet = backbone.load(tiny_model, "cpu").unet
    # give the temporal layers non-trivial weights (their output projections start at zero in diffusers)
    with torch.no_grad():
        for _, m in temporal_modules(unet):
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    names = {n.split(".")[0] if n == "transformer_in" else n.split(".")[2] for n, _ in temporal_modules(unet)}
    assert {"transformer_in", "temp_attentions", "temp_convs"} <= names
    x, cond = _inputs(unet, frames=4)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=cond).sample
        with temporal_bypass(unet):
            bypassed = unet(x, 10, encoder_hidden_states=cond).sample
            single = unet(x[:, :, :1], 10, encoder_hidden_states=cond).sample
        after = unet(x, 10, encoder_hidden_states=cond).sample
        stock_single = unet(x[:, :, :1], 10, encoder_hidden_states=cond).sample
    assert not torch.allclose(before, bypassed, atol=1e-4)
    # stock diffusers still runs temporal layers on one frame; bypass does not
    assert not torch.allclose(single, stock_single, atol=1e-5)
    assert torch.equal(before, after)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, state_before[k])
    assert all("forward" not in vars(m) for _, m in temporal_modules(unet))


def test_bypass_restores_after_exception(tiny_model):
    unet = backbone.load(tiny_model, "cpu").unet
    try:
        with temporal_bypass(unet):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all("forward" not in vars(m) for _, m in temporal_modules(unet))
