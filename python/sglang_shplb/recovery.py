"""How much attention mass a selection keeps, measured on full keys (not a paged cache): the profiler's
elasticity curves, the benchmarks' recall and the prefill planner's curves. It calls the serving rule
(`selection.choose_pages`, `selection.rank_pages`), never a copy of it."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .selection import Selector, choose_pages, coarse_scores, gather_channels, rank_pages, subpage_minmax


def kept_mass(page_mass: torch.Tensor, chosen: torch.Tensor, k_pages: torch.Tensor) -> torch.Tensor:
    """Share of attention mass in the first k of `chosen` pages. page_mass [..., N], chosen [..., K], k [...]."""
    keep = torch.arange(chosen.shape[-1], device=chosen.device) < k_pages.unsqueeze(-1)
    return (page_mass.gather(-1, chosen) * keep).sum(-1).clamp(max=1.0)


def recovery_curve(page_mass: torch.Tensor, order: torch.Tensor, k_pages: torch.Tensor) -> torch.Tensor:
    """Share of attention mass kept when the first k pages of `order` are selected.
    page_mass [..., N] (rows sum to 1), order [..., N], k_pages [..., G] -> [..., G]."""
    kept = page_mass.gather(-1, order).cumsum(-1)
    idx = (k_pages - 1).clamp(min=0).expand(*kept.shape[:-1], k_pages.shape[-1])
    return kept.gather(-1, idx).clamp(max=1.0)


def page_keys(keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """keys [..., L, D] -> [..., ceil(L/P), P, D], a partial last page zero-padded (it is always forced)."""
    L = keys.shape[-2]
    n = math.ceil(L / page_size)
    return torch.nn.functional.pad(keys.float(), (0, 0, 0, n * page_size - L)).unflatten(-2, (n, page_size))


def stage2_inputs(selector: Selector, keys: torch.Tensor, page_size: int,
                  channels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """What a two-stage selector's second stage reads per page, from full keys [..., L, D]: sub-page
    (min, max) [..., N, S, D], or the page's keys (keys [..., N, P, D],); () for a one-stage selector.
    A label selector reads the label cache: each key's `channels` [..., r] (labels [..., N, P, r],)."""
    if selector.label:
        if channels is None:
            raise ValueError(f"selector {selector.name!r} reads calibrated label channels: pass channels=")
        return (page_keys(gather_channels(keys, channels[..., : selector.keys]), page_size),)
    if selector.keys:
        return (page_keys(keys, page_size),)
    return subpage_minmax(keys, page_size, selector.sub) if selector.sub else ()


def selector_recovery(selector: Selector, page_mass: torch.Tensor, q: torch.Tensor, kmin, kmax,
                      fine: tuple[torch.Tensor, ...], n_pages: torch.Tensor, k_grid: torch.Tensor, sink: int,
                      recent: int, channels: Optional[torch.Tensor] = None,
                      seq_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Recovery curve of a runtime selector (profiler, benchmarks): page_mass [..., N]; q [..., G, D];
    kmin/kmax [..., N, D] and `fine` = stage2_inputs(...), each [..., N, X, D] (full, broadcastable);
    k_grid [..., B] pages per budget. The selection depends on k (the shortlist is c*k), so each budget
    selects afresh. channels: a label selector's, broadcastable against q's leading dims; seq_lens [...]: each
    query's context in tokens (keys past it in its last page are not counted), None: whole pages."""
    if not selector.fine:
        order = rank_pages(coarse_scores(selector, q, kmin, kmax, n_pages), n_pages, sink, recent)
        return recovery_curve(page_mass, order, k_grid)

    def fine_meta(idx):
        def pick(t):
            g = idx.unsqueeze(-1).unsqueeze(-1).expand(*idx.shape, *t.shape[-2:])
            return t.expand(*q.shape[:-2], *t.shape[-3:]).gather(-3, g)
        return tuple(pick(t) for t in fine)

    out = []
    for b in range(k_grid.shape[-1]):
        k = k_grid[..., b].expand(n_pages.shape)
        chosen = choose_pages(selector, q, kmin, kmax, fine_meta, n_pages, k, sink, recent, channels, seq_lens)
        out.append(kept_mass(page_mass, chosen, k))
    return torch.stack(out, -1)
