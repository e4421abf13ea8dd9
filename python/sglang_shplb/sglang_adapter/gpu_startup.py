"""CUDA start-up glue: what SGLang 0.5.23 must decide before it sizes memory and captures graphs, and
what the GPU path refuses at start-up (never mid-request).

`register_server_args_hook()` runs in every process that resolves ServerArgs — our launcher's child and
stock `python -m sglang.launch_server --attention-backend shplb` alike (plugins load before resolution).
On CUDA with shplb as (prefill or decode) attention backend it declares, next to SGLang's own
attention-backend rules:
  * prefill CUDA graphs off (0.5.23 captures breakable prefill graphs by default; our extend is eager),
    decode graphs kept (the backend implements capture/replay over fixed buffers);
  * mem_fraction_static x 1/(1 + m) when page metadata is kept: bf16 min/max per page and KV head are
    m = 1/P of a bf16 KV pool, plus 1/sub for a two-stage decode selector's sub-page min/max (1/4 at
    two_stage4) or r/(2 D) for a label selector's bf16 label cache (r of each token's 2 D K/V values:
    1/4 at two_stage_label32 with head_dim 64, 1/8 at 128), allocated at start-up from the memory this frees.
"""
from __future__ import annotations

import logging

from ..config import ConfigError, ShplbConfig

logger = logging.getLogger("sglang_shplb")
MIN_GPU_PAGE = 16      # tl.dot tiles in the decode and prefill kernels
TARGET = "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility"


def metadata_memory_scale(shplb: ShplbConfig, head_dim: int | None = None) -> float:
    """Factor on mem_fraction_static that pays for the page metadata (a share of the KV pool's bytes), for
    the selector serving.decode_selector resolves; head_dim unknown: 64, the larger label share."""
    from ..selection import get_selector
    from ..serving import decode_selector

    share = 1.0 / shplb.page_size
    rule = get_selector(decode_selector(shplb))
    decode_sparse = any(v is not None for v in (shplb.uniform_budget, shplb.budgets, shplb.plan))
    if decode_sparse and rule.shortlist and rule.label:
        share += rule.keys / (2.0 * (head_dim or 64))
    elif decode_sparse and rule.sub and rule.shortlist:
        share += 1.0 / rule.sub
    return 1.0 / (1.0 + share)


def _head_dim(cfg) -> int | None:
    try:
        from ..artifacts import model_shape

        return int(model_shape(cfg.model_path)["head_dim"])
    except Exception:  # noqa: BLE001 - a hub id or an odd config: the conservative share
        return None


def _after_attention_compat(result, server_args, *args, **kwargs):
    try:
        _declare_gpu_settings(server_args)
    except Exception as e:  # noqa: BLE001 - a resolution layout we do not know must not stop the server
        logger.warning("[sglang-shplb] could not declare the CUDA settings (%s); pass --cuda-graph-backend-prefill "
                       "disabled and a lower --mem-fraction-static yourself", e)
    return None


def _declare_gpu_settings(server_args) -> None:
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    cfg = resolving_view(server_args)
    names = {getattr(cfg, f, None) for f in ("attention_backend", "prefill_attention_backend",
                                              "decode_attention_backend")}
    if "shplb" not in names or str(getattr(cfg, "device", "cuda") or "cuda") not in ("cuda",):
        return
    graphs = cfg.cuda_graph_config
    if graphs is not None and graphs.prefill.backend != Backend.DISABLED:
        logger.warning("[sglang-shplb] prefill CUDA graphs off (--cuda-graph-backend-prefill disabled): the shplb "
                       "backend's extend runs eagerly; decode graphs stay on")
        declare_resolution(server_args, "sglang_shplb", cuda_graph_config=with_phase(graphs, Phase.PREFILL,
                                                                                     backend=Backend.DISABLED))
    shplb = ShplbConfig.from_env()
    if shplb.sparse and cfg.mem_fraction_static:
        declare_resolution(server_args, "sglang_shplb", mem_fraction_static=metadata_fraction(
            shplb, cfg.mem_fraction_static, _head_dim(cfg), explicit=_explicit(server_args, "mem_fraction_static")))


def _explicit(server_args, field: str) -> bool:
    return (getattr(server_args, "_raw_input", None) or {}).get(field) is not None


def metadata_fraction(shplb: ShplbConfig, frac: float, head_dim: int | None, explicit: bool) -> float:
    """The mem_fraction_static SGLang sizes weights + KV pool with, so that the page metadata allocated at
    start-up fits inside `frac` too: a fraction the user gave is the whole budget, never silently exceeded."""
    from ..serving import decode_selector

    scale = metadata_memory_scale(shplb, head_dim)
    out = round(frac * scale, 3)
    logger.warning("[sglang-shplb] mem_fraction_static %.3f%s -> %.3f for SGLang: page metadata (%.3f of the KV "
                   "pool, selector %s) is allocated at start-up inside it", frac,
                   " (--mem-fraction-static)" if explicit else "", out, 1 / scale - 1, decode_selector(shplb))
    return out


