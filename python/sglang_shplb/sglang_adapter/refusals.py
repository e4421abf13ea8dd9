"""Configurations the shplb backend cannot serve correctly on any device, refused at start-up in one line.

The launcher checks SGLang's flags before SGLang starts (`server_problems` on its parsed argv); the backend
checks again in every worker (stock `python -m sglang.launch_server --attention-backend shplb` has no
launcher) and adds what only the loaded model shows (`model_problems`). Device-specific limits of the CUDA
kernels live in gpu_startup.refuse_unsupported.
"""
from __future__ import annotations

from ..config import ConfigError

# KV caches stored packed or block-scaled: a page's key min/max of stored bytes is not a bound on its keys.
PACKED_KV = ("nvfp4", "fp4_mx_block16", "mxfp8")
HALF = ("torch.float16", "torch.bfloat16")

# (server_args field, is it set?, what it is, why it breaks page selection, the fix)
SERVER_RULES = (
    ("pp_size", lambda v: (v or 1) > 1, "pipeline parallelism (--pp-size {v})",
     "budgets and plans index every layer of one model, a stage holds a slice", "use --pp-size 1 and --tp N"),
    ("enable_two_batch_overlap", bool, "two-batch overlap (--enable-two-batch-overlap)",
     "it runs several backend instances, each with its own page metadata", "drop the flag"),
    ("enable_pdmux", bool, "PD multiplexing (--enable-pdmux)",
     "it runs several backend instances, each with its own page metadata", "drop the flag"),
    ("enable_hierarchical_cache", bool, "the hierarchical cache (--enable-hierarchical-cache)",
     "KV loaded back from host memory bypasses the backend, so its pages are never folded", "drop the flag"),
    ("kv_cache_dtype", lambda v: str(v) in PACKED_KV, "a packed KV cache (--kv-cache-dtype {v})",
     "page bounds of packed bytes are not bounds of the keys", "use --kv-cache-dtype auto"),
)


def server_problems(args) -> list[str]:
    """One sentence per unsupported setting in `args` (SGLang's ServerArgs or its parsed argv)."""
    problems = []
    for field, is_set, what, why, fix in SERVER_RULES:
        v = getattr(args, field, None)
        if v is not None and is_set(v):
            problems.append(f"{what.format(v=v)} is not supported by the shplb backend ({why}); {fix}")
    return problems


def _has_attention_sinks(model) -> bool:
    """Learned per-head sink logits (gpt-oss `sinks`, MiMo's `attention_sink_bias`) that the model passes to
    attention as `sinks=`: the shplb softmax has no term for them."""
    return any(getattr(m, name, None) is not None for m in model.modules() for name in ("sinks", "attention_sink_bias"))


def model_problems(model_runner) -> list[str]:
    problems = []
    if getattr(model_runner, "is_hybrid_swa", False):
        problems.append("hybrid sliding-window KV pools (this model's SWA layers) are not supported by the shplb "
                        "backend; serve this model with another attention backend")
    model = getattr(model_runner, "model", None)
    if model is not None and _has_attention_sinks(model):
        problems.append("attention sinks (learned sink logits, e.g. gpt-oss) are not supported by the shplb backend; "
                        "serve this model with another attention backend")
    kv, dt = str(getattr(model_runner, "kv_cache_dtype", None)), str(getattr(model_runner, "dtype", None))
    if kv in HALF and dt in HALF and kv != dt:
        problems.append(f"a {kv.split('.')[-1]} KV cache under a {dt.split('.')[-1]} model is not supported by the "
                        "shplb backend (queries and keys must share a dtype); use --kv-cache-dtype auto")
    return problems


def refuse_at_startup(model_runner) -> None:
    """ConfigError naming every unsupported setting of this worker, before any memory is sized for it."""
    problems = server_problems(getattr(model_runner, "server_args", None)) + model_problems(model_runner)
    if problems:
        raise ConfigError("shplb: " + "; ".join(problems))
