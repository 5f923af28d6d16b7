"""Temporal bypass: make every temporal layer of a UNet3D an identity, so the T2V UNet acts as a T2I UNet.

In ModelScope-style UNets the temporal layers are residual (``x + f(x)``); the paper (supp. A.1) trains the
appearance absorbers with them bypassed. Stock diffusers still runs them for a single frame, so this is ours.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel, TransformerTemporalModelOutput


def _identity_temporal_transformer(hidden_states, *args, return_dict: bool = True, **kwargs):
    return TransformerTemporalModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def _identity_temporal_conv(hidden_states, *args, **kwargs):
    return hidden_states


def temporal_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``transformer_in``, every ``temp_attentions.*`` and every ``temp_convs.*`` module, by name."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, (TransformerTemporalModel, TemporalConvLayer))]


@contextmanager
def temporal_bypass(unet: torch.nn.Module, enabled: bool = True):
    """Inside the context all temporal layers return their input; on exit the model is exactly as before."""
    if not enabled:
        yield unet
        return
    patched = []
    try:
        for _, module in temporal_modules(unet):
            fn = _identity_temporal_conv if isinstance(module, TemporalConvLayer) else _identity_temporal_transformer
            module.forward = fn  # instance attribute shadows the class method
            patched.append(module)
        yield unet
    finally:
        for module in patched:
            del module.forward
