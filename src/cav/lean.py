"""A lean training step: fewer ops and casts per step, same results up to rounding.

Two tools, both exact to undo:

* ``FrozenMerge`` folds a frozen LoRA (the S-LoRA in stage 2) into its base weights with peft's ``merge``, so its
  rank-1 matmuls and their casts leave the step; ``restore`` puts back a saved copy of the base weights, bit for bit
  (peft's own ``unmerge`` subtracts the delta again, which is not exact in bf16).
* ``ComputeCopies`` keeps a trainable adapter's fp32 master weights for the optimizer but runs its forward and
  backward on copies in the compute dtype (bf16/fp16 under autocast): one ``_foreach_copy_`` in, one for the
  gradients out, instead of autocast casting every LoRA matrix (and peft every LoRA input) per layer, per step.
  Outside a step the UNet holds the masters, so saving, loading and resuming see fp32 weights as before.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The compute dtype of a training step: the frozen weights' dtype under autocast on CUDA, none elsewhere."""
    return dtype if device.type == "cuda" and dtype != torch.float32 else None


def _layers_with(unet: torch.nn.Module, name: str) -> list[LoraLayer]:
    return [m for m in unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def live_adapters(unet: torch.nn.Module) -> list[str]:
    """The adapters active in some layer and not merged there yet."""
    names: list[str] = []
    for m in unet.modules():
        if isinstance(m, LoraLayer):
            for a in m.active_adapters:
                if a in m.lora_A and a not in m.merged_adapters and a not in names:
                    names.append(a)
    return names


class FrozenMerge:
    """Merge the frozen adapters ``names`` into the base weights of ``unet`` until ``restore()``.

    A layer that also holds a live adapter not in ``names`` (on Wan the T-LoRA shares every ``attn1`` projection with
    the S-LoRA; on the UNet rows the two sit in different blocks) is folded too, without peft's ``merge``: peft skips
    *all* adapters of a layer once any is merged, which would silence the live one. There the frozen adapters'
    delta is added to the base weight by hand (``get_delta_weight``, as peft's merge adds it) and they leave that
    layer's active adapters, so the live one runs alone on the folded weight (and ``LeanForward`` fuses it);
    ``restore`` puts back both the weight and the active list.

    ``swaps``: the block swaps of a block-swapped denoiser (``Backbone.swaps``, ``wan.offload``). A layer in a
    swapped block is folded and restored through its swap's ``edit``: one block at a time on the compute device
    (the same arithmetic as unswapped), written back to the block's home copy; the saved base weights wait on the
    swap's offload device, so neither step ever holds more than the swap's own blocks on the device."""

    def __init__(self, unet: torch.nn.Module, names: list[str], swaps=()):
        self.unet, self.names = unet, list(names)
        self.swaps = list(swaps.values() if isinstance(swaps, dict) else swaps)
        self.saved: list[tuple[LoraLayer, torch.Tensor]] = []
        self.hidden: list[tuple[LoraLayer, object]] = []  # (shared layer, its active adapter(s) before the fold)
        self.folded: list[LoraLayer] = []  # every layer whose base weight holds a frozen adapter's delta now

    @property
    def is_merged(self) -> bool:
        return bool(self.saved)

    def _fold(self, layer: LoraLayer) -> tuple[list[str], bool]:
        """(the frozen adapters ``layer`` folds, whether a live adapter shares it)."""
        frozen = [n for n in self.names if n in layer.lora_A]
        shared = any(a in layer.lora_A and a not in self.names and a not in layer.merged_adapters
                     for a in layer.active_adapters)
        if shared:  # only what this layer runs now is folded (its live adapter keeps running beside it)
            frozen = [n for n in frozen if n in layer.active_adapters and n not in layer.merged_adapters]
        return frozen, shared

    def _by_block(self, layers: list[LoraLayer]):
        """``layers`` in groups, each with the context its base weights can change in: a swapped block's ``edit``
        (that block on the device, written back after), or none for layers outside every swap."""
        where = {}
        for swap in self.swaps:
            for i, block in enumerate(swap.blocks):
                for m in block.modules():
                    where[id(m)] = (swap, i)
        groups: dict = {}
        for layer in layers:
            groups.setdefault(where.get(id(layer)), []).append(layer)
        for key, group in groups.items():
            if key is None:
                yield None, contextlib.nullcontext(), group
            else:
                swap, i = key
                yield swap, swap.edit(i, [layer.get_base_layer() for layer in group]), group

    def merge(self) -> "FrozenMerge":
        if self.is_merged or not self.names:
            return self
        layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer) and self._fold(m)[0]]
        for swap, editing, group in self._by_block(layers):
            with editing:
                for layer in group:
                    self._merge_layer(layer, swap)
        return self

    def _merge_layer(self, layer: LoraLayer, swap) -> None:
        frozen, shared = self._fold(layer)
        base = layer.get_base_layer().weight
        keep = base.detach().clone() if swap is None else base.detach().to(swap.offload, copy=True)
        self.saved.append((layer, keep))
        self.folded.append(layer)
        with torch.no_grad():
            if not shared:
                layer.merge(adapter_names=frozen)
                return
            for name in frozen:  # peft's unsafe merge of a vanilla LoRA, without marking the layer merged
                base.data += layer.get_delta_weight(name).to(base.dtype)
        self.hidden.append((layer, layer._active_adapter))
        layer._active_adapter = [a for a in layer.active_adapters if a not in frozen]

    def restore(self) -> None:
        """Put back the exact base weights, unmark the merged adapters and re-activate the hidden ones."""
        weights = {id(layer): weight for layer, weight in self.saved}
        with torch.no_grad():
            for _, editing, group in self._by_block([layer for layer, _ in self.saved]):
                with editing:
                    for layer in group:
                        layer.get_base_layer().weight.copy_(weights[id(layer)])
            for layer, _ in self.saved:
                layer.merged_adapters[:] = [a for a in layer.merged_adapters if a not in self.names]
        for layer, active in self.hidden:
            layer._active_adapter = active
        self.saved, self.hidden, self.folded = [], [], []

    @contextmanager
    def merged(self):
        """Merged inside, restored exactly on exit (also on errors and Ctrl-C)."""
        self.merge()
        try:
            yield self
        finally:
            self.restore()

    def unmerged_during(self, fn):
        """``fn`` wrapped to run with the adapters unmerged (a checkpoint's saves and validation samples)."""
        def wrapped(*args, **kwargs):
            with self.unmerged():
                return fn(*args, **kwargs)
        return wrapped

    @contextmanager
    def unmerged(self):
        """The adapters as separate layers for a while (e.g. validation samples of the T-LoRA alone)."""
        was = self.is_merged
        self.restore()
        try:
            yield
        finally:
            if was:
                self.merge()


