"""Sparse decode on the CPU: per-layer page metadata and label caches, one DecodePlan per step, torch per layer."""
from __future__ import annotations

import torch

from ..carry import new_carry
from ..config import ConfigError
from ..selection import get_selector
from ..sparse_attention import (attend_selected, fold_labels, new_label_cache, new_page_metadata, plan_decode,
                                select_layer, update_page_minmax)
from .engine import ReadsMeter, Setup


class CpuEngine:
    dense_extend = None        # dense extends run torch_native's own (the backend's base class)
    prefill_attend = None      # sparse_prefill attends in torch

    def __init__(self, s: Setup):
        self.s = s
        rule = get_selector(s.selector)
        self.meta, self.fine, self.labels = {}, {}, {}      # per layer, allocated at first use
        self.sub = rule.sub if s.budgets is not None else None   # sub-page metadata, for a selector that reads it
        self.carry = None if s.budgets is None or not rule.shortlist else \
            new_carry(s.num_layers, s.rows, s.budgets.shape[1], s.device)
        self.step_plan = self.plan_batch = None   # the step's DecodePlan and the batch it was made for
        # on the model's device: adding to them never forces a host sync mid-step
        self.kv_read = torch.zeros(s.num_layers, dtype=torch.float64, device=s.device)
        self.kv_dense = torch.zeros(s.num_layers, dtype=torch.float64, device=s.device)
        self.meter = ReadsMeter(s.tp_rank)

    def _new_metadata(self, layer_id: int, page: int):
        k_buf = self.s.token_to_kv_pool.get_key_buffer(layer_id)
        return new_page_metadata(k_buf.shape[0], k_buf.shape[1], k_buf.shape[2], page, k_buf.device)

    def metadata(self, layer_id: int):
        if layer_id not in self.meta:
            self.meta[layer_id] = self._new_metadata(layer_id, self.s.cfg.page_size)
        return self.meta[layer_id]

    def _fine(self, layer_id: int):
        if layer_id not in self.fine:
            self.fine[layer_id] = self._new_metadata(layer_id, self.sub)
        return self.fine[layer_id]

    def label_cache(self, layer_id: int):
        """(label cache, channels) of a layer."""
        if layer_id not in self.labels:
            k_buf = self.s.token_to_kv_pool.get_key_buffer(layer_id)
            self.labels[layer_id] = new_label_cache(k_buf.shape[0], self.s.channels[layer_id], self.s.cfg.page_size,
                                                    k_buf.dtype, k_buf.device)
        return self.labels[layer_id], self.s.channels[layer_id]

    def fold(self, layer_id: int, locs, k) -> None:
        if self.s.channels is not None:
            fold_labels(*self.label_cache(layer_id), locs, k)
        update_page_minmax(*self.metadata(layer_id), locs, k, self.s.cfg.page_size)
        if self.sub:
            update_page_minmax(*self._fine(layer_id), locs, k, self.sub)

    def plan(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode() and self.s.budgets is not None:
            self._plan(forward_batch, fresh=True)

    def _plan(self, forward_batch, fresh: bool = False):
        """The step's page counts and page table, shared by every layer: made fresh by plan() each step, or here
        if a caller skipped it for this batch (a layer never reads another batch's plan)."""
        if fresh or self.plan_batch is not forward_batch:
            s = self.s
            self.step_plan = plan_decode(s.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                                         forward_batch.seq_lens, s.budgets, s.cfg.page_size, s.cfg.sink_pages,
                                         s.cfg.recent_pages, s.budget_ref)
            self.plan_batch = forward_batch
        return self.step_plan

    def reserve(self, max_bs: int) -> None:
        raise ConfigError("shplb: CUDA graphs on a non-CUDA device; add --cuda-graph-backend-decode disabled")

    def plan_graph(self, forward_batch, in_capture: bool) -> None:
        pass        # no graphs on the CPU path: plan() plans every step

    def prepare_graph(self, forward_batch) -> None:
        pass

    def decodes(self, layer) -> bool:
        return self.s.budgets is not None and not layer.is_cross_attention

    def decode(self, layer, q, forward_batch):
        s, lid = self.s, layer.layer_id
        Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        qg = q.reshape(-1, Hkv, Hq // Hkv, D)
        k_buf, v_buf = s.token_to_kv_pool.get_key_buffer(lid), s.token_to_kv_pool.get_value_buffer(lid)
        chosen = select_layer(self._plan(forward_batch), lid, qg, *self.metadata(lid), s.req_to_token_pool.req_to_token,
                              s.cfg.page_size, s.cfg.sink_pages, s.cfg.recent_pages, s.selector,
                              self._fine(lid) if self.sub else None, k_buf,
                              self.label_cache(lid) if s.channels is not None else None,
                              None if self.carry is None else self.carry[lid])
        self._account(lid, chosen, forward_batch.seq_lens, Hkv)
        if chosen.dense:  # SGLang's own dense decode: bit-identical to torch_native
            o = torch.empty_like(q.reshape(-1, Hq * layer.v_head_dim))
            s.sdpa_decode(q.reshape(-1, Hq, D), o.view(-1, Hq, layer.v_head_dim), k_buf, v_buf,
                          s.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                          scaling=layer.scaling, enable_gqa=Hq != Hkv)
            return o
        out = attend_selected(qg, k_buf, v_buf, chosen, layer.scaling)
        return out.reshape(-1, Hq * layer.v_head_dim).to(q.dtype)

    def _account(self, layer_id, chosen, seq_lens, Hkv):
        self.kv_read[layer_id] += chosen.valid.sum()
        self.kv_dense[layer_id] += seq_lens.sum() * Hkv
        if layer_id == len(self.kv_read) - 1:
            self.meter.step(self.kv_read, self.kv_dense)
