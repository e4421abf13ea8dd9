"""Seeding the carried pages (carry.py) at the end of a prefill.

A page must be found once to be carried. After a sparse prefill a needle page's bound may never rank inside the
decode shortlist (its narrow key box loses to wide haystack boxes at every step), so nothing would carry it. So
each extend step seeds the carry: the prompt's last query scores every page of the context with the selector's
second stage (the label estimate), once per layer, eagerly and outside decode graphs, and each (request, KV head)
carries its best free pages into the first decode step. A later chunk of the same prompt overwrites the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .carry import next_carry
from .selection import Selector, key_scores, page_pins, tokens_in_pages
from .sparse_attention import page_table


@dataclass
class SeedPlan:
    """What seeding an extend step's carry needs that no layer's data changes (made once per extend step)."""
    rows: torch.Tensor         # [bs] req_to_token rows
    last: torch.Tensor         # [bs] each request's last token in the step's flattened queries
    label_rows: torch.Tensor   # [bs, 1, N] physical page of each logical page (add head * pool pages per head)
    inside: torch.Tensor       # [bs, 1, N] logical page within the context
    free: torch.Tensor         # [bs, 1, N] inside, not forced (sink / recent): may be carried
    stale: torch.Tensor        # [bs, 1, N, P] unwritten slots


def plan_seed(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
              extend_lens: torch.Tensor, page_size: int, sink: int, recent: int) -> SeedPlan:
    """seq_lens [bs] context lengths after the step, extend_lens [bs] its new tokens per request."""
    P, rows = page_size, req_pool_indices.long()
    n_pages = (seq_lens.long() + P - 1) // P
    page_ids = page_table(req_to_token, rows, n_pages, P)
    j = torch.arange(page_ids.shape[1], device=seq_lens.device)
    pins = page_pins(n_pages, j.numel(), sink, recent)
    fill = tokens_in_pages(seq_lens.long().unsqueeze(1), j, P)
    stale = torch.arange(P, device=seq_lens.device) >= fill.unsqueeze(-1)
    inside = j < n_pages.unsqueeze(1)
    return SeedPlan(rows, extend_lens.long().cumsum(0) - 1, page_ids.unsqueeze(1),
                    inside.unsqueeze(1), pins.free.unsqueeze(1), stale.unsqueeze(1))


def seed(carry: torch.Tensor, plan: SeedPlan, q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor,
         selector: Selector) -> None:
    """carry [rows, Hkv, M] (one layer's) <- each request's best free pages by `selector`'s second stage for its
    last query: q [tokens, Hkv, G, D], the label cache [Hkv, slots, r] and its channels [Hkv, r]."""
    Hkv, slots, r = labels.shape
    P = plan.stale.shape[-1]
    pool_pages = slots // P
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1) * pool_pages
    idx = (plan.label_rows + heads).flatten()
    bs, N = plan.rows.shape[0], plan.label_rows.shape[-1]
    meta = labels.view(Hkv * pool_pages, P * r).index_select(0, idx).view(bs, Hkv, N, P, r)
    valid = plan.inside.expand(bs, Hkv, N)
    fine = key_scores(selector, q.index_select(0, plan.last), meta, valid, channels, plan.stale.expand(bs, Hkv, N, P))
    pages = torch.arange(N, device=q.device).expand(bs, Hkv, N)
    carry.index_copy_(0, plan.rows, next_carry(pages, fine, plan.free.expand(bs, Hkv, N), carry.shape[-1]))
