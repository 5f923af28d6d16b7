"""Block swap (``--offload-frozen`` on a DiT): the frozen base weights of each transformer block live on an offload
device (the CPU, pinned) and visit the compute device only for that block's use.

Forward: a pre-hook on block i brings it in, releases every other block, and starts copying block i + 1 (non-
blocking from pinned memory), so at most two blocks' frozen weights are on the device. Backward needs the frozen
weights again (a linear layer's input gradient is ``grad @ W``), and autograd would normally keep them alive by
saving them; so while a block runs forward, ``torch.autograd.graph.saved_tensors_hooks`` replace every saved
tensor that *is* one of the block's frozen weights (same storage) by a reference (block, tensor, view geometry).
Unpacking it in backward brings the block in again (releasing the others, prefetching block i − 1) and returns the
weight's view on the device. Activations are saved as usual. With gradient checkpointing (non-reentrant, as
diffusers runs it) the checkpoint's own hooks keep nothing and its recompute runs the block's forward again, so the
pre-hook brings the block in then and block swap adds no hooks of its own.

What is swapped: each block's base weights and buffers, as they are when the swap is made (at load, before any
adapter exists). Adapter weights (peft's ``lora_*``, trainable or frozen) never move: they stay on the compute
device with their gradients and AdamW states. They are ~0.05 % of a block (rank 4), so moving them would save
nothing, while moving a parameter under an optimizer would leave its ``exp_avg`` / ``exp_avg_sq`` and its ``.grad``
on another device than the parameter. A model that gains adapters while swapped must have them placed on the compute
device (``adapters.lora.add_lora(device=...)``; peft would put them beside the resting base weights).

The swap stays attached for a whole run, from load to the end: nothing puts every block back on the device. Changing
a frozen weight (``lean.FrozenMerge`` folding a LoRA in, or restoring it) goes through ``edit``: the block comes in,
the change is made on the compute device (the same arithmetic as without the swap), and the changed tensors are
written back to their home copies before the block leaves again.

``Residency`` is the ledger of the swaps of one model (both experts of Wan 2.2 A14B share one): which blocks are on
the compute device now and the most there ever were at once (``peak``); bringing a block in releases the other
swaps' blocks, so ``budget`` (two blocks) holds for the model as a whole. ``detach`` (every block back on the device,
for code that wants the model whole again) is recorded there too.

Copies go on the compute stream (non-blocking from pinned memory): the host does not wait, but a copy and the
previous block's kernels do not overlap; a side stream with events would hide the copy time fully (not done here).
The compute and offload devices may be the same (the CPU): the swap then still makes its copies and keeps its
ledger, which is how the CPU tests check the code path a GPU runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch

BUDGET = 2  # blocks on the compute device at once: the one running and the one being fetched
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _outer_hooks() -> bool:
    """Whether saved-tensor hooks are already active around this block, e.g. non-reentrant gradient checkpointing:
    its first pass keeps no tensor (weights included) and its recompute runs the block's forward again, bringing the
    block in, so block swap adds no hooks of its own there."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def is_adapter(name: str) -> bool:
    """Whether a parameter name (``attn1.to_q.lora_A.t_lora.weight``) is a peft adapter's weight."""
    return any(part in ADAPTER_PARTS for part in name.split("."))


class Residency:
    """The ledger of every ``BlockSwap`` of one model: ``resident`` (swap name → blocks on the compute device now),
    ``peak`` (the most blocks there at once since it was made), ``budget`` (what the swaps keep to)."""

    def __init__(self, budget: int = BUDGET):
        self.budget = budget
        self.swaps: list["BlockSwap"] = []
        self.peak = 0

    @property
    def resident(self) -> dict[str, set[int]]:
        return {s.name: set(s.resident) for s in self.swaps}

    @property
    def count(self) -> int:
        return sum(len(s.resident) for s in self.swaps)

    @property
    def blocks(self) -> int:
        return sum(len(s.blocks) for s in self.swaps)

    def noted(self) -> None:
        self.peak = max(self.peak, self.count)

    def make_room(self, swap: "BlockSwap") -> None:
        """Before ``swap`` brings a block in: every other swap's blocks leave."""
        for other in self.swaps:
            if other is not swap:
                other.release_all()

    def record(self) -> dict:
        """What a run reports (``summary.json``): blocks swapped, the budget, the most on the device at once."""
        return {"blocks": self.blocks, "budget": self.budget, "peak_blocks_on_device": self.peak}


