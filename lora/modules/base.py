"""The shared shell of every adapter: validation, rank/alpha bookkeeping, file-format I/O, and the
one contract by which an adapter changes its base layer's forward (``adapt_input`` / ``adapt_output``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..spec import ConvSpec, check_layer

__all__ = ["AdapterModule", "ALPHA_KEY"]

#: The per-layer scalar every algorithm's file carries next to its factors.
ALPHA_KEY = "alpha"

# Keys of real-world adapter files that we recognise but cannot reproduce; loading them silently
# without these would give a different ΔW, so they are refused with a reason.
UNSUPPORTED_KEYS: dict[str, str] = {
    "dora_scale": "DoRA weight decomposition (only LoRA layers can be DoRA here)",
    "lora_mid.weight": "Tucker (CP) decomposition of a LoCon conv",
    "hada_t1": "Tucker (CP) decomposition of a LoHa conv",
    "hada_t2": "Tucker (CP) decomposition of a LoHa conv",
    "lokr_t2": "Tucker (CP) decomposition of a LoKr conv",
}


def _float32(value: float) -> float:
    """``value`` rounded to float32: alpha is stored as float32, so keep exactly what the file will say."""
    return float(torch.tensor(value, dtype=torch.float32))


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    try:
        value = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank must be a positive int, got {rank!r}") from None
    if value < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return value


def _check_alpha(alpha: Any, where: str = "alpha") -> float:
    if isinstance(alpha, bool):
        raise ValueError(f"{where} must be a finite number, got {alpha!r}")
    try:
        value = float(alpha)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where} must be a finite number, got {alpha!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {alpha!r}")
    return value


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


class AdapterModule(nn.Module):
    """An adapter for one base layer: owns its parameters and changes the layer's forward.

    The contract every algorithm meets: the layer runs on ``adapt_input(layer, x)`` and its output y
    becomes ``adapt_output(layer, x, y)``; the effective weight is ``merge(W)``, which is also what
    ComfyUI's loader makes of the saved file. Additive algorithms (LoRA, LoHa, LoKr) implement
    ``delta_weight`` and ``forward`` (ΔY) and inherit the rest; OFT rotates the output, DoRA rescales
    the input. Subclasses also implement ``_init_parameters``, ``_load_parameters`` and
    ``_file_tensors``.

    Rank and alpha: ``scale = alpha / rank`` (``alpha=None`` means ``alpha = rank``, scale 1). A rank the
    layer cannot use is clamped (see each algorithm's ``max rank``); the scale the user asked for is kept
    and ``alpha`` becomes ``scale · effective_rank`` so a saved file reproduces it. ``alpha`` is held as a
    float32 value because that is what the file stores.
    """

    algorithm: ClassVar[str]
    #: Algorithm-specific key suffixes of the file format (``alpha`` is common to all, see ``ALPHA_KEY``).
    state_keys: ClassVar[tuple[str, ...]]
    #: Whether ``adapt_input`` changes the input (then it runs as a forward pre-hook as well).
    changes_input: ClassVar[bool] = False
    #: Whether alpha is the scale numerator (alpha / rank); OFT's alpha is a constraint instead.
    alpha_is_scale: ClassVar[bool] = True

    weight_shape: tuple[int, ...]
    conv: ConvSpec | None

    def __init__(
        self,
        weight_shape: Sequence[int],
        rank: int,
        alpha: float | None = None,
        *,
        conv: ConvSpec | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight_shape, self.conv = check_layer(weight_shape, conv)
        requested = _check_rank(rank)
        user_alpha = None if alpha is None else _check_alpha(alpha)
        dtype = _check_dtype(dtype)
        effective, uses_alpha = self._init_parameters(requested, generator)
        if not self.alpha_is_scale:
            stored_alpha = self.default_alpha(effective) if user_alpha is None else user_alpha
        elif not uses_alpha or user_alpha is None:
            stored_alpha = float(effective)  # scale 1
        elif effective == requested:
            stored_alpha = user_alpha
        else:
            stored_alpha = user_alpha / requested * effective  # keep the requested scale
        self._rank = effective
        self._alpha = _float32(stored_alpha)
        # Params were drawn in float32 on the generator's device; move them once, at the end, so the
        # random stream does not depend on dtype or device.
        if device is None:
            device = torch.empty(0).device  # the current default device, as nn layers use
        self.to(device=device, dtype=dtype)

    # ---- subclass hooks -------------------------------------------------------------------------

    def _init_parameters(self, rank: int, generator: torch.Generator | None) -> tuple[int, bool]:
        """Register float32 initial parameters; return ``(effective rank, whether alpha applies)``."""
        raise NotImplementedError

    def _load_parameters(
        self, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[int, bool]:
        """Register parameters from file tensors (validated); return ``(rank, whether alpha applies)``."""
        raise NotImplementedError

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters in file layout, keyed by suffix (no alpha); may share storage with the params."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW ``[*weight_shape]`` in the parameters' dtype, already multiplied by ``scale``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔY: the base layer's op applied to ``x`` with weight ΔW and no bias, computed in ``x.dtype``."""
        raise NotImplementedError

    # ---- how the adapter changes its layer ------------------------------------------------------

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        """The alpha of ``alpha=None``: ``rank`` (scale 1); OFT's is 0 (no constraint)."""
        return float(rank) if cls.alpha_is_scale else 0.0

    def adapt_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input the base layer runs on (only called when ``changes_input``)."""
        return x

    def adapt_output(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output given its input ``x`` (after ``adapt_input``) and its own output ``y``:
        ``y + ΔY`` for an additive algorithm."""
        return y + self(x).to(y.dtype)

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """The effective weight ``[*weight_shape]`` for base weight ``weight``, in its dtype."""
        return weight + self.delta_weight().to(weight.dtype)

    @property
    def needs_base(self) -> bool:
        """True until ``init_from_base`` has run, for algorithms whose start depends on the base weight."""
        return False

    def init_from_base(self, weight: torch.Tensor) -> None:
        """Set what a fresh adapter derives from its layer's weight (DoRA's magnitude); else nothing."""

    # ---- common API -----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Effective rank (after clamping, or as read from a file)."""
        return self._rank

    @property
    def alpha(self) -> float:
        """The alpha a file written now would carry; ``scale == alpha / rank``."""
        return self._alpha

    @property
    def scale(self) -> float:
        """Multiplier already folded into ``delta_weight()`` and ``forward()``."""
        return self._alpha / self._rank

    def extra_repr(self) -> str:
        conv = "" if self.conv is None else f", conv={self.conv}"
        return f"weight_shape={self.weight_shape}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}{conv}"

    def _new_param(
        self, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None
    ) -> nn.Parameter:
        # copy=True: the module must never alias the caller's tensors (an optimizer would write into them).
        return nn.Parameter(
            tensor.detach().to(device=device if device is not None else tensor.device, dtype=dtype, copy=True)
        )

    def adapter_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The layer's tensors keyed by the suffixes stock ComfyUI's LoRA loader reads, plus ``alpha``.

        Detached, contiguous copies (a snapshot: later optimizer steps do not change them), cast to
        ``dtype`` when given. ``alpha`` is a 0-d float32 tensor whatever ``dtype`` is: a bf16/fp16 alpha
        would round (e.g. 0.3) and silently change the scale readers compute from it.
        """
        if dtype is not None:
            _check_dtype(dtype)
        out: dict[str, torch.Tensor] = {}
        device = None
        for key, tensor in self._file_tensors().items():
            out[key] = tensor.detach().to(dtype=dtype or tensor.dtype, copy=True).contiguous()
            device = tensor.device
        out[ALPHA_KEY] = torch.tensor(self._alpha, dtype=torch.float32, device=device)
        return out

    @classmethod
    def from_adapter_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        weight_shape: Sequence[int],
        *,
        conv: ConvSpec | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> AdapterModule:
        """Rebuild from one layer's suffix-keyed tensors (the inverse of ``adapter_state_dict``).

        The rank comes from the tensor shapes. A missing ``alpha`` means scale 1 (``alpha = rank``), the
        same as stock ComfyUI. ``device=None`` keeps the tensors where they are. Raises ``ValueError`` for a
        missing key, an unexpected or unsupported key, or a shape that does not fit ``weight_shape``
        (naming the key, the expected and the found shape).
        """
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.weight_shape, module.conv = check_layer(weight_shape, conv)
        dtype = _check_dtype(dtype)
        for key in sd:
            if key in UNSUPPORTED_KEYS and key not in cls.state_keys:
                raise ValueError(f"{cls.algorithm}: key {key!r} ({UNSUPPORTED_KEYS[key]}) is not supported")
        unexpected = sorted(set(sd) - set(cls.state_keys) - {ALPHA_KEY})
        if unexpected:
            raise ValueError(
                f"{cls.algorithm}: unexpected keys {unexpected}; expected some of {[*cls.state_keys, ALPHA_KEY]}"
            )
        rank, uses_alpha = module._load_parameters(sd, dtype, device)
        alpha = cls.default_alpha(rank)
        if uses_alpha and ALPHA_KEY in sd:
            value = sd[ALPHA_KEY]
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"{cls.algorithm}: key 'alpha' must be a one-element tensor, got {value!r}")
            alpha = _check_alpha(value.item(), where=f"{cls.algorithm}: key 'alpha'")
        module._rank = rank
        module._alpha = alpha
        return module

    # ---- validation helpers for _load_parameters ------------------------------------------------

    @classmethod
    def _require(cls, sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"{cls.algorithm}: missing key {key!r}")
        value = sd[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{cls.algorithm}: key {key!r} must be a torch.Tensor, got {type(value).__name__}"
            )
        return value

    def _check_shape(self, key: str, tensor: torch.Tensor, *allowed: tuple[int, ...]) -> None:
        """Raise unless ``tensor.shape`` is one of ``allowed`` (the first is the canonical layout)."""
        found = tuple(tensor.shape)
        if found not in allowed:
            expected = " or ".join(str(shape) for shape in dict.fromkeys(allowed))
            raise ValueError(
                f"{self.algorithm}: key {key!r} has shape {found}, expected {expected} "
                f"for weight_shape {self.weight_shape}"
            )

    def _check_ndim(self, key: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
        if tensor.dim() != ndim:
            raise ValueError(
                f"{self.algorithm}: key {key!r} has shape {tuple(tensor.shape)}, expected {layout} "
                f"for weight_shape {self.weight_shape}"
            )
