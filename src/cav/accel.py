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
    if not enabled:  # the checkpointed forwards set below, wherever they are (a DiT has no down/mid/up blocks)
        for module in unet.modules():
            forward = module.__dict__.get("forward")
            if isinstance(forward, functools.partial) and forward.func is _checkpointed_forward:
                del module.__dict__["forward"]
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


COMPILE_SETTINGS = ("auto", "on", "off")


def wants_compile(setting: str, device: torch.device) -> bool:
    """``auto``: on where it was measured to pay. On CUDA the step is launch-bound (docs/PERFORMANCE.md: the GPU
    is busy ~109 ms of a ~300–360 ms step), which CUDA graphs remove; on the CPU the step is compute-bound and
    compiling costs minutes that short runs never win back (docs/PERFORMANCE.md, compiled vs eager rows)."""
    if setting not in COMPILE_SETTINGS:
        raise CavError(f"--compile must be one of {', '.join(COMPILE_SETTINGS)}, got '{setting}'")
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"


def compile_unet(unet: torch.nn.Module, device: torch.device | None = None, backend: str = "inductor") -> None:
    """Compile the UNet's forward in place as one graph (``fullgraph=True``: a graph break is an error, not a silent
    slowdown); on CUDA with CUDA graphs (``reduce-overhead``), which pay once shapes are fixed (cached inputs).
    ``uncompile_unet`` undoes it."""
    cuda = device is not None and device.type == "cuda"
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    # On the CPU, inductor's layout optimization turns the convolutions channels-last and pays a layout conversion
    # around each one: measured on the full-size ModelScope T-LoRA step (docs/PERFORMANCE.md), the compiled step
    # was 0.69x the eager one with it and 1.10x without it.
    options = {"layout_optimization": False} if not cuda and backend == "inductor" else None
    try:
        unet.forward = torch.compile(type(unet).forward.__get__(unet), fullgraph=True, backend=backend, mode=mode,
                                     options=options)
    except Exception as exc:  # no compiler toolchain, unsupported platform
        raise CavError(f"torch.compile is not available here ({type(exc).__name__}): pass --compile off") from None


def uncompile_unet(unet: torch.nn.Module) -> None:
    unet.__dict__.pop("forward", None)


def graph_breaks(unet: torch.nn.Module, *args, **kwargs) -> tuple[int, list[str]]:
    """Graph breaks torch.compile would make in ``unet(*args, **kwargs)`` as the model is configured now (adapters,
    lean forward, grad mode): ``torch._dynamo.explain`` traces it without compiling. Returns (count, reasons)."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(type(unet).forward.__get__(unet))(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return int(explained.graph_break_count), [str(b.reason)[:200] for b in explained.break_reasons]


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
