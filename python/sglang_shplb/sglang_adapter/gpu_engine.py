"""Sparse decode on CUDA: planned once per step on the host, kernels per layer (gpu_decode.GpuSparseDecode), decode
CUDA graphs over fixed buffers; dense extends through SGLang's own FlashInfer/Triton backend, planned once per
extend step; sparse-prefill layers through the Triton block-sparse kernel."""
from __future__ import annotations

import logging

from ..config import ConfigError
from .engine import ReadsMeter, Setup

logger = logging.getLogger("sglang_shplb")


class GpuEngine:
    def __init__(self, s: Setup, model_runner, keep_metadata: bool):
        import sglang_shplb_kernels as kernels

        from ..gpu_decode import DecodeShape, GpuSparseDecode, gpu_selectors
        from .gpu_startup import attention_dims, dense_extend_backend, refuse_unsupported

        self.s = s
        P = s.cfg.page_size
        self.dense_layers = refuse_unsupported(model_runner, P)    # layers SGLang's torch decode keeps
        if s.budgets is not None and s.selector not in gpu_selectors():
            raise ConfigError(f"--shplb-selector {s.selector} is not implemented by the CUDA kernels; "
                              f"use one of {gpu_selectors()} on a GPU")
        Hq, Hkv, D, Dv = attention_dims(model_runner.model)
        shape = DecodeShape(s.num_layers, Hkv, Hq // Hkv, D, Dv, P, s.cfg.sink_pages, s.cfg.recent_pages,
                            model_runner.model_config.context_len)
        slots = s.token_to_kv_pool.get_key_buffer(0).shape[0] if keep_metadata else None
        self.decoder = GpuSparseDecode(shape, s.budgets, s.device, num_slots=slots, selector=s.selector,
                                   budget_ref=s.budget_ref, channels=s.channels, carry_rows=s.rows)
        self.carry = self.decoder.carry
        self.prefill_attend = kernels.attend_selection
        self.dense_extend, name = dense_extend_backend(model_runner)
        self.meter = ReadsMeter(s.tp_rank)
        logger.info("[sglang-shplb] tp_rank=%d dense prefill/extend: %s", s.tp_rank,
                    name if self.dense_extend is not None else f"torch_native ({name})")
        logger.info("[sglang-shplb] tp_rank=%d CUDA decode: fused split-KV Triton kernel, page metadata %.2f GiB "
                    "(bf16, allocated at start-up), pages per head up to %d", s.tp_rank,
                    self.decoder.metadata_bytes() / 2**30, self.decoder.kcap)

    def metadata(self, layer_id: int):
        return self.decoder.meta[layer_id]

    def label_cache(self, layer_id: int):
        return self.decoder.labels[layer_id], self.decoder.channels[layer_id]

    def fold(self, layer_id: int, locs, k) -> None:
        self.decoder.fold(layer_id, k, locs)

    def plan(self, forward_batch) -> None:
        """An eager decode step: plan on the host, then the device part."""
        if forward_batch.forward_mode.is_decode():
            self.decoder.plan(forward_batch.batch_size, forward_batch.seq_lens_cpu, forward_batch.seq_lens)
            self.decoder.prepare(forward_batch.seq_lens)
            self._account()

    def reserve(self, max_bs: int) -> None:
        self.decoder.reserve(max_bs)

    def plan_graph(self, forward_batch, in_capture: bool) -> None:
        """Host part of a captured step (capture and every replay): page counts into fixed buffers."""
        if forward_batch.forward_mode.is_decode():
            bs = forward_batch.batch_size
            real = bs - (getattr(forward_batch, "num_padding", 0) or 0)
            self.decoder.plan(bs, forward_batch.seq_lens_cpu, forward_batch.seq_lens, real_bs=real, static=True)
            if not in_capture:
                self._account()

    def prepare_graph(self, forward_batch) -> None:
        """Device part, recorded in the graph: page counts per request from the static seq_lens."""
        if forward_batch.forward_mode.is_decode():
            self.decoder.prepare(forward_batch.seq_lens)

    def decodes(self, layer) -> bool:
        return layer.layer_id not in self.dense_layers      # dense layers too: one kernel path, graph-capturable

    def decode(self, layer, q, forward_batch):
        pool, lid = self.s.token_to_kv_pool, layer.layer_id
        return self.decoder.decode(lid, q, pool.get_key_buffer(lid), pool.get_value_buffer(lid),
                               self.s.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                               forward_batch.seq_lens, layer.scaling)

    def _account(self):
        """Per-rank KV tokens read, from the host plan (no device counter, no sync)."""
        self.meter.step(self.decoder.tokens_read, self.decoder.tokens_dense)
