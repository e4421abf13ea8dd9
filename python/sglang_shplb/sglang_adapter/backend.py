"""The `shplb` attention backend: SGLang's torch-native attention plus per-head sparse decode and prefill.

Every K/V write (extend or decode) is folded into the page metadata when any phase is sparse.
Prefill (extend) with prefill budgets: write K/V, fold the chunk's keys (its own pages count),
then block-sparse attention per (query block, KV head) (sparse_prefill.py; Triton on CUDA).
A layer whose prefill budgets are all 1.0 runs SGLang's dense extend unchanged.
Decode writes K/V, updates the metadata (and, for a sub-page selector, the same metadata at the
sub-page size), picks each local KV head's pages (`selection.choose_pages` with the configured
selector: sink + recent, top-k by that head's budget) and attends over them. A step where every
head covers its whole context runs SGLang's dense decode unchanged, so full budget is exactly `torch_native`.
The device-specific half lives in one of two engines with one interface (engine.py): cpu_engine.CpuEngine
(torch per layer) and gpu_engine.GpuEngine (planned once per step, kernels per layer, decode CUDA graphs; dense
extends through SGLang's own FlashInfer or Triton backend). This class holds what does not depend on the device:
the budgets, the per-step decisions (dense extend, the carry seed) and SGLang's backend interface.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..carry import forget
from ..carry_seed import plan_seed, seed
from ..config import ConfigError, ShplbConfig
from ..selection import get_selector
from ..serving import resolve
from ..sparse_prefill import sparse_prefill
from .cpu_engine import CpuEngine
from .engine import Setup
from .refusals import refuse_at_startup

logger = logging.getLogger("sglang_shplb")


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
        # Host-side per-layer flag: a layer whose heads all have full prefill budget runs SGLang's extend.
        self.prefill_sparse = [] if self.prefill_budgets is None else \
            [bool((row < 1.0).any()) for row in self.prefill_budgets]
        self.keep_metadata = self.budgets is not None or self.prefill_budgets is not None
        self.selector = rank.selector
        # A label selector's calibrated channels of every key, per layer and local KV head.
        channels = None if rank.labels is None else rank.labels.to(model_runner.device)
        if channels is not None and int(channels.max()) >= mc.head_dim:
            raise ConfigError(f"the label channels of {self.cfg.plan or self.cfg.budgets} index past head_dim "
                              f"{mc.head_dim}: they were made for another model; regenerate them")
        setup = Setup(self.cfg, self.budgets, rank.budget_ref(self.page_size), self.selector, channels,
                      mc.num_hidden_layers, self.req_to_token_pool, self.token_to_kv_pool, model_runner.device,
                      self.tp_rank, self._run_sdpa_forward_decode)
        if torch.device(model_runner.device).type == "cuda":
            from .gpu_engine import GpuEngine

            self.engine = GpuEngine(setup, model_runner, self.keep_metadata)
        else:
            self.engine = CpuEngine(setup)
        self.carry = self.engine.carry         # pages carried between decode steps (carry.py), or None
        self.extend_dense = False   # this step's extends are all short (--shplb-prefill-dense-kv-len)
        self.seed_plan = None       # an extend step's carry_seed.SeedPlan
        # layers with a sparse decode head: the only ones whose carry is read (a host list: no sync per layer)
        self.carried_layers = [] if self.budgets is None else (self.budgets < 1).any(-1).tolist()
        logger.info("[sglang-shplb] tp_rank=%d shplb backend: page %d, sink %d, recent %d, decode budgets %s, "
                    "selector %s, prefill budgets %s (dense up to %d tokens)", self.tp_rank,
                    self.page_size, self.cfg.sink_pages, self.cfg.recent_pages, _describe(self.budgets),
                    self.selector, _describe(self.prefill_budgets),
                    self.cfg.prefill_dense_kv_len)

    # ------------------------------------------------------------------ per step: plan once, all layers reuse
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        fb, self.extend_dense, self.seed_plan = forward_batch, False, None   # this step's, never the last's
        if self.engine.dense_extend is not None and not fb.forward_mode.is_decode_or_idle():
            self.engine.dense_extend.init_forward_metadata(fb)      # its plan(), once per step
        if self.carry is not None and fb.forward_mode.is_extend():
            forget(self.carry, fb.req_pool_indices)     # a new prompt in these rows: nothing carried yet
            if get_selector(self.selector).label and fb.extend_seq_lens is not None:
                self.seed_plan = plan_seed(self.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens,
                                           fb.extend_seq_lens, self.page_size, self.cfg.sink_pages,
                                           self.cfg.recent_pages)
        if self.prefill_sparse and fb.forward_mode.is_extend() and fb.extend_prefix_lens is not None:
            # every request short: the whole step runs the dense extend (SGLang's kernel); mixed: sparse_prefill
            kv = map(sum, zip(_host_list(fb.extend_prefix_lens_cpu, fb.extend_prefix_lens),
                              _host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)))
            self.extend_dense = max(kv, default=0) <= self.cfg.prefill_dense_kv_len
        self.engine.plan(fb)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        self.engine.reserve(max_bs)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        self.engine.plan_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        self.engine.prepare_graph(forward_batch)

    # ------------------------------------------------------------------ per layer
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
            locs = forward_batch.out_cache_loc
            self.engine.fold(layer.layer_id, locs, k.reshape(locs.shape[0], layer.tp_k_head_num, -1))

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._sparse_prefill_layer(layer) or self.extend_dense:
            dense = super() if self.engine.dense_extend is None else self.engine.dense_extend
            o = dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            self._fold_new_keys(layer, forward_batch, k)
            self._seed_carry(layer, q)
            return o
        self._write_and_fold(layer, forward_batch, k, v, save_kv_cache)   # before selecting: own pages count
        Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        kmin, kmax = self.engine.metadata(layer.layer_id)
        fb = forward_batch
        out = sparse_prefill(
            q.reshape(-1, Hkv, Hq // Hkv, D), self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), kmin, kmax,
            self.req_to_token_pool.req_to_token, fb.req_pool_indices.cpu(),
            _host_list(fb.extend_prefix_lens_cpu, fb.extend_prefix_lens),
            _host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens), self.prefill_budgets[layer.layer_id],
            self.page_size, self.cfg.sink_pages, self.cfg.recent_pages, layer.scaling,
            attend=self.engine.prefill_attend, dense_tail=self.cfg.prefill_dense_tail,
            dense_kv_len=self.cfg.prefill_dense_kv_len)
        self._seed_carry(layer, q)
        return out.reshape(-1, Hq * layer.v_head_dim).to(q.dtype)

    def _seed_carry(self, layer, q):
        """The prompt's last query picks the pages carried into its first decode step (carry_seed.py)."""
        if self.seed_plan is None or not self.carried_layers[layer.layer_id]:
            return
        Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        seed(self.carry[layer.layer_id], self.seed_plan, q.reshape(-1, Hkv, Hq // Hkv, D),
             *self.engine.label_cache(layer.layer_id), get_selector(self.selector))

    def _sparse_prefill_layer(self, layer) -> bool:
        return (bool(self.prefill_sparse) and self.prefill_sparse[layer.layer_id] and not layer.is_cross_attention
                and layer.attn_type != AttentionType.ENCODER_ONLY
                and (layer.sliding_window_size is None or layer.sliding_window_size < 0))

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self.engine.decodes(layer):
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            self._fold_new_keys(layer, forward_batch, k)   # later chunks select over these pages
            return o
        self._write_and_fold(layer, forward_batch, k, v, save_kv_cache)
        return self.engine.decode(layer, q, forward_batch)


def _describe(budgets) -> str:
    return "dense" if budgets is None else f"mean {float(budgets.mean()):.4f} over {tuple(budgets.shape)}"


def _host_list(cpu_list, tensor) -> list[int]:
    """ForwardBatch's host copy of per-request lengths when it has one (no device sync), else the tensor's."""
    return list(cpu_list) if cpu_list is not None else tensor.tolist()
