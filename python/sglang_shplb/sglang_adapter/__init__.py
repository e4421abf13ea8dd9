"""SGLang-facing glue: the only package of sglang_shplb that imports SGLang.

`register()` is our entry point in the `sglang.srt.plugins` group. SGLang calls it in the
launcher and again first thing in every spawned scheduler/TP worker, so it must be idempotent
and cheap; each step guards itself.
"""
from __future__ import annotations

import inspect
import os
import sys

_registered = False


def _caller() -> str:
    """Which SGLang function loaded the plugins (e.g. run_scheduler_process): shows per process
    that our extensions are active there."""
    for frame in inspect.stack()[2:]:
        mod = frame.frame.f_globals.get("__name__", "")
        if mod.startswith("sglang.") and not mod.startswith("sglang.srt.plugins"):
            return f"{mod}.{frame.function}"
    return "unknown"


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from . import api_checks, backend, gpu_startup, weights  # noqa: F401  (SGLang imported lazily there)

    backend.register_backend()
    gpu_startup.register_server_args_hook()
    weights.register_weight_hook()
    api_checks.register_api_checks()
    print(f"[sglang-shplb] plugin loaded pid={os.getpid()} caller={_caller()}", file=sys.stderr, flush=True)
