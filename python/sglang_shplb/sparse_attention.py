"""Per-head sparse decode attention over a paged KV cache — the CPU serving path, pure PyTorch.

Layout (SGLang's, run with page size P): k/v buffers are [slots, Hkv, D]; request r's token t is
at slot req_to_token[r, t]; since SGLang allocates whole pages, logical page j of a request is the
physical page req_to_token[r, j*P] // P. Page metadata (channel-wise key min/max) is kept per
physical page and KV head, so it is shared by radix-cache prefixes for free.

Everything is batched over requests and heads: no Python loop per request or head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import selection as sel


def new_page_metadata(num_slots: int, num_kv_heads: int, head_dim: int, page_size: int,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    n = math.ceil(num_slots / page_size)
    shape = (n, num_kv_heads, head_dim)
    return (torch.full(shape, math.inf, device=device), torch.full(shape, -math.inf, device=device))


def update_page_minmax(kmin: torch.Tensor, kmax: torch.Tensor, locs: torch.Tensor, k: torch.Tensor,
                       page_size: int) -> None:
    """Fold newly written keys k [n, Hkv, D] at slots `locs` [n] into their pages' min/max.
    A token at in-page offset 0 opens the page afresh (a freed page may hold stale bounds).
    Sub-page metadata is this at page size `sub`: a sub-page opens afresh at its own first token; its
    not-yet-written sub-pages can only be stale in a request's last page, which is always forced."""
    locs = locs.long()
    pages = locs // page_size
    fresh = pages[locs % page_size == 0]
    kmin[fresh] = math.inf
    kmax[fresh] = -math.inf
    kf = k.float()
    idx = pages.view(-1, 1, 1).expand_as(kf)
    kmin.scatter_reduce_(0, idx, kf, "amin", include_self=True)
    kmax.scatter_reduce_(0, idx, kf, "amax", include_self=True)


