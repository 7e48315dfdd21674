"""Name → adapter class, and recognising an algorithm from a file's keys."""

from __future__ import annotations

from collections.abc import Iterable

from .modules import AdapterModule, LoHaModule, LoKrModule, LoRAModule

__all__ = ["ALGORITHMS", "get_algorithm", "detect_algorithm"]

#: Every supported algorithm, by the name used in the UI and in file metadata (in display order).
ALGORITHMS: dict[str, type[AdapterModule]] = {
    cls.algorithm: cls for cls in (LoRAModule, LoHaModule, LoKrModule)
}


def get_algorithm(name: str) -> type[AdapterModule]:
    """The adapter class for ``name`` ("LoRA", "LoHa", "LoKr"; case-insensitive); ``ValueError`` otherwise."""
    if isinstance(name, str):
        if name in ALGORITHMS:
            return ALGORITHMS[name]
        for key, cls in ALGORITHMS.items():
            if key.casefold() == name.strip().casefold():
                return cls
    raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {name!r}")


def _has_suffix(key: str, suffix: str) -> bool:
    # A whole dotted component must match: "x.lokr_w1" is LoKr's w1, "x.lokr_w1_a" is not.
    return key == suffix or key.endswith("." + suffix)


def detect_algorithm(keys: Iterable[str]) -> str | None:
    """Which algorithm wrote these state-dict keys (one layer's suffixes or a whole file's full keys).

    Returns the algorithm name, or ``None`` when no key belongs to any of them (``alpha`` alone, or an
    empty/unrelated dict). Raises ``ValueError`` when keys of several algorithms are mixed, since no
    single adapter class can load such a file.
    """
    keys = [key for key in keys if isinstance(key, str)]
    found = [
        name
        for name, cls in ALGORITHMS.items()
        if any(_has_suffix(key, suffix) for key in keys for suffix in cls.state_keys)
    ]
    if len(found) > 1:
        raise ValueError(f"keys mix adapter algorithms {found}; expected keys of a single algorithm")
    return found[0] if found else None
