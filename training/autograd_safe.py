"""Run inference-style model code under autograd: augmented assignments become out-of-place.

Model code written for sampling updates activations in place: Flux's single block does
``x += gate * out`` after ``pre_norm(x)`` saved ``x`` for its backward, HunyuanVideo's blocks alike.
Autograd then refuses backward ("one of the variables needed for gradient computation has been
modified by an inplace operation"). Newer ComfyUI switches some of its blocks into a training path
with a module flag (``model_management.in_training``); older releases and the other blocks have none.

The general rule used here: while this thread trains, ``a += b`` (also ``-=``, ``*=``, ``/=``) on a
tensor that takes part in autograd computes ``a + b`` into a new tensor, which Python binds to ``a``
(``a += b`` is ``a = a.__iadd__(b)``), so what ``a`` held stays intact for whoever saved it. The
result keeps ``a``'s dtype and shape, as the in-place op would. Only augmented assignment is
rewritten: an explicit ``a.add_(b)``, whose result the caller may ignore, stays in place. Views are
rewritten too (a Linear's output on a 3-D input is a view): ``x[:, :n] += y`` still updates ``x``,
because Python stores the result back by item assignment; only a named view updated by ``+=`` no
longer writes into the tensor it views, a pattern model code does not use for activations. Without
grad (sampling, evaluation), on tensors outside the graph, and on every other thread, ``+=`` is the
usual in-place op.

Mechanism: ``torch.Tensor``'s four augmented-assignment methods are replaced by Python ones for as
long as any thread is inside :func:`autograd_safe` (counted), and each checks a thread-local depth.
Every other tensor op keeps its native path (a torch function mode would add a Python call to every
op: 15 % fewer steps/s on the tiny SD3 model on CPU).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["autograd_safe", "rewritten_count"]

_METHODS = {"__iadd__": torch.add, "__isub__": torch.sub, "__imul__": torch.mul, "__itruediv__": torch.div}
_local = threading.local()
_lock = threading.Lock()
_users = 0
_saved: dict[str, object] = {}  # method name -> what torch.Tensor's own __dict__ held (absent: inherited)
_ABSENT = object()


def _in_graph(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _make(name: str, op):
    native = getattr(torch.Tensor, name)

    def augmented(self, other):
        if (
            getattr(_local, "depth", 0)
            and torch.is_grad_enabled()
            and (self.requires_grad or _in_graph(other))
        ):
            out = op(self, other)
            if out.dtype != self.dtype:
                out = out.to(self.dtype)
            if out.shape != self.shape:  # the in-place op refuses to broadcast its target
                raise RuntimeError(
                    f"output with shape {list(self.shape)} doesn't match the broadcast shape {list(out.shape)}"
                )
            _local.rewritten = getattr(_local, "rewritten", 0) + 1
            return out
        return native(self, other)

    augmented.__name__ = augmented.__qualname__ = name
    return augmented


def _install() -> None:
    global _users
    with _lock:
        if _users == 0:
            for name, op in _METHODS.items():
                _saved[name] = torch.Tensor.__dict__.get(name, _ABSENT)
                setattr(torch.Tensor, name, _make(name, op))
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            for name, before in _saved.items():
                if before is _ABSENT:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, before)
            _saved.clear()


def rewritten_count() -> int:
    """Augmented assignments this thread has rewritten so far (for tests and logs)."""
    return getattr(_local, "rewritten", 0)


@contextlib.contextmanager
def autograd_safe(enabled: bool = True) -> Iterator[None]:
    """Within the block, on this thread, augmented assignments on graph tensors are out-of-place."""
    if not enabled:
        yield
        return
    _install()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        _uninstall()