class ComputeCopies:
    """fp32 masters of adapter ``name`` for the optimizer, ``dtype`` copies inside each training step.

    ``swap_in`` (before the forward): copy the masters into the compute copies and put the copies in the layers;
    ``swap_out`` (after backward, before clipping): copy the copies' gradients to the masters' and put the masters
    back. Each is one foreach op, whatever the number of layers; ``active()`` pairs them around forward + backward.
    """

    def __init__(self, unet: torch.nn.Module, name: str, dtype: torch.dtype):
        self.slots: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []  # (Linear holding it, master)
        for layer in _layers_with(unet, name):
            for holder in (layer.lora_A[name], layer.lora_B[name]):
                self.slots.append((holder, holder.weight))
        self.masters = [p for _, p in self.slots]
        self.copies = [torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad) for p in self.masters]
        self.grads = [torch.zeros_like(p) for p in self.masters]

    def swap_in(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.masters)
        for (holder, _), copy in zip(self.slots, self.copies):
            holder._parameters["weight"] = copy

    def swap_out(self, keep_grads: bool = True) -> None:
        for holder, master in self.slots:
            holder._parameters["weight"] = master
        have = [i for i, c in enumerate(self.copies) if c.grad is not None] if keep_grads else []
        if have:
            with torch.no_grad():
                torch._foreach_copy_([self.grads[i] for i in have], [self.copies[i].grad for i in have])
            for i in have:
                self.masters[i].grad = self.grads[i]
        for c in self.copies:
            c.grad = None

    @contextmanager
    def active(self):
        """Around forward and backward: copies in on entry; masters (with the gradients) back on exit, always."""
        self.swap_in()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.swap_out(keep_grads=ok)


