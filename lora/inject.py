"""Attach adapters to a torch module tree without changing it: forward hooks give each target layer
the adapter's output (``adapt_output``; ``adapt_input`` through a pre-hook where the algorithm changes
the input), and removing the hooks restores the tree exactly. Base weights are never written.

Keys follow ComfyUI's LORA_MODEL convention: "<prefix><module path>.<adapter suffix>", prefix
"diffusion_model." by default, which stock LoRA loaders map onto the diffusion model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import ALGORITHMS, ALPHA_KEY, AdapterModule, ConvSpec, get_algorithm, layer_spec
from .modules.base import UNSUPPORTED_KEYS

log = logging.getLogger(__name__)


# Glob patterns on module paths (relative to the diffusion model) per preset. Names as ComfyUI builds
# them: MMDiT / AuraFlow attn, SD UNet attn1/attn2/ff.net, Flux / HunyuanVideo img_attn / txt_attn /
# img_mlp / txt_mlp and single_blocks linear1 (fused qkv + mlp in) / linear2, Wan / Cosmos self_attn /
# cross_attn / ffn / mlp, Lumina 2 / Z-Image attention / feed_forward, Qwen-Image attn / img_mlp, HiDream
# attn1 / ff_i (mixture of experts) / ff_t.
ATTENTION_PATTERNS = ("*attn*", "*attention.*", "*single_blocks.*.linear1", "*single_blocks.*.linear2")
# MLPs of the repeated blocks only, not the timestep / pooled-text embedder MLPs (t_embedder.mlp...).
MLP_PATTERNS = ("*blocks.*mlp*", "*layers.*mlp*", "*ff.net*", "*blocks.*.ff.*", "*blocks.*.ff_*", "*blocks.*ffn*",
                "*blocks.*feed_forward*", "*layers.*feed_forward*")  # fmt: skip
# Never part of a preset: adaptive-norm modulation projections whose names mention attention
# (Cosmos adaln_modulation_self_attn).
PRESET_EXCLUDE = ("*modulation*",)
TARGET_PATTERNS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    "attention": ATTENTION_PATTERNS,
    "attention_mlp": ATTENTION_PATTERNS + MLP_PATTERNS,
}


def target_patterns(preset: str, include: Sequence[str] = ()) -> tuple[str, ...]:
    """Include patterns: the explicit ones when given, else the preset's."""
    if include:
        return tuple(include)
    if preset not in TARGET_PATTERNS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_PATTERNS)}; got {preset!r}")
    return TARGET_PATTERNS[preset]


