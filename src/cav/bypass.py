"""Temporal bypass: make every temporal layer of a T2V UNet an identity, so the T2V UNet acts as a T2I UNet.

In ModelScope-style UNets the temporal layers are residual (``x + f(x)``); the paper (supp. A.1) trains the
appearance absorbers with them bypassed. AnimateDiff's motion modules are residual too, so a bypassed
``UNetMotionModel`` *is* the Stable Diffusion image UNet it was built from. Stock diffusers still runs these layers
for a single frame, so this is ours.

This is the mechanism of a UNet family's *image mode* (``families.Family.image_mode``): a ``LayerBypass`` lists
the family's temporal layer classes and what each one's forward returns when bypassed (``output``: diffusers'
``TransformerTemporalModelOutput``; ``tensor``: the input itself).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch


def _identity_output(hidden_states, *args, return_dict: bool = True, **kwargs):
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

    return TransformerTemporalModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def _identity_tensor(hidden_states, *args, **kwargs):
    return hidden_states


IDENTITIES = {"output": _identity_output, "tensor": _identity_tensor}  # what a bypassed layer returns


@cache
def _class(path: str) -> type:
    """``module:Class`` → the class (imported on first use, so rows name diffusers classes without importing it)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class LayerBypass:
    """Image mode by bypassing layers: ``layers`` are (``module:Class``, what its bypassed forward returns)."""

    layers: tuple[tuple[str, str], ...]

    def _bypassed_forward(self, module: torch.nn.Module):
        return next((IDENTITIES[kind] for cls, kind in self.layers if isinstance(module, _class(cls))), None)

    def modules(self, unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Every temporal layer of the UNet, by name."""
        return [(n, m) for n, m in unet.named_modules() if self._bypassed_forward(m) is not None]

    @contextmanager
    def __call__(self, unet: torch.nn.Module, enabled: bool = True):
        """Inside the context all temporal layers return their input; on exit the model is exactly as before."""
        if not enabled:
            yield unet
            return
        patched = []
        try:
            for _, module in self.modules(unet):
                module.forward = self._bypassed_forward(module)  # instance attribute shadows the class method
                patched.append(module)
            yield unet
        finally:
            for module in patched:
                del module.forward
