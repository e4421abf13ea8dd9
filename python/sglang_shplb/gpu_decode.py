"""GPU decode path: plan once per step on the host, only kernels per layer (CUDA-graph capturable).

Per step (`plan`, from SGLang's host `seq_lens_cpu` and the host budgets): every layer's per-head
page count k[l, r, h] = selection.pages_for_budget(budget[l, h], n_pages[r]) — the CPU path's rule —
copied once into a static device buffer, the KV split count, and the KV tokens each layer reads
(host accounting, no device counter). `prepare` (graph-recordable) derives n_pages from the device
seq_lens. Per layer (`decode`): fold the new key into the page min/max (and, for a two-stage
selector, into the sub-page min/max or the label cache), score pages (per-head Quest bound aggregated
over the KV group), pick each head's top-k — for a two-stage selector: top c = ceil(shortlist * k),
re-score those c by sub-page bounds (kernels/fine_score.py) or from the label cache
(kernels/label_score.py), top k of them (selection.choose_pages' rule) —
and attend with the fused split-KV kernel: fixed buffers, no host sync, no plan(). Dense layers
(every head at budget 1.0) skip scoring and attend over all pages with the same kernel.

All buffers are sized at start-up from the largest batch and context (`reserve`), so a CUDA
graph captured for batch size b replays for any lengths up to the model's context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import selection as sel
from .carry import forget, new_carry, next_carry, promote
from .sparse_attention import fold_labels, new_label_cache



def gpu_selectors() -> list[str]:
    """selection.SELECTORS the kernels implement: a coarse page bound aggregated over the KV group by
    sum or max, optionally re-ranked on a shortlist (two-stage) by sub-page bounds (max over the group)
    or from the label cache (any aggregate: the kernel's per-head page log-mass, combined by
    selection.aggregate). Not: normalised coarse bounds, the full sub-page scan and re-ranking from whole
    keys (SparQ's per-query channels)."""
    return sorted(name for name, r in sel.SELECTORS.items() if gpu_implements(r))


def gpu_implements(r: sel.Selector) -> bool:
    """The kernels' reach, for any Selector (a benchmark's or test's too; the single-stage page-bound path
    is what the two-stage selectors' first stage runs)."""
    if (r.coarse or r.aggregate) not in ("sum", "max"):
        return False
    if r.label:
        return r.shortlist > 0
    return not r.keys and (r.sub is None or (r.shortlist > 0 and r.aggregate == "max"))


@dataclass(frozen=True)
class DecodeShape:
    num_layers: int
    kv_heads: int        # on this rank
    group: int           # query heads per KV head
    head_dim: int
    v_head_dim: int
    page_size: int
    sink: int
    recent: int
    max_context: int     # tokens: sizes the static buffers

    @property
    def max_pages(self) -> int:
        return math.ceil(self.max_context / self.page_size)


class GpuSparseDecode:
    """The decode objects the `shplb` backend runs on CUDA (and gpu_check.py / the tests run as is)."""

    def __init__(self, shape: DecodeShape, budgets: torch.Tensor | None, device, meta_dtype=torch.bfloat16,
                 num_slots: int | None = None, selector: str | sel.Selector = sel.UNCALIBRATED_SELECTOR,
                 num_sms: int | None = None,
                 budget_ref: sel.BudgetRef | None = None, channels: torch.Tensor | None = None,
                 carry_rows: int | None = None):
        import sglang_shplb_kernels as K

        self.rule = sel.get_selector(selector)
        if not gpu_implements(self.rule):
            raise ValueError(f"selector {self.rule.name!r} is not implemented by the CUDA kernels; use one of "
                             f"{gpu_selectors()}")
        self.K, self.shape, self.device = K, shape, torch.device(device)
        self.agg = self.rule.coarse or self.rule.aggregate     # the coarse bound's: "sum" or "max"
        # label second stage normalised per head (norm, psum): the kernel writes each query head's page
        # log-mass, selection.aggregate combines them
        self.per_head = self.rule.label and self.rule.aggregate != "max"
        L, H = shape.num_layers, shape.kv_heads
        b = torch.ones(L, H, dtype=torch.float64) if budgets is None else budgets.detach().double().cpu()
        assert b.shape == (L, H), (b.shape, L, H)
        self.budgets = b
        self.floor = shape.sink + shape.recent
        self.budget_ref = budget_ref    # where the budgets were made (selection.pages_for_budget)
        self.dense_layer = [bool((row >= 1.0).all()) for row in b]             # host, fixed: no per-step branch
        sparse_b = b[[not d for d in self.dense_layer]]
        full = torch.tensor(float(shape.max_pages), dtype=torch.float64)
        self.kcap = int(sel.pages_for_budget(sparse_b.max(), full, self.floor, budget_ref)) if sparse_b.numel() else 1
        # two-stage: the coarse bound shortlists c = ceil(shortlist * k) pages, the sub-page bound (or the label
        # cache) picks k of them
        self.two_stage = self.rule.shortlist > 0
        self.shortlists = self.two_stage and not all(self.dense_layer)   # some layer has shortlists to size
        self.sub = self.rule.sub if self.two_stage else None
        self.ccap = min(shape.max_pages, math.ceil(self.rule.shortlist * self.kcap - 1e-6)) if self.two_stage else 0
        if self.rule.label and budgets is not None:
            if channels is None or tuple(channels.shape[:2]) != (L, H) or channels.shape[2] < self.rule.keys:
                raise ValueError(f"selector {selector!r} needs label channels [{L}, {H}, >= {self.rule.keys}]")
            self.channels = channels[..., : self.rule.keys].to(self.device, torch.int32).contiguous()
        else:
            self.channels = None
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
                if self.device.type == "cuda" else 4
        self.num_sms = num_sms
        self.meta = self.fine = self.labels = None
        if num_slots is not None:     # metadata kept (sparse decode or sparse prefill): allocated now, once
            self.meta = [K.new_page_metadata(math.ceil(num_slots / shape.page_size), H, shape.head_dim,
                                             meta_dtype, self.device) for _ in range(L)]
            if self.sub and budgets is not None:   # the same metadata at the sub-page size
                self.fine = [K.new_page_metadata(math.ceil(num_slots / self.sub), H, shape.head_dim,
                                                 meta_dtype, self.device) for _ in range(L)]
            if self.channels is not None:          # the label cache: each key's label channels
                self.labels = [new_label_cache(num_slots, self.channels[l], shape.page_size,
                                               meta_dtype, self.device) for l in range(L)]
        # pages carried between steps per request row (carry.py): a two-stage selector's, when the caller keeps rows
        self.carry = new_carry(L, carry_rows, H, self.device) if carry_rows and self.two_stage and budgets is not None \
            else None
        self._sets: list[_Buffers] = []
        self.buf: _Buffers | None = None
        self.tokens_read = torch.zeros(L, dtype=torch.float64)   # host: KV tokens read per layer
        self.tokens_dense = torch.zeros(L, dtype=torch.float64)
        self.bs = 0

    # ------------------------------------------------------------------ per process / per graph set
    def nsplit(self, bs: int) -> int:
        """KV splits per (request, head); a function of bs only, so capture and replay agree."""
        return self.K.split_count(bs, self.shape.kv_heads, self.shape.max_pages, self.num_sms)

    def reserve(self, max_bs: int) -> "_Buffers":
        """The per-step buffers for batches up to max_bs: the smallest existing set that fits, else a new
        one. Sets are never freed or resized, so a CUDA graph keeps reading the set it was captured with."""
        fits = [b for b in self._sets if b.capacity >= max_bs]
        if fits:
            return min(fits, key=lambda b: b.capacity)
        cap = max(max_bs, 2 * max((b.capacity for b in self._sets), default=0))
        self._sets.append(_Buffers(self, cap))
        return self._sets[-1]

    def metadata_bytes(self) -> int:
        pairs = sum(t.numel() * t.element_size()
                    for meta in (self.meta, self.fine) if meta for pair in meta for t in pair)
        return pairs + sum(t.numel() * t.element_size() for t in self.labels or ())

    # ------------------------------------------------------------------ per step
    def plan(self, bs: int, seq_lens_cpu: torch.Tensor | None, seq_lens: torch.Tensor, real_bs: int | None = None,
             static: bool = False) -> None:
        """Host work of a step, before any layer (outside a CUDA graph): per-head page counts for every
        layer into the static k buffer, grid bounds, accounting. real_bs < bs: padded graph rows."""
        self.buf = buf = self.reserve(bs)
        s = self.shape
        b = self.budgets.view(s.num_layers, 1, s.kv_heads)
        if seq_lens_cpu is not None:
            seq = seq_lens_cpu[:bs].long()
            n = (seq + s.page_size - 1) // s.page_size
            k = sel.pages_for_budget(b, n.view(1, bs, 1).double(), self.floor, self.budget_ref)   # [L, bs, Hkv] host
            buf.k_pages[:, :bs].copy_(k.to(torch.int32), non_blocking=True)
            if self.shortlists:
                buf.c_pages[:, :bs].copy_(self._shortlist(k, n.view(1, bs, 1)), non_blocking=True)
            self.grid_pages = s.max_pages if static else max(1, int(n.max()) if bs else 1)
            rb = bs if real_bs is None else real_bs
            # the last page (partial) is always kept, so tokens read = k*P minus the last page's gap
            gap = (n[:rb] * s.page_size - seq[:rb]).view(1, rb, 1)
            self.tokens_read += (k[:, :rb] * s.page_size - gap).clamp(min=0).sum((1, 2)).double()
            self.tokens_dense += float(seq[:rb].sum()) * s.kv_heads
        else:   # no host lengths: the same rule on the device, no sync (and no accounting)
            n = (seq_lens[:bs].long() + s.page_size - 1) // s.page_size
            k = sel.pages_for_budget(b.to(self.device), n.view(1, bs, 1).double(), self.floor, self.budget_ref)
            buf.k_pages[:, :bs].copy_(k.to(torch.int32))
            if self.shortlists:
                buf.c_pages[:, :bs].copy_(self._shortlist(k, n.view(1, bs, 1)))
            self.grid_pages = s.max_pages
        self.bs = bs

    def _shortlist(self, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Shortlist length per head: selection.choose_pages' c, as int32 for the kernels."""
        return sel.shortlist_len(self.rule, k, n).to(torch.int32)

    def prepare(self, seq_lens: torch.Tensor) -> None:
        """Device part of a step's metadata (graph-recordable: fixed shapes, no host values)."""
        P = self.shape.page_size
        self.buf.n_pages[: seq_lens.shape[0]].copy_(torch.div(seq_lens + (P - 1), P, rounding_mode="floor"))

    # ------------------------------------------------------------------ per layer
    def fold(self, layer_id: int, k: torch.Tensor, locs: torch.Tensor) -> None:
        """Fold keys k [n, Hkv, D] just written at slots locs into the layer's page min/max."""
        kmin, kmax = self.meta[layer_id]
        self.K.fold_page_minmax(k, locs, kmin, kmax, self.shape.page_size)
        if self.fine is not None:
            self.K.fold_page_minmax(k, locs, *self.fine[layer_id], self.sub)
        if self.labels is not None:
            fold_labels(self.labels[layer_id], self.channels[layer_id], locs, k)

    def select(self, layer_id: int, q: torch.Tensor, req_to_token, req_pool_indices, seq_lens) -> None:
        """Scores and top-k pages of one layer into the static sel_idx / sel_cnt."""
        bs = q.shape[0]
        kmin, kmax = self.meta[layer_id]
        b = self.buf
        self.K.page_scores(q, kmin, kmax, req_to_token, req_pool_indices, b.n_pages, self.shape.page_size,
                           b.scores, self.agg, grid_pages=self.grid_pages)
        s = self.shape
        if not self.two_stage:
            self.K.select_topk_pages_into(b.scores, b.n_pages, b.k_pages[layer_id], b.sel_idx, b.sel_cnt,
                                          s.sink, s.recent, bs)
            return
        # two-stage: shortlist c pages by the coarse bound, re-score them (sub-page bounds or labels), keep k
        c = b.c_pages[layer_id]
        rows = req_pool_indices.long()
        if self.carry is not None:    # last step's best pages join the shortlist (torch ops: graph-safe, no sync)
            b.scores[:bs].copy_(promote(b.scores[:bs], self.carry[layer_id].index_select(0, rows)))
        self.K.select_topk_pages_into(b.scores, b.n_pages, c, b.short_idx, b.sel_cnt, s.sink, s.recent, bs)
        if self.per_head:
            self.K.label_page_scores(q, self.labels[layer_id], self.channels[layer_id], req_to_token, req_pool_indices,
                                     b.n_pages, b.short_idx, c, s.page_size, s.sink, s.recent, b.head_scores, bs,
                                     seq_lens)
            self.K.aggregate_label_scores(self.rule.aggregate, b.head_scores[:bs], b.short_idx, c, b.n_pages,
                                          s.sink, s.recent, b.fine_scores)
        elif self.labels is not None:
            self.K.label_page_scores(q, self.labels[layer_id], self.channels[layer_id], req_to_token, req_pool_indices,
                                     b.n_pages, b.short_idx, c, s.page_size, s.sink, s.recent, b.fine_scores, bs)
        else:
            self.K.fine_page_scores(q, *self.fine[layer_id], req_to_token, req_pool_indices, b.n_pages, b.short_idx,
                                    c, s.page_size, self.sub, s.sink, s.recent, b.fine_scores, bs)
        if self.carry is not None:
            self.carry[layer_id].index_copy_(0, rows, self._next_carry(c[:bs], bs))
        self.K.select_topk_pages_into(b.fine_scores, b.short_width, b.k_pages[layer_id], b.sel_idx, b.sel_cnt,
                                      0, 0, bs, page_map=b.short_idx)

    def _next_carry(self, c: torch.Tensor, bs: int) -> torch.Tensor:
        """carry.next_carry over this layer's shortlist: its listed, free pages by their second-stage score."""
        b, s = self.buf, self.shape
        short = b.short_idx[:bs].long()
        n = b.n_pages[:bs].long().view(bs, 1, 1)
        listed = torch.arange(short.shape[-1], device=short.device) < c.unsqueeze(-1)
        ok = listed & ~sel.is_forced(short, n, s.sink, s.recent) & (short < n)
        return next_carry(short, b.fine_scores[:bs], ok, self.carry.shape[-1])

    def forget(self, req_pool_indices: torch.Tensor) -> None:
        """New prompts in these request rows (their prefill): nothing carried into their first decode step."""
        if self.carry is not None:
            forget(self.carry, req_pool_indices)

    def decode(self, layer_id: int, q: torch.Tensor, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens,
               scale: float) -> torch.Tensor:
        """q [bs, Hq*D] (or [bs, Hq, D]) -> [bs, Hq*Dv] in q's dtype. Assumes plan() and prepare() ran."""
        s = self.shape
        bs = seq_lens.shape[0]
        qg = q.view(bs, s.kv_heads, s.group, s.head_dim)
        out = torch.empty(bs, s.kv_heads * s.group * s.v_head_dim, dtype=q.dtype, device=q.device)
        if self.dense_layer[layer_id]:
            sel_idx = sel_cnt = None
        else:
            self.select(layer_id, qg, req_to_token, req_pool_indices, seq_lens)
            sel_idx, sel_cnt = self.buf.sel_idx, self.buf.k_pages[layer_id]
        return self.K.sparse_decode_attend(qg, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, sel_idx,
                                           sel_cnt, s.page_size, scale, out, self.buf.part_o, self.buf.part_lse,
                                           self.nsplit(bs))


class _Buffers:
    """Fixed per-step device buffers for batches up to `capacity`."""

    def __init__(self, dec: GpuSparseDecode, capacity: int):
        s, dev = dec.shape, dec.device
        H, G, DV = s.kv_heads, s.group, s.v_head_dim
        rows = max(b * H * dec.nsplit(b) for b in range(1, capacity + 1))
        self.capacity = capacity
        self.n_pages = torch.zeros(capacity, dtype=torch.int32, device=dev)
        self.k_pages = torch.ones(s.num_layers, capacity, H, dtype=torch.int32, device=dev)
        sparse = not all(dec.dense_layer)
        self.scores = torch.empty(capacity if sparse else 0, H, s.max_pages, dtype=torch.float32, device=dev)
        self.sel_idx = torch.zeros(capacity if sparse else 0, H, dec.kcap, dtype=torch.int32, device=dev)
        self.sel_cnt = torch.zeros(capacity, H, dtype=torch.int32, device=dev)
        two = dec.shortlists                                  # two-stage selector: shortlist buffers
        self.c_pages = torch.ones(s.num_layers if two else 0, capacity, H, dtype=torch.int32, device=dev)
        self.short_idx = torch.zeros(capacity if two else 0, H, dec.ccap, dtype=torch.int32, device=dev)
        self.fine_scores = torch.empty(capacity if two else 0, H, dec.ccap, dtype=torch.float32, device=dev)
        per_head = two and dec.per_head and dec.labels is not None     # each query head's label page log-mass
        self.head_scores = torch.empty(capacity if per_head else 0, H, G, dec.ccap, dtype=torch.float32, device=dev)
        self.short_width = torch.full((capacity if two else 0,), dec.ccap, dtype=torch.int32, device=dev)
        self.part_o = torch.empty(rows * G * DV, dtype=torch.float32, device=dev)
        self.part_lse = torch.empty(rows * G, dtype=torch.float32, device=dev)
