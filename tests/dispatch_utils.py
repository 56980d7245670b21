"""Dispatch modes for the tests that record which ops a forward or backward runs.

A TorchDispatchMode sees a torch.library custom op as one call and nothing of the aten ops inside
it (the mode is off while an op runs). The project's own ops (namespace ``lingmoe``: the Triton
expert MLP, the grouped-matmul fallback) are therefore run here through their Python
implementation with the mode still on, so a recorder sees inside them as it did before they were
custom ops.
"""
from __future__ import annotations

import collections
import contextlib

from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

OUR_NAMESPACE = "lingmoe"


class SeesInsideOurOps(TorchDispatchMode):
    """Subclasses implement ``record(func, args, kwargs)``, which must return ``func(*args, **kwargs)``,
    and may implement ``ours(func, args, kwargs)``, called before one of our ops runs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == OUR_NAMESPACE:
            self.ours(func, args, kwargs)
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        return self.record(func, args, kwargs)

    def record(self, func, args, kwargs):
        return func(*args, **kwargs)

    def ours(self, func, args, kwargs):
        pass


# Ops that allocate or alias without running a kernel.
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "lift_fresh",
              "_unsafe_view", "set_", "resize_"}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class Launches(SeesInsideOurOps):
    """Counts what would be a kernel launch on a GPU: every aten op that is not a view or an
    allocation, and every Triton kernel launch (``watching_triton``, under the interpreter). The aten
    ops the interpreter itself runs to move a launch's arguments are not counted."""

    def __init__(self):
        super().__init__()
        self.aten, self.triton = collections.Counter(), collections.Counter()
        self._inside_triton = 0

    def record(self, func, args, kwargs):
        name = func.overloadpacket.__name__
        if not self._inside_triton and not _is_view(func) and name not in _NO_KERNEL:
            self.aten[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    @contextlib.contextmanager
    def watching_triton(self):
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        counter = self

        def run(fn, *args, **kwargs):
            counter.triton[fn.__name__] += 1
            counter._inside_triton += 1
            try:
                return original(fn, *args, **kwargs)
            finally:
                counter._inside_triton -= 1

        InterpretedFunction.run = run
        try:
            with self:
                yield self
        finally:
            InterpretedFunction.run = original
