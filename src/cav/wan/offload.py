"""Block swap (``--offload-frozen`` on a DiT): the frozen weights of each transformer block live on an offload
device (the CPU, pinned) and visit the compute device only for that block's forward and backward.

Forward: a pre-hook on block i brings it in, releases every other block, and starts copying block i + 1 (non-
blocking from pinned memory), so at most two blocks' frozen weights are on the device. Backward needs the frozen
weights again (a linear layer's input gradient is ``grad @ W``), and autograd would normally keep them alive by
saving them; so while a block runs forward, ``torch.autograd.graph.saved_tensors_hooks`` replace every saved
tensor that *is* one of the block's frozen weights (same storage) by a reference (block, tensor, view geometry).
Unpacking it in backward brings the block in again (releasing the others, prefetching block i − 1) and returns the
weight's view on the device. Activations are saved as usual. With gradient checkpointing (non-reentrant, as
diffusers runs it) the checkpoint's own hooks keep nothing and its recompute runs the block's forward again, so the
pre-hook brings the block in then and block swap adds no hooks of its own.

The trainable LoRA weights never move: they stay on the compute device with their gradients and AdamW states.
They are ~0.05 % of a block (rank 4), so moving them would save nothing, while moving a parameter under an
optimizer would leave its ``exp_avg`` / ``exp_avg_sq`` and its ``.grad`` on another device than the parameter.
Only tensors that do not require grad are swapped.

Copies go on the compute stream (non-blocking from pinned memory): the host does not wait, but a copy and the
previous block's kernels do not overlap; a side stream with events would hide the copy time fully (not done here).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _outer_hooks() -> bool:
    """Whether saved-tensor hooks are already active around this block, e.g. non-reentrant gradient checkpointing:
    its first pass keeps no tensor (weights included) and its recompute runs the block's forward again, bringing the
    block in, so block swap adds no hooks of its own there."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class BlockSwap:
    """Keep ``blocks``' frozen tensors on ``offload_device`` and bring each to ``compute_device`` for its use.
    ``recorder(event, block)`` sees ``in`` / ``out`` (a block's frozen tensors arrive / leave the compute device) and
    ``use`` (its forward starts, or backward unpacks one of its weights). Use as a context manager or
    ``attach()`` / ``detach()``; ``detach`` puts every frozen tensor back on the compute device."""

    def __init__(self, blocks: Sequence[torch.nn.Module], compute_device, offload_device="cpu",
                 recorder: Callable[[str, int], None] | None = None):
        self.blocks = list(blocks)
        self.compute, self.offload = torch.device(compute_device), torch.device(offload_device)
        self.recorder = recorder or (lambda event, i: None)
        self.pin = self.offload.type == "cpu" and self.compute.type == "cuda"
        self.resident: set[int] = set()
        self.peak = 0
        self._slots = [self._frozen(b) for b in self.blocks]  # per block: [(owner, attribute name, home tensor)]
        self._handles: list = []
        self._hooks: list = []
        self._last: int | None = None

    @staticmethod
    def _frozen(block: torch.nn.Module) -> list[list]:
        slots = []
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None and not p.requires_grad:
                    slots.append([module, name, None])
            for name, b in module._buffers.items():
                if b is not None:
                    slots.append([module, name, None])
        return slots

    # ------------------------------------------------------------------------------------------ moving tensors
    @staticmethod
    def _get(slot) -> torch.Tensor:
        module, name, _ = slot
        return module._parameters[name] if name in module._parameters else module._buffers[name]

    def _set(self, slot, tensor: torch.Tensor) -> None:
        module, name, _ = slot
        if name in module._parameters:
            module._parameters[name].data = tensor
        else:
            module._buffers[name] = tensor

    def bring(self, i: int) -> None:
        if i in self.resident or not 0 <= i < len(self.blocks):
            return
        for slot in self._slots[i]:
            self._set(slot, slot[2].to(self.compute, non_blocking=self.pin, copy=True))
        self.resident.add(i)
        self.peak = max(self.peak, len(self.resident))
        self.recorder("in", i)

    def release(self, i: int) -> None:
        if i not in self.resident:
            return
        for slot in self._slots[i]:
            self._set(slot, slot[2])  # frozen: the home copy is still exact, nothing to copy back
        self.resident.discard(i)
        self.recorder("out", i)

    def focus(self, i: int, prefetch: int) -> None:
        """Block ``i`` on the device, ``prefetch`` on its way, every other block released."""
        for j in list(self.resident):
            if j not in (i, prefetch):
                self.release(j)
        self.bring(i)
        self.bring(prefetch)

    # ------------------------------------------------------------------------------------------ hooks
    def _pack(self, i: int):
        def pack(t: torch.Tensor):
            if t.device == self.compute and i in self.resident:
                ptr = t.untyped_storage().data_ptr()
                for k, slot in enumerate(self._slots[i]):
                    if self._get(slot).untyped_storage().data_ptr() == ptr:
                        return ("frozen", i, k, t.size(), t.stride(), t.storage_offset())
            return t
        return pack

    def _unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "frozen"):
            return packed
        _, i, k, size, stride, offset = packed
        self.focus(i, i - 1)
        self._last = i
        self.recorder("use", i)
        return self._get(self._slots[i][k]).as_strided(size, stride, offset)

    def _pre(self, i: int):
        def hook(module, args, kwargs=None):
            step = -1 if self._last is not None and self._last > i else 1  # a recompute in backward runs downwards
            self._last = i
            self.focus(i, i + step)
            self.recorder("use", i)
            if torch.is_grad_enabled() and not _outer_hooks():
                ctx = torch.autograd.graph.saved_tensors_hooks(self._pack(i), self._unpack)
                ctx.__enter__()
                self._hooks.append(ctx)
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            if self._hooks:
                self._hooks.pop().__exit__(None, None, None)
        return hook

    def attach(self) -> "BlockSwap":
        for i, block in enumerate(self.blocks):
            for slot in self._slots[i]:
                t = self._get(slot).detach()
                home = t.to(self.offload, copy=True)
                slot[2] = home.pin_memory() if self.pin else home
                self._set(slot, slot[2])
            self._handles += [block.register_forward_pre_hook(self._pre(i), with_kwargs=True),
                              block.register_forward_hook(self._post(i), always_call=True)]
        self.resident.clear()
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in range(len(self.blocks)):
            for slot in self._slots[i]:
                self._set(slot, slot[2].to(self.compute, copy=True))
        self.resident.clear()

    def release_all(self) -> None:
        """After a step (backward leaves block 0 on the device): every block back to the offload device."""
        for i in list(self.resident):
            self.release(i)

    def __enter__(self) -> "BlockSwap":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def swap_transformer_blocks(transformer, compute_device, offload_device="cpu", recorder=None) -> BlockSwap:
    """Block swap on a ``WanTransformer3DModel``: its non-block parts (patch and condition embedders, output head,
    a few MB) and every LoRA weight go to the compute device; the blocks' frozen weights to the offload device."""
    for name, child in transformer.named_children():
        if name != "blocks":
            child.to(compute_device)
    for name, p in transformer.named_parameters(recurse=False):
        p.data = p.data.to(compute_device)
    for p in transformer.blocks.parameters():
        if p.requires_grad:
            p.data = p.data.to(compute_device)
    return BlockSwap(transformer.blocks, compute_device, offload_device, recorder).attach()


__all__ = ["BlockSwap", "swap_transformer_blocks"]
