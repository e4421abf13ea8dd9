"""The `shplb` attention backend: SGLang's torch-native attention plus per-head sparse decode and prefill.

Every K/V write (extend or decode) is folded into the page metadata when any phase is sparse.
Prefill (extend) with prefill budgets: write K/V, fold the chunk's keys (its own pages count),
then block-sparse attention per (query block, KV head) (sparse_prefill.py; Triton on CUDA).
A layer whose prefill budgets are all 1.0 runs SGLang's dense extend unchanged.
Decode writes K/V, updates the metadata (and, for a sub-page selector, the same metadata at the
sub-page size), picks each local KV head's pages (`selection.choose_pages` with the configured
selector: sink + recent, top-k by that head's budget) and attends over them. A step where every
head covers its whole context runs SGLang's dense decode unchanged, so full budget is exactly `torch_native`.
On CUDA (`_init_cuda` and the methods after it) decode is planned once per step and every layer runs
gpu_decode.GpuSparseDecode's kernels, dense layers included, so decode CUDA graphs can be captured;
dense extend runs SGLang's own FlashInfer backend (else its Triton backend, else torch_native), owned
by this one and planned once per extend step; sparse-prefill layers run the Triton block-sparse kernel.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..carry import forget, new_carry
from ..carry_seed import plan_seed, seed
from ..config import ConfigError, ShplbConfig
from ..selection import get_selector
from ..serving import resolve
from ..sparse_attention import (attend_selected, fold_labels, new_label_cache, new_page_metadata, plan_decode,
                                select_layer, update_page_minmax)
from ..sparse_prefill import sparse_prefill
from .refusals import refuse_at_startup

logger = logging.getLogger("sglang_shplb")
LOG_EVERY_STEPS = 64


def register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if "shplb" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["shplb"])
    if "shplb" not in ATTENTION_BACKENDS:
        register_attention_backend("shplb")(lambda runner: ShplbAttnBackend(runner))
    _use_torch_last_loc_on_cpu()


def _use_torch_last_loc_on_cpu() -> None:
    """SGLang picks a Triton kernel for paged allocation unless the backend is torch_native; on
    CPU (no Triton) our backend needs the torch variant too."""
    from sglang.srt.utils import is_cpu

    if not is_cpu():
        return
    from sglang.srt.mem_cache import allocation

    allocation.get_last_loc = allocation.get_last_loc_torch


def _parallel():
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return p.tp_size, p.tp_rank


class ShplbAttnBackend(TorchNativeAttnBackend):
    """SGLang's torch-native backend plus per-head sparse decode and prefill (the module docstring)."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.cfg = ShplbConfig.from_env()
        refuse_at_startup(model_runner)
        self.page_size = self.cfg.page_size
        pool_page = model_runner.page_size or 1
        if pool_page % self.page_size:
            raise ConfigError(f"--shplb-page-size {self.page_size} does not divide SGLang's --page-size "
                              f"{pool_page}; use an SGLang page size that is a multiple of it")
        mc = model_runner.model_config
        self.tp_size, self.tp_rank = _parallel()
        # resolved once per process; the weight hook shares the same plan object
        rank = resolve(self.cfg, mc.num_hidden_layers, mc.get_total_num_kv_heads(), self.tp_size, self.tp_rank)
        self.budgets, self.prefill_budgets = rank.decode, rank.prefill
        self.budget_ref = rank.budget_ref(self.page_size)   # where the budgets were made (pages_for_budget)
        # Host-side per-layer flag: a layer whose heads all have full prefill budget runs SGLang's extend.
        self.prefill_sparse = [] if self.prefill_budgets is None else \
            [bool((row < 1.0).any()) for row in self.prefill_budgets]
        self.keep_metadata = self.budgets is not None or self.prefill_budgets is not None
        self.meta = {}
        self.selector = rank.selector
        # Sub-page metadata (page metadata at the selector's sub-page size) only for a decode selector that reads it.
        self.sub = get_selector(self.selector).sub if self.budgets is not None else None
        self.fine = {}
        # A label selector's per-token label cache (its calibrated channels of every key), per layer.
        self.channels = None if rank.labels is None else rank.labels.to(model_runner.device)
        if self.channels is not None and int(self.channels.max()) >= mc.head_dim:
            raise ConfigError(f"the label channels of {self.cfg.plan or self.cfg.budgets} index past head_dim "
                              f"{mc.head_dim}: they were made for another model; regenerate them")
        self.labels = {}
        self.extend_dense = False   # this step's extends are all short (--shplb-prefill-dense-kv-len)
        self.step_plan = self.plan_batch = None    # CPU decode: the step's DecodePlan and the batch it was made for
        self.seed_plan = None                      # an extend step's carry_seed.SeedPlan
        # layers with a sparse decode head: the only ones whose carry is read (a host list: no sync per layer)
        self.carried_layers = [] if self.budgets is None else (self.budgets < 1).any(-1).tolist()
        # Kept on the model's device: adding to them never forces a host sync mid-step.
        self.kv_read = torch.zeros(mc.num_hidden_layers, dtype=torch.float64, device=model_runner.device)
        self.kv_dense = torch.zeros(mc.num_hidden_layers, dtype=torch.float64, device=model_runner.device)
        self.steps = 0
        self.gauge = _metrics_gauge(model_runner)
        self.gpu = self.gpu_prefill = self.dense_extend = None   # CUDA only (_init_cuda)
        self.torch_dense_layers = set()
        if torch.device(model_runner.device).type == "cuda":
            self._init_cuda(model_runner)
        # pages carried between decode steps per request row, layer and local KV head (carry.py)
        self.carry = self.gpu.carry if self.gpu is not None else None if self.budgets is None or not \
            get_selector(self.selector).shortlist else new_carry(mc.num_hidden_layers, self._rows(),
                                                                 self.budgets.shape[1], model_runner.device)
        logger.info("[sglang-shplb] tp_rank=%d shplb backend: page %d, sink %d, recent %d, decode budgets %s, "
                    "selector %s, prefill budgets %s (dense up to %d tokens)", self.tp_rank,
                    self.page_size, self.cfg.sink_pages, self.cfg.recent_pages, _describe(self.budgets),
                    self.selector, _describe(self.prefill_budgets),
                    self.cfg.prefill_dense_kv_len)

    def _rows(self) -> int:
        return self.req_to_token_pool.req_to_token.shape[0]

    def _metadata(self, layer_id: int):
        if self.gpu is not None and self.gpu.meta is not None:
            return self.gpu.meta[layer_id]
        if layer_id not in self.meta:
            k_buf = self.token_to_kv_pool.get_key_buffer(layer_id)
            self.meta[layer_id] = new_page_metadata(k_buf.shape[0], k_buf.shape[1], k_buf.shape[2],
                                                    self.page_size, k_buf.device)
        return self.meta[layer_id]

    def _fine(self, layer_id: int):
        if layer_id not in self.fine:
            k_buf = self.token_to_kv_pool.get_key_buffer(layer_id)
            self.fine[layer_id] = new_page_metadata(k_buf.shape[0], k_buf.shape[1], k_buf.shape[2], self.sub,
                                                    k_buf.device)
        return self.fine[layer_id]

    def _labels(self, layer_id: int):
        """(label cache, channels) of a layer on the CPU path (the CUDA path keeps its own in self.gpu)."""
        if layer_id not in self.labels:
            k_buf = self.token_to_kv_pool.get_key_buffer(layer_id)
            self.labels[layer_id] = new_label_cache(k_buf.shape[0], self.channels[layer_id], self.page_size,
                                                    k_buf.dtype, k_buf.device)
        return self.labels[layer_id], self.channels[layer_id]

    def _fold_keys(self, layer, locs, k):
        k = k.reshape(locs.shape[0], layer.tp_k_head_num, -1)
        if self.gpu is not None:
            self.gpu.fold(layer.layer_id, k, locs)
            return
        if self.channels is not None:
            fold_labels(*self._labels(layer.layer_id), locs, k)
        kmin, kmax = self._metadata(layer.layer_id)
        update_page_minmax(kmin, kmax, locs, k, self.page_size)
        if self.sub:
            update_page_minmax(*self._fine(layer.layer_id), locs, k, self.sub)

    def _write_and_fold(self, layer, forward_batch, k, v, save_kv_cache):
        """Write this step's K/V unless the model already did, then fold the keys into the page metadata."""
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        self._fold_new_keys(layer, forward_batch, k)

    def _fold_new_keys(self, layer, forward_batch, k):
        """Fold whenever keys arrive, save_kv_cache or not: with a fused rope + KV write (SGLang on CUDA, bf16
        pool: `enable_fused_set_kv_buffer`) the model has written K/V itself and calls attention with
        save_kv_cache=False, and pages never folded would keep their empty (+inf, -inf) boxes."""
        if k is not None and self.keep_metadata:
            self._fold_keys(layer, forward_batch.out_cache_loc, k)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._sparse_prefill_layer(layer) or self.extend_dense:
            dense = self.dense_extend if self.dense_extend is not None else super()
            o = dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            self._fold_new_keys(layer, forward_batch, k)
            self._seed_carry(layer, q)
            return o
        self._write_and_fold(layer, forward_batch, k, v, save_kv_cache)   # before selecting: own pages count
        Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        kmin, kmax = self._metadata(layer.layer_id)
        fb = forward_batch
        out = sparse_prefill(
            q.reshape(-1, Hkv, Hq // Hkv, D), self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), kmin, kmax,
            self.req_to_token_pool.req_to_token, fb.req_pool_indices.cpu(),
            _host_list(fb.extend_prefix_lens_cpu, fb.extend_prefix_lens),
            _host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens), self.prefill_budgets[layer.layer_id],
            self.page_size, self.cfg.sink_pages, self.cfg.recent_pages, layer.scaling, attend=self.gpu_prefill,
            dense_tail=self.cfg.prefill_dense_tail, dense_kv_len=self.cfg.prefill_dense_kv_len)
        self._seed_carry(layer, q)
        return out.reshape(-1, Hq * layer.v_head_dim).to(q.dtype)

    def _seed_carry(self, layer, q):
        """The prompt's last query picks the pages carried into its first decode step (carry_seed.py)."""
        if self.seed_plan is None or not self.carried_layers[layer.layer_id]:
            return
        Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        labels, channels = (self.gpu.labels[layer.layer_id], self.gpu.channels[layer.layer_id]) \
            if self.gpu is not None else self._labels(layer.layer_id)
        seed(self.carry[layer.layer_id], self.seed_plan, q.reshape(-1, Hkv, Hq // Hkv, D), labels, channels,
             get_selector(self.selector))

    def _sparse_prefill_layer(self, layer) -> bool:
        return (bool(self.prefill_sparse) and self.prefill_sparse[layer.layer_id] and not layer.is_cross_attention
                and layer.attn_type != AttentionType.ENCODER_ONLY
                and (layer.sliding_window_size is None or layer.sliding_window_size < 0))

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self.gpu is not None and layer.layer_id not in self.torch_dense_layers:
            return self._forward_decode_cuda(q, k, v, layer, forward_batch, save_kv_cache)
        if self.budgets is None or layer.is_cross_attention or layer.layer_id in self.torch_dense_layers:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            self._fold_new_keys(layer, forward_batch, k)   # later chunks select over these pages
            return o
        self._write_and_fold(layer, forward_batch, k, v, save_kv_cache)
        Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        qg = q.reshape(-1, Hkv, Hq // Hkv, D)
        kmin, kmax = self._metadata(layer.layer_id)
        chosen = select_layer(self._decode_plan(forward_batch), layer.layer_id, qg, kmin, kmax,
                              self.req_to_token_pool.req_to_token, self.page_size, self.cfg.sink_pages,
                              self.cfg.recent_pages, self.selector, self._fine(layer.layer_id) if self.sub else None,
                              self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                              self._labels(layer.layer_id) if self.channels is not None else None,
                              None if self.carry is None else self.carry[layer.layer_id])
        self._account(layer.layer_id, chosen, forward_batch.seq_lens, Hkv)
        if chosen.dense:  # SGLang's own dense decode: bit-identical to torch_native
            o = torch.empty_like(q.reshape(-1, Hq * layer.v_head_dim))
            self._run_sdpa_forward_decode(
                q.reshape(-1, Hq, D), o.view(-1, Hq, layer.v_head_dim),
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                forward_batch.seq_lens, scaling=layer.scaling, enable_gqa=Hq != Hkv)
            return o
        out = attend_selected(qg, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                     self.token_to_kv_pool.get_value_buffer(layer.layer_id), chosen, layer.scaling)
        return out.reshape(-1, Hq * layer.v_head_dim).to(q.dtype)

    def _decode_plan(self, forward_batch, fresh: bool = False):
        """The step's page counts and page table, shared by every layer: made fresh by init_forward_metadata
        each step, or here if a caller skipped it for this batch (a layer never reads another batch's plan)."""
        if fresh or self.plan_batch is not forward_batch:
            self.step_plan = plan_decode(self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                                    forward_batch.seq_lens, self.budgets, self.page_size, self.cfg.sink_pages,
                                    self.cfg.recent_pages, self.budget_ref)
            self.plan_batch = forward_batch
        return self.step_plan

    # ---------------------------------------------------------------- CUDA (issue 13): plan per step,
    # kernels per layer, decode CUDA graphs over fixed buffers. CPU behaviour above is unchanged.
    def _init_cuda(self, model_runner):
        import sglang_shplb_kernels as kernels

        from ..gpu_decode import DecodeShape, GpuSparseDecode, gpu_selectors
        from .gpu_startup import attention_dims, dense_extend_backend, refuse_unsupported

        self.torch_dense_layers = refuse_unsupported(model_runner, self.page_size)
        if self.budgets is not None and self.selector not in gpu_selectors():
            raise ConfigError(f"--shplb-selector {self.selector} is not implemented by the CUDA kernels; "
                              f"use one of {gpu_selectors()} on a GPU")
        Hq, Hkv, D, Dv = attention_dims(model_runner.model)
        mc = model_runner.model_config
        shape = DecodeShape(mc.num_hidden_layers, Hkv, Hq // Hkv, D, Dv, self.page_size, self.cfg.sink_pages,
                            self.cfg.recent_pages, mc.context_len)
        slots = self.token_to_kv_pool.get_key_buffer(0).shape[0] if self.keep_metadata else None
        self.gpu = GpuSparseDecode(shape, self.budgets, model_runner.device, num_slots=slots,
                                   selector=self.selector, budget_ref=self.budget_ref, channels=self.channels,
                                   carry_rows=self._rows())
        self.gpu_prefill = kernels.attend_selection
        # dense prefill/extend (dense layers, full-budget heads) through SGLang's own CUDA backend
        self.dense_extend, name = dense_extend_backend(model_runner)
        logger.info("[sglang-shplb] tp_rank=%d dense prefill/extend: %s", self.tp_rank,
                    name if self.dense_extend is not None else f"torch_native ({name})")
        logger.info("[sglang-shplb] tp_rank=%d CUDA decode: fused split-KV Triton kernel, page metadata %.2f GiB "
                    "(bf16, allocated at start-up), pages per head up to %d", self.tp_rank,
                    self.gpu.metadata_bytes() / 2**30, self.gpu.kcap)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        if self.dense_extend is not None and not forward_batch.forward_mode.is_decode_or_idle():
            self.dense_extend.init_forward_metadata(forward_batch)      # its plan(), once per step
        fb, self.extend_dense = forward_batch, False   # set for this step only, never left from the last
        self.seed_plan = None
        if self.carry is not None and fb.forward_mode.is_extend():
            forget(self.carry, fb.req_pool_indices)     # a new prompt in these rows: nothing carried yet
            if self.channels is not None and get_selector(self.selector).label and fb.extend_seq_lens is not None:
                self.seed_plan = plan_seed(self.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens,
                                           fb.extend_seq_lens, self.page_size, self.cfg.sink_pages,
                                           self.cfg.recent_pages)
        if self.prefill_sparse and fb.forward_mode.is_extend() and fb.extend_prefix_lens is not None:
            # every request short: the whole step runs the dense extend (SGLang's kernel); mixed: sparse_prefill
            kv = map(sum, zip(_host_list(fb.extend_prefix_lens_cpu, fb.extend_prefix_lens),
                              _host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)))
            self.extend_dense = max(kv, default=0) <= self.cfg.prefill_dense_kv_len
        if self.gpu is None and forward_batch.forward_mode.is_decode() and self.budgets is not None:
            self._decode_plan(forward_batch, fresh=True)                    # CPU: once per step
        if self.gpu is not None and forward_batch.forward_mode.is_decode():
            self.gpu.plan(forward_batch.batch_size, forward_batch.seq_lens_cpu, forward_batch.seq_lens)
            self.gpu.prepare(forward_batch.seq_lens)
            self._account_cuda()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if self.gpu is None:
            raise ConfigError("shplb: CUDA graphs on a non-CUDA device; add --cuda-graph-backend-decode disabled")
        self.gpu.reserve(max_bs)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Host part of a captured step (capture and every replay): page counts into fixed buffers."""
        if self.gpu is None or not forward_batch.forward_mode.is_decode():
            return
        bs = forward_batch.batch_size
        real = bs - (getattr(forward_batch, "num_padding", 0) or 0)
        self.gpu.plan(bs, forward_batch.seq_lens_cpu, forward_batch.seq_lens, real_bs=real, static=True)
        if not in_capture:
            self._account_cuda()

    def init_forward_metadata_in_graph(self, forward_batch):
        """Device part, recorded in the graph: page counts per request from the static seq_lens."""
        if self.gpu is not None and forward_batch.forward_mode.is_decode():
            self.gpu.prepare(forward_batch.seq_lens)

    def _forward_decode_cuda(self, q, k, v, layer, forward_batch, save_kv_cache):
        self._write_and_fold(layer, forward_batch, k, v, save_kv_cache)
        return self.gpu.decode(layer.layer_id, q, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                               self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                               self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                               forward_batch.seq_lens, layer.scaling)

    def _account_cuda(self):
        """Per-rank KV tokens read, from the host plan (no device counter, no sync)."""
        self.steps += 1
        read, dense = self.gpu.tokens_read, self.gpu.tokens_dense
        if self.gauge is not None:
            for i, x in enumerate(read.tolist()):
                self.gauge.labels(tp_rank=str(self.tp_rank), layer=str(i)).set(x)
        if self.steps % LOG_EVERY_STEPS == 0:
            logger.info("[sglang-shplb] tp_rank=%d kv tokens read (all layers, %d steps): %d of %d dense (%.3f)",
                        self.tp_rank, self.steps, float(read.sum()), float(dense.sum()),
                        float(read.sum() / dense.sum().clamp(min=1)))

    def _account(self, layer_id, chosen, seq_lens, Hkv):
        """KV tokens read per layer on this rank: how users see the balance across ranks."""
        self.kv_read[layer_id] += chosen.valid.sum()
        self.kv_dense[layer_id] += seq_lens.sum() * Hkv
        if layer_id != len(self.kv_read) - 1:
            return
        self.steps += 1
        if self.gauge is not None:
            for i, v in enumerate(self.kv_read.tolist()):
                self.gauge.labels(tp_rank=str(self.tp_rank), layer=str(i)).set(v)
        if self.steps % LOG_EVERY_STEPS == 0:
            logger.info("[sglang-shplb] tp_rank=%d kv tokens read (all layers, %d steps): %d of %d dense "
                        "(%.3f); per layer: %s", self.tp_rank, self.steps, float(self.kv_read.sum()),
                        float(self.kv_dense.sum()), float(self.kv_read.sum() / self.kv_dense.sum().clamp(min=1)),
                        [int(x) for x in self.kv_read.tolist()])



def _describe(budgets) -> str:
    return "dense" if budgets is None else f"mean {float(budgets.mean()):.4f} over {tuple(budgets.shape)}"


def _host_list(cpu_list, tensor) -> list[int]:
    """ForwardBatch's host copy of per-request lengths when it has one (no device sync), else the tensor's."""
    return list(cpu_list) if cpu_list is not None else tensor.tolist()


def _metrics_gauge(model_runner):
    """A Prometheus gauge of KV tokens read per layer and rank, when --enable-metrics is on."""
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