def register_server_args_hook() -> None:
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:   # SGLang without the hook registry: the launcher passes the flags itself
        return
    HookRegistry.register(TARGET, _after_attention_compat, HookType.AFTER)


def attention_dims(model) -> tuple[int, int, int, int]:
    """(query heads, KV heads, K head size, V head size) on this rank, from the model's attention layers."""
    from sglang.srt.layers.radix_attention import RadixAttention

    for m in model.modules():
        if isinstance(m, RadixAttention):
            return m.tp_q_head_num, m.tp_k_head_num, m.qk_head_dim, m.v_head_dim
    raise ConfigError("the model has no attention layers; the shplb backend has nothing to do")


def refuse_unsupported(model_runner, page_size: int) -> set[int]:
    """ConfigError (start-up) for configurations the CUDA path cannot serve correctly; returns the names of
    attention layers that will run dense through torch_native (sliding-window / soft-cap), which
    cannot be captured — then decode graphs must be off."""
    from sglang.srt.layers.radix_attention import RadixAttention

    problems = []
    kv_dtype = getattr(model_runner, "kv_cache_dtype", None)
    if kv_dtype is not None and "float8" in str(kv_dtype):
        problems.append(f"FP8 KV cache ({kv_dtype}) is not supported by the shplb kernels yet (no KV scales); "
                        "drop --kv-cache-dtype or use --kv-cache-dtype auto")
    if page_size < MIN_GPU_PAGE:
        problems.append(f"--shplb-page-size {page_size} is below {MIN_GPU_PAGE}, the smallest page the GPU kernels "
                        f"take; use --shplb-page-size {MIN_GPU_PAGE} (or 32)")
    try:
        from sglang.srt.environ import envs

        if envs.SGLANG_USE_HND_KVCACHE.get():
            problems.append("SGLANG_USE_HND_KVCACHE (HND KV layout) is not supported by the shplb kernels; unset it")
    except Exception:  # noqa: BLE001 - older SGLang: no HND layout at all
        pass
    if not model_runner.spec_algorithm.is_none():
        problems.append("speculative decoding is not supported by the shplb backend; drop --speculative-algorithm")
    dense_layers = []
    for name, m in model_runner.model.named_modules():
        if not isinstance(m, RadixAttention):
            continue
        if m.v_head_dim != m.qk_head_dim:
            problems.append(f"layer {name}: V head size {m.v_head_dim} != K head size {m.qk_head_dim} (e.g. MLA) is "
                            "not supported by the shplb backend; serve this model with another attention backend")
            break
        if (m.sliding_window_size is not None and m.sliding_window_size > 0) or (m.logit_cap or 0) > 0 \
                or getattr(m, "is_cross_attention", False):
            dense_layers.append(m.layer_id)
    if problems:
        raise ConfigError("shplb on CUDA: " + "; ".join(problems))
    if dense_layers:
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend

        if not check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED):
            raise ConfigError(f"{len(dense_layers)} attention layers use a sliding window, logit soft-capping or "
                              "cross-attention; "
                              "shplb runs them dense with SGLang's torch-native attention, which CUDA graphs cannot "
                              "capture; add --cuda-graph-backend-decode disabled")
        logger.warning("[sglang-shplb] %d sliding-window / soft-cap attention layers run dense (torch_native)",
                       len(dense_layers))
    return set(dense_layers)


DENSE_EXTEND_BACKENDS = ("flashinfer", "triton")   # SGLang's own CUDA backends, in order of preference


def dense_extend_backend(model_runner):
    """(backend, name) for dense prefill/extend on CUDA: SGLang's own FlashInfer backend, built by SGLang's
    registry exactly as `--attention-backend flashinfer` would (its JIT and first plan() run in SGLang's
    start-up warm-up request), else SGLang's Triton backend; each refusal is one log line. (None, reason)
    when neither can be built: the extend then runs SGLang's torch-native code (correct, slow)."""
    import importlib.util

    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from .platform_check import flashinfer_unbuildable

    reasons, unbuildable = [], flashinfer_unbuildable()
    for name in DENSE_EXTEND_BACKENDS:
        if name == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
            reasons.append("flashinfer: not installed")
        elif name == "flashinfer" and unbuildable:
            reasons.append(f"flashinfer: {unbuildable}")
        elif name not in ATTENTION_BACKENDS:
            reasons.append(f"{name}: not registered in this SGLang")
        else:
            try:
                return ATTENTION_BACKENDS[name](model_runner), name
            except Exception as e:  # noqa: BLE001 - any failure to build it: say so once, try the next
                reasons.append(f"{name}: {type(e).__name__}: {e}")
        logger.warning("[sglang-shplb] dense prefill/extend cannot use %s", reasons[-1])
    return None, "; ".join(reasons)
