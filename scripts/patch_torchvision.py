"""Make a torchvision wheel without a matching C extension importable (pure-Python part only).

With CPU torch 2.13 there is no matching torchvision build on PyPI; the CUDA wheel installed with
--no-deps fails at import because `torchvision/_meta_registrations.py` registers fake kernels with
`@torch.library.register_fake("torchvision::...")` even when the C extension (which defines those
operators) did not load. ComfyUI only needs torchvision's pure-Python parts, so this rewrites those
decorators to be skipped when `torchvision.extension._has_ops()` is false. Idempotent.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

MARKER = "# loralab: register_fake guarded"
GUARD = f"""
{MARKER}
def _loralab_register_fake(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

"""


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        return 0
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        print(f"unexpected layout of {path}; not patched", file=sys.stderr)
        return 1
    text = text.replace(anchor, anchor + GUARD, 1)
    text = text.replace("@torch.library.register_fake(", "@_loralab_register_fake(")
    path.write_text(text)
    print(f"patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
