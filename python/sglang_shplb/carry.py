"""Pages carried from one decode step to the next (after TidalDecode's position persistence).

A two-stage selector shortlists pages by a cheap bound on their best logit, then re-ranks the shortlist by an
estimate of their mass (the label cache). The bound ranks by the width of a page's key box as much as by its
content, so a page that holds nearly all of a head's attention can fall out of the shortlist between two steps
(a needle of digits in a haystack of varied words: its box is narrow), and the answer loses the needle's
last digits. So each (request, KV head) carries its best free pages by the second stage's score into the next
step's shortlist, where the second stage ranks them again with every other candidate: a page that stops
mattering drops out, and nothing is read that the budget does not pay for.

A page must be found once to be carried; carry_seed.py seeds the carry at the end of each prefill.
"""
from __future__ import annotations

import torch

CARRIED_PAGES = 2     # per request, layer and KV head


def new_carry(num_layers: int, rows: int, kv_heads: int, device) -> torch.Tensor:
    """[layers, request rows (SGLang's req_to_token rows), KV heads, CARRIED_PAGES] logical pages; -1: none."""
    return torch.full((num_layers, rows, kv_heads, CARRIED_PAGES), -1, dtype=torch.long, device=device)


PROMOTED = 1e30       # a carried page's coarse score: above every bound, below the forced pages' +inf


def promote(coarse: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """coarse [..., N] page scores with the carried pages [..., M] (-1: none) raised to PROMOTED: into the shortlist."""
    idx = carried.clamp(min=0)
    keep = coarse.gather(-1, idx)
    return coarse.scatter(-1, idx, torch.where(carried >= 0, torch.full_like(keep, PROMOTED), keep))


def next_carry(short: torch.Tensor, fine: torch.Tensor, ok: torch.Tensor, m: int = CARRIED_PAGES) -> torch.Tensor:
    """The m shortlisted pages short [..., C] the second stage scored highest (fine [..., C]) among those it may
    carry (ok [..., C]: within the row's shortlist, not forced, inside the context) -> [..., m] pages, -1: none."""
    score = torch.where(ok, fine.float(), float("-inf"))
    top = score.topk(min(m, score.shape[-1]), dim=-1)
    pages = torch.where(top.values > float("-inf"), short.long().gather(-1, top.indices), -1)
    if pages.shape[-1] < m:
        pages = torch.cat([pages, pages.new_full((*pages.shape[:-1], m - pages.shape[-1]), -1)], -1)
    return pages


def forget(carry: torch.Tensor, rows: torch.Tensor) -> None:
    """A request row starts a new prompt (its prefill): nothing is carried into its first decode step."""
    carry.index_fill_(1, rows.long(), -1)

