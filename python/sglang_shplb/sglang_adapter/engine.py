"""What the CPU and the CUDA decode engines share: their set-up and the per-layer reads meter.

Both engines (cpu_engine.CpuEngine, gpu_engine.GpuEngine) have one interface, which the backend calls:
`plan(forward_batch)` once per step (and `reserve`, `plan_graph`, `prepare_graph` for decode CUDA graphs, which
the CPU engine refuses or skips), `fold(layer_id, locs, k)` whenever keys arrive, `decodes(layer)` and
`decode(layer, q, forward_batch)` per layer, `metadata(layer_id)` and `label_cache(layer_id)` for prefill and the
carry seed; `carry`, `dense_extend` (an SGLang backend for dense extends, or None: torch_native's) and
`prefill_attend` (sparse_prefill's attention kernel, or None: torch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger("sglang_shplb")
LOG_EVERY_STEPS = 64


@dataclass
class Setup:
    cfg: object                      # config.ShplbConfig
    budgets: torch.Tensor | None     # this rank's decode budgets [layers, local KV heads]; None: dense decode
    budget_ref: object               # selection.BudgetRef: where the budgets were made (pages_for_budget)
    selector: str
    channels: torch.Tensor | None    # a label selector's channels [layers, local KV heads, r], on the device
    num_layers: int
    req_to_token_pool: object
    token_to_kv_pool: object
    device: object
    tp_rank: int
    sdpa_decode: Callable            # SGLang's torch_native dense decode (a step where every head reads all)

    @property
    def rows(self) -> int:
        return self.req_to_token_pool.req_to_token.shape[0]


class ReadsMeter:
    """KV tokens read per layer on this rank (how users see the balance across ranks): a Prometheus gauge when
    --enable-metrics is on, and a log line every LOG_EVERY_STEPS decode steps."""

    def __init__(self, tp_rank: int):
        self.tp_rank, self.steps, self.gauge = tp_rank, 0, _metrics_gauge()

    def step(self, read: torch.Tensor, dense: torch.Tensor) -> None:
        """One decode step done; read / dense: cumulative tokens per layer (host or device)."""
        self.steps += 1
        if self.gauge is not None:
            for i, x in enumerate(read.tolist()):
                self.gauge.labels(tp_rank=str(self.tp_rank), layer=str(i)).set(x)
        if self.steps % LOG_EVERY_STEPS == 0:
            logger.info("[sglang-shplb] tp_rank=%d kv tokens read (all layers, %d steps): %d of %d dense (%.3f); "
                        "per layer: %s", self.tp_rank, self.steps, float(read.sum()), float(dense.sum()),
                        float(read.sum() / dense.sum().clamp(min=1)), [int(x) for x in read.tolist()])


def _metrics_gauge():
    from sglang.srt.runtime_context import get_server_args

    try:
        enabled = bool(get_server_args().enable_metrics)
    except Exception:  # older/newer runtime context layouts: metrics stay off, serving does not
        enabled = False
    if not enabled:
        return None
    from prometheus_client import Gauge

    return Gauge("sglang:shplb_kv_tokens_read", "Cumulative KV tokens read by shplb decode, per TP rank and layer",
                 labelnames=["tp_rank", "layer"], multiprocess_mode="mostrecent")