class _LoraDelta(torch.autograd.Function):
    """``result + scale · (x Aᵀ) Bᵀ`` as one addmm, with a hand-written backward: ~18 ops per layer per step
    (forward + backward) where peft's separate linears, scaling and add dispatch ~30."""

    @staticmethod
    def forward(ctx, result, x, a, b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.mm(a.t())
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, a, b)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, h, a, b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gh = g2.mm(b).mul_(ctx.scale)
        ga = gh.t().mm(x2) if ctx.needs_input_grad[2] else None
        gb = g2.t().mm(h).mul_(ctx.scale) if ctx.needs_input_grad[3] else None
        gx = gh.mm(a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return grad, gx, ga, gb, None


def _leanable(layer: LoraLayer, name: str) -> bool:
    """A plain linear LoRA whose only live adapter is ``name`` (what ``_LoraDelta`` computes exactly)."""
    from peft.tuners.lora import Linear

    live = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    return (type(layer) is Linear and live == [name] and not layer.fan_in_fan_out
            and isinstance(layer.lora_dropout[name], torch.nn.Identity) and name not in layer.lora_variant
            and not layer.lora_bias.get(name, False) and not layer.disable_adapters)


def _lean_forward(layer: LoraLayer, name: str):
    def forward(x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        scale = layer.scaling[name]
        if a.dtype != result.dtype or x.dtype != a.dtype:  # fp32 adapter under autocast: peft's own arithmetic
            return result + layer.lora_B[name](layer.lora_A[name](x.to(a.dtype))) * scale
        return _LoraDelta.apply(result, x, a, b, scale)

    return forward


class LeanForward:
    """Inside ``active()``: every plain layer of adapter ``name`` adds its LoRA term with ``_LoraDelta``; outside,
    peft's forward (an instance attribute shadows the class method, like ``bypass.LayerBypass``). The patched
    functions are made once, so a compiled UNet sees the same objects every step (no recompilation)."""

    def __init__(self, unet: torch.nn.Module, name: str):
        self.name = name
        self.layers = _layers_with(unet, name)
        self.forwards = {id(m): _lean_forward(m, name) for m in self.layers}

    @contextmanager
    def active(self):
        patched = [m for m in self.layers if _leanable(m, self.name)]
        for m in patched:
            m.forward = self.forwards[id(m)]
        try:
            yield
        finally:
            for m in patched:
                m.__dict__.pop("forward", None)


class LeanStep:
    """The lean step of a stage that trains adapter ``name``, given as ``Stage(forward_backward_context=...)`` where
    the stage is built: the fused LoRA forward always, and compute copies in ``dtype`` when the step runs under
    autocast (``dtype`` not None / fp32). Build it once the adapter is in ``unet``."""

    def __init__(self, unet: torch.nn.Module, name: str, dtype: torch.dtype | None):
        self.copies = ComputeCopies(unet, name, dtype) if dtype not in (None, torch.float32) else None
        self.fused = LeanForward(unet, name)

    @contextmanager
    def __call__(self):
        with contextlib.ExitStack() as stack:
            if self.copies is not None:
                stack.enter_context(self.copies.active())
            stack.enter_context(self.fused.active())
            yield


def use_lean_step(stage, unet: torch.nn.Module, name: str, dtype: torch.dtype | None) -> ComputeCopies | None:
    """A ``LeanStep`` for a stage built by hand elsewhere (tests, the speed benchmark's variants); returns its compute
    copies (None without autocast). ``stages.py`` passes its ``LeanStep`` when it builds the stage."""
    step = LeanStep(unet, name, dtype)
    stage.forward_backward_context = step
    return step.copies


__all__ = ["live_adapters", "FrozenMerge", "ComputeCopies", "LeanForward", "LeanStep", "use_lean_step",
           "autocast_dtype"]
