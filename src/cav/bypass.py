"""Temporal bypass: make every temporal layer of a T2V UNet an identity, so the T2V UNet acts as a T2I UNet.

In ModelScope-style UNets the temporal layers are residual (``x + f(x)``); the paper (supp. A.1) trains the
appearance absorbers with them bypassed. AnimateDiff's motion modules are residual too, so a bypassed
``UNetMotionModel`` *is* the Stable Diffusion image UNet it was built from. Stock diffusers still runs these layers
for a single frame, so this is ours.

``TEMPORAL_LAYERS`` has one row per temporal layer class of each family (see ``backbone.FAMILIES``): the class and
what its forward returns when bypassed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel, TransformerTemporalModelOutput
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D


def _identity_output(hidden_states, *args, return_dict: bool = True, **kwargs):
    return TransformerTemporalModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def _identity_tensor(hidden_states, *args, **kwargs):
    return hidden_states


TEMPORAL_LAYERS = {
    # unet3d: transformer_in, temp_attentions.* (return an output object), temp_convs.* (return a tensor)
    TransformerTemporalModel: _identity_output,
    TemporalConvLayer: _identity_tensor,
    # animatediff: the motion modules (down/mid/up ``motion_modules.*``), which return a tensor
    AnimateDiffTransformer3D: _identity_tensor,
}


def _bypassed_forward(module: torch.nn.Module):
    return next((fn for cls, fn in TEMPORAL_LAYERS.items() if isinstance(module, cls)), None)


def temporal_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every temporal layer of the UNet (any family's), by name."""
    return [(n, m) for n, m in unet.named_modules() if _bypassed_forward(m) is not None]


@contextmanager
def temporal_bypass(unet: torch.nn.Module, enabled: bool = True):
    """Inside the context all temporal layers return their input; on exit the model is exactly as before."""
    if not enabled:
        yield unet
        return
    patched = []
    try:
        for _, module in temporal_modules(unet):
            module.forward = _bypassed_forward(module)  # instance attribute shadows the class method
            patched.append(module)
        yield unet
    finally:
        for module in patched:
            del module.forward
