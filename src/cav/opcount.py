"""Count the ATen ops one step dispatches, and how many of them are casts (device-independent measures of a step: the
lean step's, read by `cav bench speed`'s op counts and by tests/test_lean.py).

A ``TorchDispatchMode`` sees every ATen op after autograd and autocast have done their work, in the forward, the
backward (the autograd engine carries the mode into its thread) and the optimizer alike, so the count is what the
device would be asked to launch, whatever the device. Composite ops (``.to``, ``linear``) are seen as the ops they
decompose into.

A *cast* is an op that moves tensor data across dtypes or devices:
``_to_copy`` whose result differs from its input in dtype or device (autocast's casts and ``.to(dtype)`` both end
up here), and ``copy_`` / ``_copy_from`` / ``_copy_from_and_resize`` / ``_foreach_copy_`` whose source and
destination differ in dtype or device (one ``_foreach_copy_`` call counts once, however many tensors it copies).
A memory-format-only copy is not a cast.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COPY_OPS = ("copy_", "_copy_from", "_copy_from_and_resize")


def _kind(x):
    """(dtype, device) of a tensor or of a list's first tensor; None for anything else."""
    x = x[0] if isinstance(x, (list, tuple)) and x else x
    return (x.dtype, x.device) if isinstance(x, torch.Tensor) else None


def is_cast(name: str, args: tuple, out) -> bool:
    """Whether the op ``name`` called on ``args`` with result ``out`` converts data across dtype or device."""
    pairs = ([(args[0] if args else None, out)] if name == "_to_copy"
             else [args[:2]] if name in COPY_OPS and len(args) > 1  # (dst/self, src, ...)
             else list(zip(args[0], args[1])) if name == "_foreach_copy_" and len(args) > 1 else [])
    return any(None not in (_kind(a), _kind(b)) and _kind(a) != _kind(b) for a, b in pairs)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: step()`` → ``c.total``, ``c.casts``, ``c.ops`` (per op name), ``c.cast_ops``."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.cast_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if is_cast(name, args, out):
            self.cast_ops[name] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def casts(self) -> int:
        return sum(self.cast_ops.values())

    def summary(self, top: int = 12) -> dict:
        return {"ops": self.total, "casts": self.casts, "cast_ops": dict(self.cast_ops.most_common()),
                "top_ops": dict(self.ops.most_common(top))}


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """Run ``fn`` once under an ``OpCounter`` and return the counter."""
    with OpCounter() as counter:
        fn()
    return counter


__all__ = ["OpCounter", "count_ops", "is_cast"]
