"""Page selection, the heart of the method — pure PyTorch, shared by the profiler and the backend.

A head's context is cut into pages of P tokens. Per page and KV head we keep the channel-wise
min and max of the keys (Quest). For a query q, `q·k <= sum_d max(q_d*min_d, q_d*max_d)` for every
key k in the page, so that sum is an upper bound on the page's best logit; pages are ranked by it.
Sink pages (start) and recent pages (end, holding the current token) are always kept.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def page_minmax(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., L, D] -> (min, max) each [..., ceil(L/P), D]; a partial last page uses its tokens only."""
    L, D = keys.shape[-2:]
    n_pages = math.ceil(L / page_size)
    pad = n_pages * page_size - L
    k = keys.float()
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=math.inf).unflatten(-2, (n_pages, page_size))
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=-math.inf).unflatten(-2, (n_pages, page_size))
    return lo.amin(-2), hi.amax(-2)


def quest_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [..., G, D] (a KV group's queries), kmin/kmax [..., N, D] -> [..., G, N] upper bounds.
    max(q*lo, q*hi) picks hi where q > 0 and lo where q < 0, so the bound is two matmuls."""
    q = q.float()
    return q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)


def group_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Sum of the bound over a group's G queries, q [..., G, D] -> [..., N]. The bound is linear in
    the clamped queries, so summing them first costs one matvec per page instead of G."""
    q = q.float()
    pos, neg = q.clamp(min=0).sum(-2, keepdim=True), q.clamp(max=0).sum(-2, keepdim=True)
    return (pos @ kmax.transpose(-1, -2) + neg @ kmin.transpose(-1, -2)).squeeze(-2)


def pages_for_budget(budget: torch.Tensor, n_pages: torch.Tensor, floor_pages: int) -> torch.Tensor:
    """Pages a head keeps: ceil(budget * n_pages), at least the floor, at most the context."""
    k = torch.ceil(budget * n_pages - 1e-6).long()
    return torch.minimum(torch.clamp(k, min=floor_pages), n_pages.long())


def forced_page_mask(n_pages: torch.Tensor, max_pages: int, sink: int, recent: int) -> torch.Tensor:
    """[..., max_pages] True for sink pages and the `recent` pages ending at the last valid page."""
    idx = torch.arange(max_pages, device=n_pages.device)
    n = n_pages.unsqueeze(-1)
    return (idx < sink) | ((idx >= n - recent) & (idx < n))


def rank_pages(scores: torch.Tensor, n_pages: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Order of pages for selection: forced pages first, then by score, invalid pages last.
    scores [..., N]; n_pages [...] valid pages per row. Returns page indices [..., N]."""
    N = scores.shape[-1]
    s = scores.float().masked_fill(forced_page_mask(n_pages, N, sink, recent), math.inf)
    s = s.masked_fill(torch.arange(N, device=s.device) >= n_pages.unsqueeze(-1), NEG_INF)
    return s.argsort(dim=-1, descending=True, stable=True)


def top_pages(scores: torch.Tensor, n_pages: torch.Tensor, k_max: int, sink: int, recent: int) -> torch.Tensor:
    """The first k_max entries of rank_pages' order, via topk (cheaper than a full sort)."""
    N = scores.shape[-1]
    s = scores.float().masked_fill(forced_page_mask(n_pages, N, sink, recent), math.inf)
    s = s.masked_fill(torch.arange(N, device=s.device) >= n_pages.unsqueeze(-1), NEG_INF)
    return s.topk(k_max, dim=-1, sorted=True).indices


def select_pages(scores: torch.Tensor, n_pages: torch.Tensor, k_pages: torch.Tensor,
                 sink: int, recent: int) -> torch.Tensor:
    """Boolean page mask [..., N]: the top-k pages per row (k may differ per row/head)."""
    order = rank_pages(scores, n_pages, sink, recent)
    keep_sorted = torch.arange(scores.shape[-1], device=scores.device) < k_pages.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def recovery_curve(page_mass: torch.Tensor, order: torch.Tensor, k_pages: torch.Tensor) -> torch.Tensor:
    """Share of attention mass kept when the first k pages of `order` are selected.
    page_mass [..., N] (rows sum to 1), order [..., N], k_pages [..., G] -> [..., G]."""
    kept = page_mass.gather(-1, order).cumsum(-1)
    idx = (k_pages - 1).clamp(min=0).expand(*kept.shape[:-1], k_pages.shape[-1])
    return kept.gather(-1, idx).clamp(max=1.0)
