"""Speed and memory switches for training: gradient checkpointing, frozen-module offload, torch.compile."""

from __future__ import annotations

import functools

import torch

from .errors import CavError


def _checkpointed_forward(module, *args, **kwargs):
    cls_forward = type(module).forward
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(cls_forward, module, *args, use_reentrant=False, **kwargs)
    return cls_forward(module, *args, **kwargs)


def _unet_blocks(unet) -> list[torch.nn.Module]:
    return list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)


def set_gradient_checkpointing(unet, enabled: bool) -> str:
    """Turn activation checkpointing on/off; returns how it is done.

    diffusers' ``UNet3DConditionModel`` declares no gradient-checkpointing support (``enable_gradient_checkpointing``
    raises, and its 3D blocks ignore the flag), so where that happens every down/mid/up block runs under
    non-reentrant ``torch.utils.checkpoint`` (inputs saved, block recomputed in backward)."""
    if not enabled:
        for block in _unet_blocks(unet):
            block.__dict__.pop("forward", None)
        if getattr(unet, "_supports_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        return "off"
    try:
        unet.enable_gradient_checkpointing()
        return "diffusers enable_gradient_checkpointing()"
    except ValueError:
        for block in _unet_blocks(unet):
            block.forward = functools.partial(_checkpointed_forward, block)
        return ("torch.utils.checkpoint (non-reentrant) around each down/mid/up block (diffusers' "
                "UNet3DConditionModel does not support enable_gradient_checkpointing)")


def wants_checkpointing(setting: str, device: torch.device) -> bool:
    """``auto``: on for GPUs with less than 16 GB, where the paper's 256x256x16 step would not fit otherwise."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < 16 * 1024**3


def tune_backends(device: torch.device) -> None:
    """On CUDA let cuDNN time its convolution algorithms once per shape (training shapes never change) and allow
    TF32 for the fp32 matmuls that autocast leaves in fp32. Nothing to do on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_unet(unet: torch.nn.Module) -> None:
    """Compile the UNet's forward in place (``torch.compile``); one clear error if the platform cannot."""
    try:
        unet.forward = torch.compile(unet.forward)
    except Exception as exc:  # no compiler toolchain, unsupported platform
        raise CavError(f"torch.compile is not available here ({type(exc).__name__}): drop --compile") from None


def offload(*modules: torch.nn.Module) -> None:
    """Move frozen modules (VAE, text encoder) to the CPU while the training loop does not need them."""
    for m in modules:
        m.to("cpu")


class on_device:
    """Context manager: bring ``modules`` to ``device`` for a while (e.g. validation), then back where they were."""

    def __init__(self, device: torch.device, *modules: torch.nn.Module):
        self.device, self.modules = device, modules
        self.homes = [next(m.parameters()).device for m in modules]

    def __enter__(self):
        for m in self.modules:
            m.to(self.device)

    def __exit__(self, *exc):
        for m, home in zip(self.modules, self.homes):
            m.to(home)