def new_label_cache(num_slots: int, channels: torch.Tensor, page_size: int, dtype, device) -> torch.Tensor:
    """Label cache [Hkv, slots, r] of a label selector (channels [Hkv, r]): each key's label channels.
    Head-major, slots rounded up to whole pages, so one (page, KV head) is one contiguous P*r block:
    the second stage reads a shortlisted page in one row (CPU gather) or one coalesced run (kernel)."""
    slots = -(-num_slots // page_size) * page_size
    return torch.zeros(channels.shape[0], slots, channels.shape[1], dtype=dtype, device=device)


def fold_labels(labels: torch.Tensor, channels: torch.Tensor, locs: torch.Tensor, k: torch.Tensor) -> None:
    """Copy the label channels [Hkv, r] of keys k [n, Hkv, D] just written at slots `locs` into the label
    cache (no host sync, fixed shapes: CUDA-graph safe; a rewritten slot simply overwrites)."""
    rows = k.gather(-1, channels.expand(k.shape[0], *channels.shape)).transpose(0, 1)     # [Hkv, n, r]
    labels.index_copy_(1, locs.long(), rows.to(labels.dtype))


@dataclass
class DecodeSelection:
    """Which tokens each (request, KV head) attends to: rows/valid are [bs, Hkv, T]; a row is slot * Hkv + head,
    the token's row of a [slots * Hkv, D] view of the K/V buffers (one index_select reads K, one V)."""
    rows: torch.Tensor
    valid: torch.Tensor
    dense: bool  # every head covers its whole context: caller may run plain dense attention
    num_kv_heads: int

    @property
    def slots(self) -> torch.Tensor:
        return self.rows.div(self.num_kv_heads, rounding_mode="floor")

    @property
    def tokens_read(self) -> torch.Tensor:
        """KV tokens read per KV head [Hkv] (summed over requests)."""
        return self.valid.sum((0, 2))


@dataclass
class DecodePlan:
    """What a decode step's page selection needs that no layer's data changes (SGLang's
    init_forward_metadata, FlashInfer's plan()): made once per step, read by every layer."""
    seq_lens: torch.Tensor      # [bs]
    n_pages: torch.Tensor       # [bs] pages of each request's context
    k_pages: torch.Tensor       # [L, bs, Hkv] pages each layer's heads keep (selection.pages_for_budget)
    dense: list                 # [L] bool: every head of the layer covers its whole context
    page_ids: torch.Tensor      # [bs, N] physical page of each logical page (0 past a request's end)
    rows: torch.Tensor          # [bs] req_to_token rows of the requests
    meta_rows: torch.Tensor     # [bs * Hkv * N] rows of [pages * Hkv, D] page metadata in [bs, Hkv, N] order
    pins: sel.PagePins          # [bs, 1, N] the ranking rule's forced / past-the-end pages
    page_fill: torch.Tensor     # [bs, N] tokens written in each logical page (P but in the last; 0 past the end)
    kept: torch.Tensor          # [L, bs, Hkv, N] rank j < the head's k_pages: selected
    k_max: list                 # [L] int: the layer's largest k_pages
    heads: torch.Tensor         # [1, Hkv, 1] KV head indices
    kv_rows: torch.Tensor       # [bs, Hkv, N] K/V row (slot * Hkv + head) of each logical page's first token
    tok_rows: torch.Tensor      # [P] row offset of a page's t-th token: t * Hkv
    rank_written: torch.Tensor  # [bs, 1, N, P] slot t of the page at rank j is written (`selection.LayerRanks`)
    rank_stale: torch.Tensor    # ~rank_written
    listed: dict = field(default_factory=dict)   # selector.shortlist -> [L, bs, Hkv, N], made on first use
    groups: dict = field(default_factory=dict)   # selector.shortlist -> [L] second-stage head groups (or None)
    label_rows: dict = field(default_factory=dict)   # label-cache pages -> [bs, Hkv, N] rows, made on first use

    def ranks(self, layer: int, rule: sel.Selector) -> sel.LayerRanks:
        """Layer `layer`'s share for selection.choose_pages; a shortlist's rank masks are made for every layer
        at the step's first use (the plan does not know the selector; a benchmark may time several)."""
        bs, N = self.page_ids.shape
        listed = groups = None
        if rule.shortlist:
            if rule.shortlist not in self.listed:
                c_row = sel.shortlist_len(rule, self.k_pages, self.n_pages.view(1, bs, 1))       # [L, bs, Hkv]
                self.listed[rule.shortlist] = torch.arange(N, device=c_row.device) < c_row.unsqueeze(-1)
                self.groups[rule.shortlist] = [shortlist_groups(w, bs, c_row.device) for w in c_row.amax(1).tolist()]
            listed, groups = self.listed[rule.shortlist][layer], self.groups[rule.shortlist][layer]
        Hkv = self.k_pages.shape[-1]
        return sel.LayerRanks(self.pins, self.page_fill.unsqueeze(1).expand(bs, Hkv, N), self.k_max[layer], listed,
                              self.rank_stale, groups)

    def label_pages(self, pool_pages: int) -> torch.Tensor:
        """[bs, Hkv, N]: each logical page's row in a [Hkv * pool_pages, P * r] view of the label cache."""
        if pool_pages not in self.label_rows:
            self.label_rows[pool_pages] = self.page_ids.unsqueeze(1) + self.heads * pool_pages
        return self.label_rows[pool_pages]


def page_table(req_to_token: torch.Tensor, rows: torch.Tensor, n_pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """[bs, max n_pages]: the physical page of each request's logical pages (SGLang allocates whole pages); 0 past
    a request's end."""
    j = torch.arange(int(n_pages.max()), device=n_pages.device)
    first_tok = (j * page_size).clamp(max=req_to_token.shape[1] - 1)
    page_ids = (req_to_token[rows.view(-1, 1), first_tok.view(1, -1)] // page_size).long()
    return page_ids.masked_fill(j >= n_pages.view(-1, 1), 0)


def plan_decode(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                budgets: torch.Tensor, page_size: int, sink: int, recent: int,
                budget_ref: sel.BudgetRef | None = None) -> DecodePlan:
    """budgets [L, Hkv] (fraction of context; of the context `budget_ref` names when given, see
    selection.pages_for_budget) -> the step's DecodePlan for all L layers."""
    bs, P = seq_lens.shape[0], page_size
    L, Hkv = budgets.shape
    if recent < 1:   # rank_written relies on the last (only partial) page being forced
        raise ValueError(f"recent must be >= 1 page (the current token's page), got {recent}")
    n_pages = (seq_lens.long() + P - 1) // P                                   # [bs]
    k_pages = sel.pages_for_budget(budgets.view(L, 1, Hkv).double(), n_pages.view(1, bs, 1).double(), sink + recent,
                                   budget_ref)
    dense = (k_pages >= n_pages.view(1, bs, 1)).flatten(1).all(1).tolist()
    rows = req_pool_indices.long()
    max_pages = int(n_pages.max())
    j = torch.arange(max_pages, device=seq_lens.device)                      # logical pages
    page_ids = page_table(req_to_token, rows, n_pages, P)                     # [bs, N]
    # One index_select per metadata tensor straight into [bs, Hkv, N, D] order: advanced indexing (kmin[page_ids])
    # is ~20x slower on CPU, and a transposed gather makes every bound matmul copy its operand first.
    heads = torch.arange(Hkv, device=seq_lens.device).view(1, Hkv, 1)
    meta_rows = (page_ids.unsqueeze(1) * Hkv + heads).flatten()
    # what every layer's selection would otherwise rebuild from n_pages and k_pages: on a CPU each small op costs
    # 10-30 us once the layer's gathers have evicted the caches, more than its arithmetic
    pins = sel.page_pins(n_pages.view(bs, 1), max_pages, sink, recent)
    page_fill = sel.tokens_in_pages(seq_lens.long().view(bs, 1), j, P)
    kept = j < k_pages.unsqueeze(-1)
    k_max = k_pages.flatten(1).amax(1).tolist()
    tokens = torch.arange(P, device=seq_lens.device)
    kv_rows = page_ids.unsqueeze(1) * (P * Hkv) + heads
    rank_written = tokens < sel.rank_fill(pins, page_fill.unsqueeze(1)).unsqueeze(-1)
    return DecodePlan(seq_lens, n_pages, k_pages, dense, page_ids, rows, meta_rows, pins, page_fill, kept, k_max,
                      heads, kv_rows, tokens * Hkv, rank_written, ~rank_written)


def select_decode_tokens(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, req_to_token: torch.Tensor,
                         req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, budgets: torch.Tensor,
                         page_size: int, sink: int, recent: int, selector: str = sel.DEFAULT_SELECTOR,
                         fine: tuple[torch.Tensor, torch.Tensor] | None = None,
                         budget_ref: sel.BudgetRef | None = None, k_buf: torch.Tensor | None = None,
                         labels: tuple[torch.Tensor, torch.Tensor] | None = None,
                         carry: torch.Tensor | None = None) -> DecodeSelection:
    """One layer's selection with its own plan: budgets [Hkv]; the rest as `plan_decode` and `select_layer`."""
    plan = plan_decode(req_to_token, req_pool_indices, seq_lens, budgets.view(1, -1), page_size, sink, recent,
                       budget_ref)
    return select_layer(plan, 0, q, kmin, kmax, req_to_token, page_size, sink, recent, selector, fine, k_buf, labels,
                        carry)


def select_layer(plan: DecodePlan, layer: int, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 req_to_token: torch.Tensor, page_size: int, sink: int, recent: int,
                 selector: str = sel.DEFAULT_SELECTOR, fine: tuple[torch.Tensor, torch.Tensor] | None = None,
                 k_buf: torch.Tensor | None = None,
                 labels: tuple[torch.Tensor, torch.Tensor] | None = None,
                 carry: torch.Tensor | None = None) -> DecodeSelection:
    """q [bs, Hkv, G, D]: layer `layer` of the step `plan`. Each head keeps its top-k pages by
    `selection.choose_pages` (sink + recent first). `fine` = (fmin, fmax): the same metadata at page
    size `selector.sub` ([slots / sub, Hkv, D], `new_page_metadata(..., sub)`), needed by sub-page selectors;
    `k_buf` ([slots, Hkv, D], the key cache), needed by `keys` selectors; `labels` = (label cache
    [Hkv, slots, r], channels [Hkv, r]) (`new_label_cache`, `fold_labels`), needed by label selectors;
    `carry` [request rows, Hkv, M]: this layer's pages carried between steps (carry.py; shortlist selectors)."""
    bs, Hkv = q.shape[:2]
    P = page_size
    rule = sel.get_selector(selector)
    seq_lens, n_pages, page_ids = plan.seq_lens, plan.n_pages, plan.page_ids
    k_pages = plan.k_pages[layer]                                              # [bs, Hkv]
    heads = plan.heads
    if plan.dense[layer]:
        T = int(seq_lens.max())
        pos = torch.arange(T, device=q.device).view(1, 1, T).expand(bs, Hkv, T)
        valid = pos < seq_lens.view(bs, 1, 1)
        slots = req_to_token[plan.rows.view(bs, 1, 1), pos.clamp(max=req_to_token.shape[1] - 1)]
        return DecodeSelection(slots.long() * Hkv + heads, valid, True, Hkv)

    max_pages = page_ids.shape[1]
    lo = kmin.view(-1, kmin.shape[-1]).index_select(0, plan.meta_rows).view(bs, Hkv, max_pages, -1)
    hi = kmax.view(-1, kmax.shape[-1]).index_select(0, plan.meta_rows).view(bs, Hkv, max_pages, -1)
    fine_meta = None
    if rule.sub:
        if fine is None:
            raise ValueError(f"selector {selector!r} needs sub-page metadata at page size {rule.sub} (fine=)")
        S = P // rule.sub
        flat_lo, flat_hi = fine[0].view(-1, fine[0].shape[-1]), fine[1].view(-1, fine[1].shape[-1])

        def fine_meta(idx, sub_heads=None):                                    # logical pages [bs, h, C]
            phys = page_ids.unsqueeze(1).expand(*idx.shape[:2], max_pages).gather(-1, idx)   # physical pages
            h = heads if sub_heads is None else sub_heads.view(1, -1, 1)
            rows = ((phys.unsqueeze(-1) * S + torch.arange(S, device=q.device)) * Hkv + h.unsqueeze(-1)).flatten()
            shape = (*idx.shape, S, -1)                                        # [bs, Hkv, C, S, D]
            return flat_lo.index_select(0, rows).view(shape), flat_hi.index_select(0, rows).view(shape)
    elif rule.keys:
        if rule.label and labels is None:
            raise ValueError(f"selector {selector!r} re-ranks from the label cache: pass labels=(cache, channels)")
        if not rule.label and k_buf is None:
            raise ValueError(f"selector {selector!r} re-ranks from the keys: pass the key cache (k_buf=)")
        if rule.label:   # [Hkv, slots, r]: a (page, head) is one row of P*r values
            flat_pages = labels[0].view(Hkv * (labels[0].shape[1] // P), -1)
            label_pages = plan.label_pages(labels[0].shape[1] // P)

            def fine_meta(idx, sub_heads=None):                                # logical pages [bs, h, C]
                rows = _of_heads(label_pages, sub_heads).gather(-1, idx).flatten()
                return (flat_pages.index_select(0, rows).view(*idx.shape, P, -1),)   # [bs, Hkv, C, P, r]
        else:
            flat_k = k_buf.view(-1, k_buf.shape[-1])

            def fine_meta(idx, sub_heads=None):                                # logical pages [bs, h, C]
                rows = (_of_heads(plan.kv_rows, sub_heads).gather(-1, idx).unsqueeze(-1) + plan.tok_rows).flatten()
                return (flat_k.index_select(0, rows).view(*idx.shape, P, -1),)     # [bs, Hkv, C, P, D]
    ranks = plan.ranks(layer, rule)
    carried = carry.index_select(0, plan.rows) if carry is not None and rule.shortlist else None
    chosen = sel.choose_pages(rule, q, lo, hi, fine_meta, n_pages.view(bs, 1).expand(bs, Hkv), k_pages,
                              sink, recent, labels[1] if rule.label else None, None, ranks, carried)   # [bs, Hkv, K]
    if carried is not None:
        carry.index_copy_(0, plan.rows, carried)
    K = chosen.shape[-1]
    # a logical page's tokens are its physical page's P slots in order (SGLang allocates whole pages)
    rows = plan.kv_rows.gather(-1, chosen).unsqueeze(-1) + plan.tok_rows
    # chosen[..., j] holds rank j, whose written slots the plan knows (selection.LayerRanks); ranks past k are dropped
    valid = plan.rank_written[:, :, :K] & plan.kept[layer, :, :, :K].unsqueeze(-1)
    return DecodeSelection(rows.flatten(2), valid.flatten(2), False, Hkv)


BUCKET_SPREAD = 1.25   # heads whose token counts are within this factor share one padded batch
MIN_SAVED_TOKENS = 4096  # split into buckets only when that skips at least this many padded K/V reads
# (benchmark/results/balance.md: at 4096 the 8k x 4 optimal@10% layers split, batch 1 stays one call)
MIN_SAVED_PAGES = 1024   # the same for a shortlist's label pages (a page's labels are P * r values: 2 KB at fp32)


def _of_heads(x: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    """x [bs, Hkv, ...] restricted to `heads` (None: all)."""
    return x if heads is None else x.index_select(1, heads)


def by_width(width: list[int], rows: int, min_saved: int) -> list[tuple[list[int], int]]:
    """Group heads of per-head widths `width` (over `rows` batch rows), widest first, heads within BUCKET_SPREAD
    of their group's widest together: [(heads, group width)]. One group (all heads, the widest) when splitting
    would skip fewer than `min_saved` padded entries: then one call beats several (per-call overhead)."""
    order = sorted(range(len(width)), key=lambda h: -width[h])
    groups = [[order[0]]]
    for h in order[1:]:
        if width[h] * BUCKET_SPREAD >= width[groups[-1][0]]:
            groups[-1].append(h)
        else:
            groups.append([h])
    groups = [(g, max(1, width[g[0]])) for g in groups]
    if rows * sum(len(g) * (groups[0][1] - t) for g, t in groups[1:]) < min_saved:
        return [(list(range(len(width))), max(1, max(width)))]
    return groups


def shortlist_groups(width: list[int], rows: int, device) -> list[tuple[torch.Tensor, int]] | None:
    """A layer's second-stage head groups from its heads' shortlist lengths (`selection.ragged_second_stage`); None
    when one group serves (the second stage runs once, as without groups)."""
    groups = by_width(width, rows, MIN_SAVED_PAGES)
    return None if len(groups) == 1 else [(torch.tensor(g, device=device), w) for g, w in groups]


def head_buckets(chosen: DecodeSelection) -> list[tuple[list[int], int]]:
    """Ragged decode: group KV heads by how many token columns they use (`by_width`), so a head with a small
    budget is not padded to the largest head's k. Returns [(heads, width)], at most one group per distinct budget;
    a head's selected tokens sit in its first `width` columns."""
    bs, Hkv, T = chosen.valid.shape
    if bs * (Hkv - 1) * T < MIN_SAVED_TOKENS:   # no split could pay: decided from shapes, no tensor work
        return [(list(range(Hkv)), T)]
    cols = chosen.valid.any(0)                                                 # [Hkv, T]
    width = (cols * torch.arange(1, T + 1, device=cols.device)).amax(-1).tolist()
    groups = by_width(width, bs, MIN_SAVED_TOKENS)
    return [(groups[0][0], T)] if len(groups) == 1 else groups


def _rows(buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (slot * Hkv + head) of buf [slots, Hkv, D] -> [*rows.shape, D], as one index_select (advanced
    indexing is several times slower on CPU)."""
    if not buf.is_contiguous():
        return buf[rows.div(buf.shape[1], rounding_mode="floor"), rows % buf.shape[1]]
    return buf.view(-1, buf.shape[-1]).index_select(0, rows.flatten()).view(*rows.shape, buf.shape[-1])


def _attend(q, k_buf, v_buf, rows, valid, scale):
    keys, values = _rows(k_buf, rows).to(q.dtype), _rows(v_buf, rows).to(q.dtype)      # [bs, h, T, D]
    # a group's G queries are SDPA's query rows: one fused kernel (an einsum / mask / softmax / einsum chain
    # was four passes); every row keeps its sink page, so no row is fully masked
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=valid.unsqueeze(2), scale=scale)


def attend_selected(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, chosen: DecodeSelection,
                    scale: float) -> torch.Tensor:
    """Attention of q [bs, Hkv, G, D] over each head's selected tokens -> [bs, Hkv, G, Dv].
    Heads run in width buckets (head_buckets): a head reads and multiplies only about its own
    budget's tokens, so unequal budgets cost what their pages cost (one batch when they are equal)."""
    groups = head_buckets(chosen)
    if len(groups) == 1:
        return _attend(q, k_buf, v_buf, chosen.rows, chosen.valid, scale)
    out = q.new_empty(*q.shape[:3], v_buf.shape[-1])
    for heads, t in groups:   # one batch per budget bucket (<= distinct budgets), never per request
        h = torch.tensor(heads, device=q.device)
        out[:, h] = _attend(q[:, h], k_buf, v_buf, chosen.rows[:, h, :t].contiguous(),
                            chosen.valid[:, h, :t].contiguous(), scale)
    return out