class BlockSwap:
    """Keep ``blocks``' base weights and buffers on ``offload_device`` and bring each to ``compute_device`` for its
    use. ``recorder(event, block)`` sees ``in`` / ``out`` (a block's frozen tensors arrive / leave the compute device)
    and ``use`` (its forward starts, or backward unpacks one of its weights). ``residency``: the ledger shared with
    the model's other swaps (a new one if None). Use as a context manager or ``attach()`` / ``detach()``; ``detach``
    puts every frozen tensor back on the compute device."""

    def __init__(self, blocks: Sequence[torch.nn.Module], compute_device, offload_device="cpu",
                 recorder: Callable[[str, int], None] | None = None, residency: Residency | None = None,
                 name: str = "blocks"):
        self.blocks = list(blocks)
        self.compute, self.offload = torch.device(compute_device), torch.device(offload_device)
        self.recorder = recorder or (lambda event, i: None)
        self.pin = self.offload.type == "cpu" and self.compute.type == "cuda"
        self.residency = residency if residency is not None else Residency()
        self.residency.swaps.append(self)
        self.name = name
        self.resident: set[int] = set()
        self.peak = 0
        self._slots = [self._frozen(b) for b in self.blocks]  # per block: [(owner, attribute name, home tensor)]
        self._handles: list = []
        self._hooks: list = []
        self._last: int | None = None

    @staticmethod
    def _frozen(block: torch.nn.Module) -> list[list]:
        slots = []
        for prefix, module in block.named_modules():
            if is_adapter(prefix):
                continue
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
        self.residency.noted()
        self.recorder("in", i)

    def release(self, i: int) -> None:
        if i not in self.resident:
            return
        for slot in self._slots[i]:
            self._set(slot, slot[2])  # frozen: the home copy is still exact, nothing to copy back
        self.resident.discard(i)
        self.recorder("out", i)

    def focus(self, i: int, prefetch: int | None) -> None:
        """Block ``i`` on the device, ``prefetch`` on its way, every other block (any swap's) released."""
        self.residency.make_room(self)
        for j in list(self.resident):
            if j not in (i, prefetch):
                self.release(j)
        self.bring(i)
        if prefetch is not None:
            self.bring(prefetch)

    def on_device(self) -> set[int]:
        """The blocks whose frozen tensors are not their home copies now, read from the tensors themselves (not from
        the bookkeeping): what a test checks the ledger against."""
        return {i for i, slots in enumerate(self._slots)
                if any(self._get(s).untyped_storage().data_ptr() != s[2].untyped_storage().data_ptr() for s in slots)}

    @contextlib.contextmanager
    def edit(self, i: int, modules: Iterable[torch.nn.Module]):
        """Block ``i`` on the compute device inside, to change frozen tensors of ``modules`` (modules of that block,
        e.g. the base layers a LoRA folds into) in place there; on a clean exit those tensors are written back to
        their home copies, then the block leaves."""
        owners = {id(m) for m in modules}
        self.focus(i, None)
        try:
            yield
            with torch.no_grad():
                for slot in self._slots[i]:
                    if id(slot[0]) in owners:
                        slot[2].copy_(self._get(slot))
        finally:
            self.release(i)

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
        """Home copies of the frozen tensors on the offload device (a tensor already there is its own home copy, or
        its pinned copy for a GPU: loading onto the CPU and swapping keeps one copy of the blocks) and the hooks on."""
        for i, block in enumerate(self.blocks):
            for slot in self._slots[i]:
                t = self._get(slot).detach()
                home = t if t.device == self.offload else t.to(self.offload, copy=True)
                home = home.pin_memory() if self.pin else home  # one pinned copy; the loaded tensor is then freed
                slot[2] = home
                self._set(slot, slot[2])
            self._handles += [block.register_forward_pre_hook(self._pre(i), with_kwargs=True),
                              block.register_forward_hook(self._post(i), always_call=True)]
        self.resident.clear()
        return self

    def detach(self) -> None:
        """Hooks off and every block on the compute device (the ledger counts them all there)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in range(len(self.blocks)):
            for slot in self._slots[i]:
                self._set(slot, slot[2].to(self.compute, copy=True))
            if i not in self.resident:
                self.resident.add(i)
                self.recorder("in", i)
        self.peak = max(self.peak, len(self.resident))
        self.residency.noted()
        self.resident.clear()
        self.residency.swaps.remove(self)

    def release_all(self) -> None:
        """Every block back to the offload device (e.g. after a step: backward leaves block 0 on the device)."""
        for i in list(self.resident):
            self.release(i)

    def __enter__(self) -> "BlockSwap":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def swap_transformer_blocks(transformer, compute_device, offload_device="cpu", recorder=None,
                            residency: Residency | None = None, name: str = "blocks") -> BlockSwap:
    """Block swap on a ``WanTransformer3DModel``: its non-block parts (patch and condition embedders, output head,
    a few MB) and every adapter weight go to the compute device; the blocks' base weights and buffers to the offload
    device (where a model loaded onto the CPU already has them)."""
    for child_name, child in transformer.named_children():
        if child_name != "blocks":
            child.to(compute_device)
    for p in transformer.parameters(recurse=False):
        p.data = p.data.to(compute_device)
    for n, p in transformer.blocks.named_parameters():
        if is_adapter(n) or p.requires_grad:
            p.data = p.data.to(compute_device)
    return BlockSwap(transformer.blocks, compute_device, offload_device, recorder, residency, name).attach()


__all__ = ["BUDGET", "Residency", "BlockSwap", "swap_transformer_blocks", "is_adapter"]
