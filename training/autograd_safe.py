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
import functools
import threading
import weakref
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "InPlaceWatch",
    "ThreadGatedPatch",
    "autograd_safe",
    "copy_on_write",
    "is_in_place",
    "rewritten_count",
    "writes_into_used_tensors",
]


class ThreadGatedPatch:
    """Replaces attributes of ``owner`` (a class or a module) for as long as any thread is inside
    :meth:`active`; each replacement asks :meth:`on` whether its own thread is inside and otherwise
    calls what it replaced. Counted: nested and concurrent users share one installation, and the
    owner's own attributes (or their absence, where they were inherited) come back when the last one
    leaves. ``replacements()`` maps attribute names to ``make(native) -> replacement``; it is called at
    each installation."""

    _ABSENT = object()

    def __init__(self, owner, replacements) -> None:
        self.owner, self.replacements = owner, replacements
        self._local = threading.local()
        self._lock = threading.Lock()
        self._users = 0
        self._saved: dict[str, object] = {}

    def on(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                for name, make in self.replacements().items():
                    self._saved[name] = self.owner.__dict__.get(name, self._ABSENT)
                    setattr(self.owner, name, make(getattr(self.owner, name)))
            self._users += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for name, before in self._saved.items():
                        if before is self._ABSENT:
                            delattr(self.owner, name)
                        else:
                            setattr(self.owner, name, before)
                    self._saved.clear()


_METHODS = {"__iadd__": torch.add, "__isub__": torch.sub, "__imul__": torch.mul, "__itruediv__": torch.div}
_local = threading.local()  # rewritten count, native augmented-assignment flag (this thread)


def _in_graph(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _make(name: str, op, native):
    def augmented(self, other):
        if _AUGMENTED.on() and torch.is_grad_enabled() and (self.requires_grad or _in_graph(other)):
            out = op(self, other)
            if out.dtype != self.dtype:
                out = out.to(self.dtype)
            if out.shape != self.shape:  # the in-place op refuses to broadcast its target
                raise RuntimeError(
                    f"output with shape {list(self.shape)} doesn't match the broadcast shape {list(out.shape)}"
                )
            _local.rewritten = getattr(_local, "rewritten", 0) + 1
            return out
        _local.native_augmented = True  # InPlaceWatch: not an explicit write (rewritten when it matters)
        try:
            return native(self, other)
        finally:
            _local.native_augmented = False

    augmented.__name__ = augmented.__qualname__ = name
    return augmented


_AUGMENTED = ThreadGatedPatch(
    torch.Tensor, lambda: {name: functools.partial(_make, name, op) for name, op in _METHODS.items()}
)


def rewritten_count() -> int:
    """Augmented assignments this thread has rewritten so far (for tests and logs)."""
    return getattr(_local, "rewritten", 0)


@contextlib.contextmanager
def autograd_safe(enabled: bool = True) -> Iterator[None]:
    """Within the block, on this thread, augmented assignments on graph tensors are out-of-place."""
    if not enabled:
        yield
        return
    with _AUGMENTED.active():
        yield


# ---------------------------------------------------------------------------------------------
# Explicit in-place writes (``x.addcmul_(...)``, ``x[i] = ...``): these cannot be rewritten (the
# caller may ignore the result), so a model whose code writes into a tensor an earlier op already
# used (and may have kept for backward: LTX-Video's ``x.addcmul_(ff(rms_norm(x)), gate)``) is found
# by a watch, and trained with copy-on-write of the tensors autograd keeps.


def is_in_place(name: str) -> bool:
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


class InPlaceWatch(TorchFunctionMode):
    """Notes in ``found`` the first explicit in-place write into a tensor that takes part in the
    computation and that an earlier op already used. With grad, "takes part" is autograd's own
    ``requires_grad``; in a probe without grad (no activation memory) it is followed the same way
    from the tensors given to :meth:`follow` (the model's inputs): an op's outputs take part when one
    of its tensor arguments does. Augmented assignments do not count: while training they are
    rewritten out of place. Costs a Python call per op: meant for one pass."""

    def __init__(self) -> None:
        super().__init__()
        self.used: dict[int, weakref.ref] = {}
        self.followed: dict[int, weakref.ref] = {}
        self.found = ""

    @staticmethod
    def _has(table: dict[int, weakref.ref], t: torch.Tensor) -> bool:
        """Whether ``t``, or the tensor it is a view of, is in ``table``."""
        for candidate in (t, t._base):
            ref = table.get(id(candidate)) if candidate is not None else None
            if ref is not None and ref() is candidate:
                return True
        return False

    def follow(self, *tensors) -> None:
        for t in _tensors(tensors):
            self.followed[id(t)] = weakref.ref(t)

    def _part(self, t: torch.Tensor) -> bool:
        if torch.is_grad_enabled():
            return t.requires_grad
        return self._has(self.followed, t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        if is_in_place(getattr(func, "__name__", "")) and inputs:
            target = inputs[0]
            if (
                not self.found
                and not getattr(_local, "native_augmented", False)
                and self._part(target)
                and self._has(self.used, target)
            ):
                self.found = func.__name__
            out = func(*args, **kwargs)
            if not torch.is_grad_enabled() and any(self._part(t) for t in inputs[1:]):
                self.follow(target)
            return out
        taking_part = [t for t in inputs if self._part(t)]
        for t in taking_part:
            self.used[id(t)] = weakref.ref(t)
        out = func(*args, **kwargs)
        if taking_part and not torch.is_grad_enabled():
            self.follow(out)
        return out


def _tensors(value, depth: int = 0) -> list[torch.Tensor]:
    """The tensors in a value (nested lists, tuples and dicts, a few levels deep)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth < 3 and isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v, depth + 1)]
    if depth < 3 and isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, depth + 1)]
    return []


def writes_into_used_tensors(forward, inputs) -> str:
    """Run ``forward()`` once without grad, following ``inputs`` (the latent and the conditioning)
    through the model under an InPlaceWatch and the augmented-assignment rule: the in-place op that
    wrote into a used tensor derived from them, or "" when the model code never does."""
    with torch.no_grad(), autograd_safe(), InPlaceWatch() as watch:
        watch.follow(inputs)
        forward()
    return watch.found


class _Held:
    """A tensor autograd keeps for backward; replaced by a copy before anyone writes into it."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _CopyOnWrite(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[int, weakref.WeakSet] = {}  # storage address -> holders of tensors kept on it
        self.packed = 0

    @staticmethod
    def _address(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage: never written here
            return 0

    def pack(self, t: torch.Tensor) -> _Held:
        held = _Held(t)
        address = self._address(t)
        if address:
            self.kept.setdefault(address, weakref.WeakSet()).add(held)
        self.packed += 1
        if self.packed % 4096 == 0:  # storages whose tensors backward has released
            self.kept = {a: h for a, h in self.kept.items() if len(h)}
        return held

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if is_in_place(getattr(func, "__name__", "")) and args and isinstance(args[0], torch.Tensor):
            holders = self.kept.pop(self._address(args[0]), None)
            for held in list(holders or ()):
                held.t = held.t.clone()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def copy_on_write(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread), every tensor autograd keeps for backward is copied just before
    an in-place op writes into its storage, so backward sees the values the forward used. For models
    found by writes_into_used_tensors only: it costs a Python call per op and turns off autograd's own
    in-place checks (this takes their place)."""
    if not enabled:
        yield
        return
    mode = _CopyOnWrite()
    with torch.autograd.graph.saved_tensors_hooks(mode.pack, mode.unpack), mode:
        yield
