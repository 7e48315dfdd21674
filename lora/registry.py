"""Name → adapter class, and recognising an algorithm from a file's keys."""

from __future__ import annotations

from collections.abc import Iterable

from .modules import AdapterModule, DoRAModule, LoHaModule, LoKrModule, LoRAModule, OFTModule

__all__ = ["ALGORITHMS", "get_algorithm", "detect_algorithm"]

#: Every supported algorithm, by the name used in the UI and in file metadata (in display order).
#: Adding one is a module in ``lora/modules`` (and its math in ``lora/functional``) plus a line here.
ALGORITHMS: dict[str, type[AdapterModule]] = {
    cls.algorithm: cls for cls in (LoRAModule, LoHaModule, LoKrModule, OFTModule, DoRAModule)
}


def get_algorithm(name: str) -> type[AdapterModule]:
    """The adapter class for ``name`` (a key of ALGORITHMS, case-insensitive); ``ValueError`` otherwise."""
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

    The algorithm whose keys cover every adapter key found, the one with the fewest keys when several
    do (a LoRA file is LoRA, not DoRA). Returns ``None`` when no key belongs to any of them (``alpha``
    alone, or an empty/unrelated dict). Raises ``ValueError`` when no single algorithm holds them all
    (keys of several algorithms mixed, or DoRA's ``dora_scale`` beside LoHa keys).
    """
    suffixes = {suffix for cls in ALGORITHMS.values() for suffix in cls.state_keys}
    found = {
        suffix for key in keys if isinstance(key, str) for suffix in suffixes if _has_suffix(key, suffix)
    }
    if not found:
        return None
    fitting = [cls for cls in ALGORITHMS.values() if found <= set(cls.state_keys)]
    if not fitting:
        # each key named by the first algorithm that has it: LoRA's keys are LoRA's, not DoRA's
        owners = list(
            dict.fromkeys(next(n for n, c in ALGORITHMS.items() if k in c.state_keys) for k in found)
        )
        owners.sort(key=list(ALGORITHMS).index)
        raise ValueError(f"keys mix adapter algorithms {owners}; expected keys of a single algorithm")
    return min(fitting, key=lambda cls: len(cls.state_keys)).algorithm
