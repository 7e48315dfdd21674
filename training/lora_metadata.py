"""What a trained adapter's file says about itself: LoRA Lab's own ``loralab.*`` keys, kohya's
``ss_*`` (read by A1111 / Forge and sd-scripts) and SAI ModelSpec; and reading the alphas that peft /
diffusers files keep in their metadata instead of the tensors. No ComfyUI imports."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Mapping

__all__ = ["build_metadata", "base_model_info", "peft_alphas", "MODELSPEC_VERSION"]

PACK_NAME = "LoRA Lab"
MODELSPEC_VERSION = "1.0.1"  # the version kohya sd-scripts writes (resolution, prediction_type)
# The tensor keys are ComfyUI module paths, so ComfyUI is the implementation they follow.
MODELSPEC_IMPLEMENTATION = "https://github.com/comfyanonymous/ComfyUI"

# family key -> (modelspec architecture, ss_base_model_version)
_FAMILIES: dict[str, tuple[str, str]] = {
    "sd1": ("stable-diffusion-v1", "sd_v1"),
    "sd2": ("stable-diffusion-v2-512", "sd_v2"),
    "sd2v": ("stable-diffusion-v2-768-v", "sd_v2"),
    "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
    "sdxlrefiner": ("stable-diffusion-xl-v1-refiner", "sdxl_refiner_v1-0"),
    "sd3": ("stable-diffusion-3", "sd3"),
    "flux": ("flux-1", "flux1"),  # a Flux.1 variant kohya has no name for (Kontext, Fill, ...)
    "fluxdev": ("flux-1-dev", "flux1"),
    "fluxschnell": ("flux-1-schnell", "flux1"),
    "chroma": ("chroma", "chroma"),
    "lumina2": ("lumina-2", "lumina2"),
}


def base_model_info(family: str | None) -> tuple[str, str]:
    """``(modelspec architecture, ss_base_model_version)`` for a base-model family name.

    Accepts loose spellings and ComfyUI model-config class names: ``sd15``/``SD15``/``sd1.5``,
    ``sd2``/``SD20``/``SD21UnclipL``, ``sdxl``/``SDXL``, ``SDXLRefiner``, ``sd3``/``SD3``, ``Flux`` (Flux.1
    dev), ``FluxSchnell``, other Flux.1 variants, ``Chroma``, ``Lumina2``: the architecture names kohya
    sd-scripts writes (``flux-1-dev``, ``flux-1-schnell``, ``flux-1``, ``chroma``, ``lumina-2``).
    Unknown names are passed through (lower-cased, cleaned); None gives ``("unknown", "unknown")``.
    """
    key = re.sub(r"[^a-z0-9]", "", str(family or "").lower())
    if key in ("", "unknown", "basemodel", "none"):  # comfy.model_base.BaseModel serves SD1 and SD2 alike
        return "unknown", "unknown"
    if key.startswith("sdxlrefiner"):
        return _FAMILIES["sdxlrefiner"]
    if key.startswith("sdxl") or key.startswith("ssd1b"):
        return _FAMILIES["sdxl"]
    if key.startswith("sd3"):
        return _FAMILIES["sd3"]
    if key in ("flux", "fluxdev", "flux1dev"):  # ComfyUI's "Flux" class is Flux.1 dev
        return _FAMILIES["fluxdev"]
    if key.startswith(("fluxschnell", "flux1schnell")):
        return _FAMILIES["fluxschnell"]
    if key.startswith("flux") and not key.startswith("flux2"):
        return _FAMILIES["flux"]
    if key.startswith("chroma") and "radiance" not in key:
        return _FAMILIES["chroma"]
    if key.startswith("lumina2"):
        return _FAMILIES["lumina2"]
    if key.startswith("sd2") or key.startswith("sdv2"):
        return _FAMILIES["sd2v" if key.endswith("v") else "sd2"]
    if key.startswith("sd1") or key.startswith("sdv1"):
        return _FAMILIES["sd1"]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", str(family).strip().lower()).strip("-") or "unknown"
    return cleaned, cleaned


_ALGO_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "dora": "DoRA"}
# the trainer's target -> ModelSpec's prediction_type (other parameterisations: not written)
_MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v", "flow": "flow"}


def _num(value: float | int) -> str:
    """Shortest round-tripping text of a number (``1e-4`` -> ``'0.0001'``, ``8`` -> ``'8'``)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


# LyCORIS network arguments that train the same kind of file (kohya ss_network_args).
_LYCORIS_ARGS = {"oft": {"algo": "diag-oft"}, "dora": {"algo": "lora", "dora_wd": True, "wd_on_out": False}}