def target_excludes(preset: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Exclude patterns: the explicit ones, plus the presets' own where a layer preset chose the layers."""
    if include or preset == "all":
        return tuple(exclude)
    return (*exclude, *PRESET_EXCLUDE)


def find_targets(
    root: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> dict[str, tuple[tuple[int, ...], ConvSpec | None]]:
    """Linear / Conv layers under root (path -> (weight shape, conv spec)), filtered by glob patterns
    on the module path. Grouped convs are skipped (no adapter algorithm here supports them)."""
    out = {}
    for path, module in root.named_modules():
        spec = layer_spec(module)
        if spec is None:
            continue
        _, conv = spec
        if conv is not None and conv.groups != 1:
            continue
        if not any(fnmatch.fnmatchcase(path, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(path, p) for p in exclude):
            continue
        out[path] = spec
    return out


class AdapterSet(nn.Module):
    """The adapters of one training run, keyed by module path (dots replaced for nn.ModuleDict)."""

    def __init__(self, adapters: Mapping[str, AdapterModule]):
        super().__init__()
        self.paths = list(adapters)
        self.adapters = nn.ModuleDict({_key(p): a for p, a in adapters.items()})

    @classmethod
    def create(
        cls,
        targets: Mapping[str, tuple[tuple[int, ...], ConvSpec | None]],
        algorithm: str,
        rank: int,
        alpha: float | None,
        generator: torch.Generator,
        device: torch.device | None = None,
    ) -> AdapterSet:
        """Fresh adapters (the layers unchanged) in fp32, initialised in sorted path order from one
        generator. Algorithms that start from the base weight (DoRA) then need ``init_from_base``."""
        adapter_cls = get_algorithm(algorithm)
        adapters = {}
        for path in sorted(targets):
            shape, conv = targets[path]
            adapters[path] = adapter_cls(shape, rank, alpha, conv=conv, generator=generator, device=device)
        return cls(adapters)

    def __getitem__(self, path: str) -> AdapterModule:
        return self.adapters[_key(path)]

    def __setitem__(self, path: str, adapter: AdapterModule) -> None:
        if path not in self.paths:
            self.paths.append(path)
        self.adapters[_key(path)] = adapter

    def init_from_base(self, root: nn.Module) -> int:
        """Fresh adapters whose start depends on their layer's weight (DoRA's magnitude) read it from
        root's layers as they are now (call it once the model is loaded with its patches). Returns
        how many did."""
        fresh = [(path, adapter) for path, adapter in self.items() if adapter.needs_base]
        for path, adapter in fresh:
            adapter.init_from_base(root.get_submodule(path).weight.detach())
        return len(fresh)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters in a fixed order (by name), whatever order the modules registered them in:
        optimizer state saved by one run maps onto the parameters of the next."""
        return [p for _, p in sorted(self.named_parameters(), key=lambda kv: kv[0])]

    def items(self) -> Iterator[tuple[str, AdapterModule]]:
        for p in self.paths:
            yield p, self[p]

    def state_dict_for_file(self, prefix: str = "diffusion_model.", dtype: torch.dtype | None = None) -> dict:
        out = {}
        for path, adapter in self.items():
            for suffix, t in adapter.adapter_state_dict(dtype=dtype).items():
                out[f"{prefix}{path}.{suffix}"] = t.cpu()
        return out

    @contextlib.contextmanager
    def attached(self, root: nn.Module) -> Iterator[None]:
        """Hooks on root's target layers for the duration of the block; always removed on exit."""
        self._handles = []
        try:
            self._hook(root)
            yield
        finally:
            self._unhook()

    @contextlib.contextmanager
    def paused(self, root: nn.Module) -> Iterator[None]:
        """Within attached(): the hooks off for the block (the base model as it is), then on again."""
        self._unhook()
        try:
            yield
        finally:
            self._hook(root)

    def _hook(self, root: nn.Module) -> None:
        for path, adapter in self.items():
            layer = root.get_submodule(path)
            if adapter.changes_input:
                self._handles.append(layer.register_forward_pre_hook(_make_pre_hook(adapter)))
            self._handles.append(layer.register_forward_hook(_make_hook(adapter)))

    def _unhook(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []


def _key(path: str) -> str:
    return path.replace(".", "__")


def _make_pre_hook(adapter: AdapterModule):
    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        return (adapter.adapt_input(module, args[0]), *args[1:])

    return pre_hook


def _make_hook(adapter: AdapterModule):
    # args are what the layer ran on: the pre-hook's result where there is one.
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return adapter.adapt_output(module, args[0], output)

    return hook


# Every per-layer adapter suffix: what each algorithm writes, alpha, and the recognised-but-unsupported
# variants (grouped with their layer so loading refuses them with a reason instead of ignoring them).
ADAPTER_SUFFIXES = tuple(
    dict.fromkeys(
        (*(key for cls in ALGORITHMS.values() for key in cls.state_keys), ALPHA_KEY, *UNSUPPORTED_KEYS)
    )
)
# Full-size weight deltas (ComfyUI's built-in trainer writes them for norms and biases): not adapters.
DELTA_SUFFIXES = ("diff", "diff_b", "set_weight")


def group_file_keys(
    sd: Mapping[str, torch.Tensor], paths: Iterable[str], prefix: str = "diffusion_model."
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a LoRA file's keys into adapter groups of our module paths {path: {suffix: tensor}} and
    the rest {key: tensor} (other layers, full-size deltas). Both "<prefix><path>.<suffix>" and kohya
    "lora_unet_<path with _>.<suffix>" names are understood; paths may contain dots."""
    kohya = {"lora_unet_" + p.replace(".", "_"): p for p in paths}
    known = set(kohya.values())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for suffix in ADAPTER_SUFFIXES:
            if key.endswith("." + suffix):
                stem = key[: -len(suffix) - 1]
                path = stem[len(prefix) :] if stem.startswith(prefix) else kohya.get(stem)
                if path in known:
                    groups.setdefault(path, {})[suffix] = value
                    break
        else:
            rest[key] = value
    return groups, rest


# How other tools spell the two LoRA factors (peft / diffusers lora_A / lora_B, peft's named "default"
# adapter, old diffusers "lora.down", bare mochi-style lora_A / lora_B), as ComfyUI's loader reads them.
SUFFIX_ALIASES = {
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_A": "lora_down.weight",
    "lora_B": "lora_up.weight",
}


def normalize_file_keys(
    sd: Mapping[str, torch.Tensor], names: Mapping[str, str],
    alpha: Callable[[str], float | None] | None = None, prefix: str = "diffusion_model.",
    parts: Mapping[str, tuple[str, tuple[int, int], int]] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A LoRA file in any naming the model's loader maps -> our "<prefix><path>.<suffix>" keys.

    names: file stem -> module path (kohya names of either SD naming, diffusers / peft "unet." /
    "transformer." names, LyCORIS "lycoris_" names: the loader's own key map for this model).
    Factor spellings of other tools (SUFFIX_ALIASES) become ours; alpha: file stem -> the scale
    numerator of a file that keeps it outside the tensors (peft's lora_adapter_metadata), added to
    layers without an alpha key. parts: names of parts of a fused layer, merged into one LoRA of it
    first (merge_split_layers). Keys that map to no layer (other models) stay as they are."""
    if parts:
        sd = merge_split_layers(sd, parts, alpha, prefix)
    suffixes = sorted({*ADAPTER_SUFFIXES, *SUFFIX_ALIASES}, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    factored: dict[str, str] = {}  # our stem of a layer with lora_down / lora_up -> its stem in the file
    for key, value in sd.items():
        for suffix in suffixes:
            if key.endswith("." + suffix):
                stem = key[: -len(suffix) - 1]
                path = names.get(stem)
                if path is not None:
                    ours = SUFFIX_ALIASES.get(suffix, suffix)
                    key = f"{prefix}{path}.{ours}"
                    if ours in ("lora_down.weight", "lora_up.weight"):
                        factored[f"{prefix}{path}"] = stem
                elif key.startswith(prefix) and suffix in ("lora_down.weight", "lora_up.weight"):
                    factored[stem] = stem
                break
        out[key] = value
    if alpha is not None:
        for ours, stem in factored.items():
            value = alpha(stem)
            if value is not None:
                out.setdefault(f"{ours}.{ALPHA_KEY}", torch.tensor(float(value)))
    return out


_DOWN_NAMES = ("lora_down.weight", *(k for k, v in SUFFIX_ALIASES.items() if v == "lora_down.weight"))
_UP_NAMES = ("lora_up.weight", *(k for k, v in SUFFIX_ALIASES.items() if v == "lora_up.weight"))


def merge_split_layers(
    sd: Mapping[str, torch.Tensor], parts: Mapping[str, tuple[str, tuple[int, int], int]],
    alpha: Callable[[str], float | None] | None = None, prefix: str = "diffusion_model.",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """LoRA factors a file keeps per part of a fused layer (diffusers' separate to_q / to_k / to_v of
    Flux's qkv) -> one LoRA of the fused layer, "<prefix><path>.lora_down / lora_up / alpha", with the
    same ΔW: each part's scale alpha / rank folded into its B, the parts' B placed in their rows (rows
    no part covers stay zero). Parts sharing one A (as diffusers' conversions of a fused LoRA write
    them) keep its rank; otherwise the A's are stacked and B is block-diagonal (rank = the sum).

    parts: file stem -> (module path, (first row, end row), output size of the layer); alpha: file
    stem -> alpha kept outside the tensors (peft metadata). Layers the file also holds whole, parts
    that overlap or do not fit their rows, and everything else are left as they are."""
    found: dict[str, list[tuple[tuple[int, int], int, list[str], torch.Tensor, torch.Tensor, float]]] = {}
    for stem, (path, rows, size) in parts.items():
        down_key = next((f"{stem}.{n}" for n in _DOWN_NAMES if f"{stem}.{n}" in sd), None)
        up_key = next((f"{stem}.{n}" for n in _UP_NAMES if f"{stem}.{n}" in sd), None)
        if down_key is None or up_key is None:
            continue
        down, up = sd[down_key], sd[up_key]
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != rows[1] - rows[0] or up.shape[1] != down.shape[0]:
            continue
        rank = down.shape[0]
        a = sd.get(f"{stem}.{ALPHA_KEY}")
        value = float(a) if a is not None and a.numel() == 1 else (alpha(stem) if alpha is not None else None)
        keys = [down_key, up_key] + ([f"{stem}.{ALPHA_KEY}"] if a is not None else [])
        found.setdefault(path, []).append(
            (rows, size, keys, down, up, (value if value is not None else rank) / rank)
        )
    out = dict(sd)
    for path, items in found.items():
        if f"{prefix}{path}.lora_up.weight" in sd or f"{prefix}{path}.lora_down.weight" in sd:
            continue
        items.sort(key=lambda item: item[0])
        ends = [0] + [rows[1] for rows, *_ in items]
        if any(rows[0] < ends[i] for i, (rows, *_) in enumerate(items)) or ends[-1] > items[0][1]:
            continue  # overlapping parts, or rows beyond the layer
        shared = all(
            item[3].shape == items[0][3].shape and torch.equal(item[3], items[0][3]) for item in items
        )
        downs = [items[0][3]] if shared else [item[3] for item in items]
        rank = sum(d.shape[0] for d in downs)
        dtype = items[0][4].dtype
        up = torch.zeros(items[0][1], rank, dtype=torch.float32)
        col = 0
        for rows, _, keys, down, part_up, scale in items:
            width = down.shape[0]
            up[rows[0] : rows[1], col : col + width] = part_up.float() * scale
            col += 0 if shared else width
            for key in keys:
                out.pop(key, None)
        out[f"{prefix}{path}.lora_down.weight"] = torch.cat([d.to(dtype) for d in downs])
        out[f"{prefix}{path}.lora_up.weight"] = up.to(dtype)
        out[f"{prefix}{path}.{ALPHA_KEY}"] = torch.tensor(float(rank))
    return out


KEY_FORMATS = ("comfyui", "kohya", "diffusers")


def convert_key_format(
    sd: Mapping[str, torch.Tensor], key_format: str, file_names: Mapping[str, Mapping] | None = None,
    prefix: str = "diffusion_model.",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """LORA_MODEL keys "<prefix><path>.<suffix>" -> (tensors, metadata to add) in the chosen file naming.

    comfyui: keys as they are. kohya: "<stem>.<suffix>" with the stem kohya sd-scripts uses for the
    layer (file_names["kohya"]: path -> stem; SD1.x / SD2 use diffusers module names there), else
    "lora_unet_<path with dots as _>" (the model's own module names, as kohya uses for SDXL, SD3, Flux).
    diffusers: see to_peft_names (file_names["diffusers"]). Tensor layouts are already the ones those
    tools expect (conv LoRA down [r, in, kh, kw], up [out, r, 1, 1]). Keys without the prefix are kept."""
    file_names = file_names or {}
    if key_format == "comfyui":
        return dict(sd), {}
    if key_format == "diffusers":
        return to_peft_names(sd, file_names.get("diffusers") or {}, prefix)
    if key_format != "kohya":
        raise ValueError(f"key_format must be one of {', '.join(KEY_FORMATS)}; got {key_format!r}")
    kohya_names = file_names.get("kohya") or {}
    out = {}
    for key, value in sd.items():
        path, suffix = _split_key(key, prefix, ADAPTER_SUFFIXES + DELTA_SUFFIXES)
        if path is None:
            out[key] = value
        else:
            out[kohya_names.get(path, "lora_unet_" + path.replace(".", "_")) + "." + suffix] = value
    return out, {}


def _split_key(key: str, prefix: str, suffixes: Sequence[str]) -> tuple[str | None, str]:
    """ "<prefix><path>.<suffix>" -> (path, suffix); (None, "") for a key of another shape."""
    if key.startswith(prefix):
        for suffix in suffixes:
            if key.endswith("." + suffix):
                return key[len(prefix) : -len(suffix) - 1], suffix
    return None, ""


_LORA_FILE_KEYS = ("lora_down.weight", "lora_up.weight", ALPHA_KEY)


def to_peft_names(
    sd: Mapping[str, torch.Tensor], names: Mapping[str, Sequence[tuple[str, tuple[int, int] | None]]],
    prefix: str = "diffusion_model.",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """A LoRA in the naming diffusers and peft write and read: "<name>.lora_A.weight" (down) and
    "<name>.lora_B.weight" (up), names from ``names`` (path -> [(name, output rows or None)]: "unet." /
    "transformer." module names; a fused layer diffusers splits gets one pair per part, sharing A),
    else "<prefix><path>" (the model's own names, which ComfyUI and ai-toolkit use).

    peft files carry no alpha tensors, and ComfyUI ignores the alpha peft keeps in its metadata, so
    each layer's scale alpha / rank is folded into B and alpha equals rank: every reader computes the
    same ΔW. The metadata key ``lora_adapter_metadata`` holds the peft LoraConfig diffusers writes
    (per component: r, lora_alpha, target_modules, rank / alpha patterns). LoRA only: LoHa and LoKr
    have no peft naming that diffusers and ComfyUI both read."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        path, suffix = _split_key(key, prefix, ADAPTER_SUFFIXES)
        if path is None:  # full-size deltas, other keys: kept under their own names
            out[key] = value
            continue
        if suffix not in _LORA_FILE_KEYS:
            raise ValueError(
                f"key_format: 'diffusers' holds LoRA weights only (peft lora_A / lora_B), but layer {path} has "
                f"'{suffix}' (a LoHa, LoKr, OFT or DoRA key); save it with key_format comfyui or kohya"
            )
        groups.setdefault(path, {})[suffix] = value
    unnamed = sorted(p for p in groups if not names.get(p))
    if names and unnamed:
        log.warning("LoRA Lab: key_format diffusers: %d layer(s) have no diffusers name and keep ComfyUI's "
                    "(%s): ComfyUI applies them, diffusers skips them", len(unnamed),
                    ", ".join(prefix + p for p in unnamed[:4]) + (" ..." if len(unnamed) > 4 else ""))  # fmt: skip
    ranks: dict[str, dict[str, int]] = {}  # component ("unet", "transformer") -> module name -> rank
    for path, group in groups.items():
        down, up = group.get("lora_down.weight"), group.get("lora_up.weight")
        if down is None or up is None:
            raise ValueError(
                f"key_format: layer {path} lacks lora_down or lora_up; it cannot be written for diffusers"
            )
        rank = down.shape[0]
        alpha = float(group[ALPHA_KEY]) if ALPHA_KEY in group else float(rank)
        if alpha != rank:
            up = (up.float() * (alpha / rank)).to(up.dtype)
        parts = names.get(path) or [(prefix + path, None)]
        for i, (name, rows) in enumerate(parts):
            # safetensors refuses tensors that share storage: every part past the first gets a copy of A
            out[f"{name}.lora_A.weight"] = down if i == 0 else down.clone()
            out[f"{name}.lora_B.weight"] = (up if rows is None else up[rows[0] : rows[1]]).contiguous()
            component, _, module = name.partition(".")
            if component in ("unet", "transformer"):
                ranks.setdefault(component, {})[module] = rank
    config: dict[str, object] = {}
    for component, modules in ranks.items():
        counts: dict[int, int] = {}
        for r in modules.values():
            counts[r] = counts.get(r, 0) + 1
        r = max(counts, key=lambda k: (counts[k], -k))
        pattern = {f"^{re.escape(m)}": rk for m, rk in sorted(modules.items()) if rk != r}
        config.update({f"{component}.r": r, f"{component}.lora_alpha": r, f"{component}.target_modules": sorted(modules),
                       f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": dict(pattern)})  # fmt: skip
    return out, ({"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)} if config else {})


@contextlib.contextmanager
def frozen(root: nn.Module) -> Iterator[None]:
    """requires_grad off for every base parameter during training (no grads, no memory for them);
    the flags are restored afterwards so the caller's module is left as it was."""
    changed = [p for p in root.parameters() if p.requires_grad]
    try:
        for p in changed:
            p.requires_grad_(False)
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)
