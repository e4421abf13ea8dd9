"""Triton <= 3.6's interpreter turns a runtime loop bound into an int with int(ndarray) on a
1-element array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted");
Triton 3.9 squeezes first. GPU images ship Triton 3.6 with numpy >= 2.5, so apply the same fix,
only under TRITON_INTERPRET=1 (compiled kernels never take this path)."""
from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_shplb_fixed", False):
        return

    def patched(tensor, scope, *args, **kwargs):
        orig(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._shplb_fixed = True
    interpreter._patch_lang_tensor = patched