def build_metadata(
    *,
    steps: int,
    algorithm: str = "lora",
    rank: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    optimizer: str | None = None,
    learning_rate: float | None = None,
    loss: float | None = None,
    training_dtype: str | None = None,
    lora_dtype: str | None = None,
    model_family: str | None = None,
    base_model: str | None = None,
    dataset_size: int | None = None,
    pack_version: str | None = None,
    title: str | None = None,
    resolution: str | None = None,
    prediction_type: str | None = None,
    date: _dt.datetime | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """String metadata for a trained adapter: ``loralab.*``, kohya ``ss_*`` and SAI ModelSpec keys.

    ``algorithm`` is ``"lora"``, ``"loha"``, ``"lokr"``, ``"oft"`` or ``"dora"`` (other LyCORIS names pass
    through); kohya's ``ss_network_args`` name them as LyCORIS' network module does.
    ``loss`` is the final (or smoothed final) training loss.  ``model_family`` (alias ``base_model``)
    names the base model, best as ComfyUI's model-config class name (``SD15``, ``SDXL``, ``SD3``,
    ``Flux``; see :func:`base_model_info`).  Keys whose value is None are left out.
    ``extra`` entries are added last as ``str(value)`` (already ``str`` values are kept as they are).
    ``resolution`` ("<width>x<height>" in pixels) and ``prediction_type`` (the trainer's target: eps,
    v, flow) go into ModelSpec 1.0.1 as kohya sd-scripts writes it; ``ss_v2`` tells A1111 / Forge an SD2
    file from an SD1 one, and a v-prediction SD2 is the 768-v architecture.
    """
    algo = (algorithm or "lora").strip().lower()
    if model_family is None:
        model_family = base_model
    arch, base_version = base_model_info(model_family)
    if base_version == "sd_v2" and prediction_type == "v":
        arch = _FAMILIES["sd2v"][0]
    when = (date or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0)
    if when.tzinfo is None:
        when = when.astimezone()
    iso_date = when.isoformat()

    md: dict[str, str | None] = {
        "loralab.format_version": "1",
        "loralab.steps": _num(int(steps)),
        "loralab.algorithm": algo,
        "loralab.rank": None if rank is None else _num(int(rank)),
        "loralab.alpha": None if alpha is None else _num(alpha),
        "loralab.seed": None if seed is None else _num(int(seed)),
        "loralab.optimizer": optimizer,
        "loralab.learning_rate": None if learning_rate is None else _num(learning_rate),
        "loralab.final_loss": None if loss is None else _num(loss),
        "loralab.training_dtype": training_dtype,
        "loralab.lora_dtype": lora_dtype,
        "loralab.model_family": None if model_family is None else str(model_family),
        "loralab.dataset_size": None if dataset_size is None else _num(int(dataset_size)),
        "loralab.version": pack_version,
        # kohya-ss / A1111 readers
        "ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
        "ss_network_dim": None if rank is None else _num(int(rank)),
        "ss_network_alpha": None if alpha is None else _num(alpha),
        "ss_network_args": None if algo == "lora" else json.dumps(_LYCORIS_ARGS.get(algo, {"algo": algo})),
        "ss_steps": _num(int(steps)),
        "ss_max_train_steps": _num(int(steps)),
        "ss_learning_rate": None if learning_rate is None else _num(learning_rate),
        "ss_unet_lr": None if learning_rate is None else _num(learning_rate),
        "ss_seed": None if seed is None else _num(int(seed)),
        "ss_optimizer": optimizer,
        "ss_num_train_images": None if dataset_size is None else _num(int(dataset_size)),
        "ss_base_model_version": base_version,
        "ss_v2": None if base_version == "unknown" else str(base_version == "sd_v2"),
        "ss_network_train_unet_only": "True",
        "ss_training_finished_at": _num(int(when.timestamp())),
        # SAI ModelSpec 1.0.1
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/{algo}",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title or f"{PACK_NAME} {_ALGO_NAMES.get(algo, algo)} {iso_date}",
        "modelspec.date": iso_date,
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": _MODELSPEC_PREDICTION.get(prediction_type or ""),
    }
    out = {k: v for k, v in md.items() if v is not None}
    for key, value in (extra or {}).items():
        out[str(key)] = value if isinstance(value, str) else str(value)
    return out


# peft's pattern keys are regular expressions; only plain ones are honoured (literal text, ".", "\\.",
# "^", "$", "[...]" and at most one "*"), so a file's metadata cannot make matching slow.
_PLAIN_PATTERN = re.compile(r"^\^?(?:[\w\-]|\\.|\.|\[[^\]]{1,40}\]|\*|\?){1,400}\$?$")


def _peft_field(value, kind=float):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return kind(value)
    return None


def peft_alphas(metadata: Mapping[str, str] | None) -> Callable[[str], float | None] | None:
    """The LoRA alpha a diffusers / peft file keeps outside its tensors, per layer: file stem (e.g.
    "unet.down_blocks.0.attentions.0.proj_in") -> alpha, from ``lora_adapter_metadata``. That JSON is a
    peft LoraConfig, either flat ("lora_alpha", "alpha_pattern") or per component the way diffusers
    writes it ("unet.lora_alpha", "transformer.alpha_pattern") or nested ({"unet": {...}}); an
    alpha_pattern entry wins over lora_alpha. None when the file has no such metadata; the function
    returns None for a layer it says nothing about (that layer then keeps alpha = rank, scale 1)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(info, dict):
        return None
    configs: dict[str, dict] = {}  # component ("" for a flat config) -> its fields
    for key, value in info.items():
        if isinstance(value, dict) and "." not in str(key) and key not in ("alpha_pattern", "rank_pattern"):
            configs.setdefault(str(key), {}).update(value)
        elif "." in str(key):
            component, _, field = str(key).partition(".")
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[str(key)] = value
    rules: list[tuple[str, list[tuple[re.Pattern, float]], float | None]] = []
    for component in sorted(configs, key=len, reverse=True):  # a component's own config before a flat one
        fields = configs[component]
        patterns = []
        raw_patterns = fields.get("alpha_pattern")
        for pattern, value in raw_patterns.items() if isinstance(raw_patterns, dict) else ():
            alpha = _peft_field(value)
            if (
                alpha is not None
                and isinstance(pattern, str)
                and _PLAIN_PATTERN.match(pattern)
                and pattern.count("*") <= 1
            ):
                try:
                    patterns.append((re.compile(rf"(.*\.)?({pattern})$"), alpha))
                except re.error:
                    continue
        rules.append((component, patterns, _peft_field(fields.get("lora_alpha"))))

    def alpha_for(stem: str) -> float | None:
        for component, patterns, default in rules:
            if component and not stem.startswith(component + "."):
                continue
            module = stem[len(component) + 1 :] if component else stem
            for pattern, alpha in patterns:
                if pattern.match(module):
                    return alpha
            return default
        return None

    return alpha_for
