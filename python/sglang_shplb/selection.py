"""Page selection, the heart of the method — pure PyTorch, shared by the profiler, the backend, the GPU
kernels' reference and the benchmarks. The ranking rule lives here once.

A head's context is cut into pages of P tokens. Per page and KV head we keep the channel-wise min and
max of the keys (Quest). For a query q, `q·k <= sum_d max(q_d*min_d, q_d*max_d)` for every key k in the
page, so that sum is an upper bound on the page's best logit. Selectors (`SELECTORS`) differ in how a
KV group's G query heads are combined and how tight the box is:
  * aggregate "sum": bound of the group-summed query (old default; the head with the largest |q|
    dominates and a page only one retrieval head needs is diluted);
  * aggregate "max": each query head's own bound, max over the group (G matvecs per page);
    "norm": each head's bounds log-softmax-normalised over the pages first (ShadowKV), then max;
    "psum": each head's softmax over the pages summed over the group (an estimate of the group mass);
  * sub: min/max also per sub-page of `sub` tokens; a page scores the max over its sub-pages
    (a tighter box, P/sub times the metadata);
  * shortlist c: two stages — the coarse page bound ranks all pages, then only the c*k best are
    re-scored with the sub-page bound (fine metadata read for c*k pages, not all);
  * keys r: the shortlist is re-scored from the keys themselves (SparQ): each query head keeps its r
    largest-|q| channels, its approximate logits over the page's tokens are log-sum-exp'ed into a page
    log-mass, aggregated over the group. An estimate of the mass, not a bound: no metadata beyond the
    coarse page bounds, but the shortlisted pages' keys are read.
  * label: the same over r channels calibrated per KV head (`label_channels`, Double Sparsity's label
    cache of those channels of every key; r = D/2 reads what 4-token sub-page min/max does). The profile
    calibrates them; budgets and plans carry them; the default when they do, else `UNCALIBRATED_SELECTOR`.
The rule: forced pages (the `sink` first and the `recent` last valid pages) always come first, then
pages by descending score, ties to the lower page index; pages past the context never.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .carry import next_carry, promote

NEG_INF = float("-inf")
FLOOR = torch.finfo(torch.float32).min   # a masked logit that exp() sends to exactly 0, yet never makes inf - inf
MASKING = ("norm", "psum")      # aggregates that already score non-candidates -inf


@dataclass(frozen=True)
class Selector:
    name: str
    aggregate: str = "max"        # over the group: "sum" | "max" | "norm" (log-softmax per head, max) | "psum"
    sub: Optional[int] = None     # sub-page size of the fine bound (None: page bounds only)
    shortlist: float = 0.0        # c > 0: fine bound re-ranks only the c*k coarse best pages
    keys: int = 0                 # r > 0 (with shortlist): re-rank by r-channel logits over the keys (SparQ)
    label: bool = False           # the r channels are fixed per KV head (a label cache), not per query
    coarse: str = ""              # the first stage's aggregate, if not `aggregate` (a shortlist wants recall: "max")

    @property
    def fine(self) -> bool:
        """Pages are (re-)scored by a second, finer estimate: sub-page bounds or the keys."""
        return self.sub is not None or self.keys > 0

    def metadata_bytes(self, n_pages: int, k: int, page_size: int, head_dim: int, elem: int = 4) -> float:
        """Bytes of page metadata one (request, KV head) reads per decode step to select k of n pages."""
        coarse = 2 * head_dim * elem * (n_pages if (self.sub is None or self.shortlist) else 0)
        fine_pages = n_pages if not self.shortlist else min(n_pages, math.ceil(self.shortlist * k))
        fine = 0 if self.sub is None else 2 * head_dim * elem * (page_size // self.sub) * fine_pages
        if self.keys:    # whole key rows of the shortlist (the CPU path gathers rows, then picks channels)
            fine = (self.keys if self.label else head_dim) * elem * page_size * fine_pages   # label: r channels
        return float(coarse + fine)


# What serving offers: the default (its label channels come from the profile, with the budgets or plan) and the
# fallback for budgets without them. Other selectors studied on the way live in benchmark/selector.py (git keeps
# the rest); `ORACLE` is a reference for benchmarks, never served.
SELECTORS = {s.name: s for s in (
    # the label estimate normalised per head (ShadowKV: log-softmax, then max); the shortlist stays the max bound's
    # (normalised bounds lose needles, issue 12)
    Selector("two_stage_label32_norm", "norm", None, 3.0, keys=32, label=True, coarse="max"),
    Selector("two_stage4", "max", 4, 3.0),
)}
# Every page scored from all its keys and channels, each head's softmax mass summed over the group: the oracle
# ranking. It reads every key (no speed-up), so it separates what a budget loses from what a ranking loses.
ORACLE = Selector("oracle_mass", "psum", None, 0.0, keys=1 << 16)
LABEL_RANK = 32
DEFAULT_SELECTOR = "two_stage_label32_norm"
UNCALIBRATED_SELECTOR = "two_stage4"


def get_selector(name: "str | Selector") -> Selector:
    """A served selector by name, the reference ORACLE by its name, or a Selector a benchmark made (as is)."""
    if isinstance(name, Selector):
        return name
    if name == ORACLE.name:
        return ORACLE
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose one of {sorted(SELECTORS)}")
    return SELECTORS[name]


def label_channels(q_abs: torch.Tensor, k_abs: torch.Tensor, r: int) -> torch.Tensor:
    """The r channels of each KV head that carry the most of q.k (Double Sparsity's offline calibration):
    q_abs [..., G, D] mean |q| per channel of the group's query heads, k_abs [..., D] mean |k| over
    calibration tokens -> channel indices [..., r]. At r = 32 one calibration window suffices on SmolLM2 (two
    texts: perplexity 31.30 vs 31.33 at 2k/10%); weight norms alone were worse (32.40)."""
    return (q_abs * k_abs.unsqueeze(-2)).sum(-2).topk(r, -1).indices      # sorted: the first r' are the best r'


def gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """x [..., M, D] -> [..., M, r]: each row's `channels` [..., r] (leading dims broadcast against x's)."""
    return x.gather(-1, channels.unsqueeze(-2).expand(*x.shape[:-1], channels.shape[-1]))


def page_minmax(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., L, D] -> (min, max) each [..., ceil(L/P), D]; a partial last page uses its tokens only."""
    L, D = keys.shape[-2:]
    n_pages = math.ceil(L / page_size)
    pad = n_pages * page_size - L
    k = keys.float()
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=math.inf).unflatten(-2, (n_pages, page_size))
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=-math.inf).unflatten(-2, (n_pages, page_size))
    return lo.amin(-2), hi.amax(-2)


def subpage_minmax(keys: torch.Tensor, page_size: int, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., L, D] -> (min, max) each [..., ceil(L/P), P/sub, D]. A sub-page with no token yet
    holds (+inf, -inf), which the fine bound scores -inf."""
    L, D = keys.shape[-2:]
    n_pages = math.ceil(L / page_size)
    pad = n_pages * page_size - L
    if pad:
        keys = torch.cat([keys.float(), keys.new_full((*keys.shape[:-2], pad, D), math.nan).float()], -2)
    k = keys.float().unflatten(-2, (n_pages, page_size // sub, sub))
    lo = torch.where(k.isnan(), math.inf, k).amin(-2)
    hi = torch.where(k.isnan(), -math.inf, k).amax(-2)
    return lo, hi


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


def aggregate(how: str, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-head page scores b [..., G, N] -> one score per page [..., N], by the rule `how` (a Selector's
    `aggregate`); valid [..., N] marks the candidates a per-head normalisation runs over (others come out -inf)."""
    if how == "sum":
        return b.sum(-2)
    if how == "max":
        return b.amax(-2)
    z = torch.where(valid.unsqueeze(-2), b, NEG_INF)
    if how == "norm":    # ShadowKV: each head's scores as a log-softmax over its candidates
        return z.log_softmax(-1).amax(-2)
    if how == "psum":    # estimated group mass: per-head softmax over candidates, summed
        return z.softmax(-1).sum(-2).masked_fill(~valid, NEG_INF)
    raise ValueError(f"unknown aggregate {how!r}")


def coarse_scores(selector: Selector, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                  n_pages: torch.Tensor) -> torch.Tensor:
    """Page scores from page min/max: q [..., G, D], kmin/kmax [..., N, D], n_pages [...] -> [..., N]."""
    how = selector.coarse or selector.aggregate
    if how == "sum":   # linear in the clamped queries: one matvec per page, not G
        return group_upper_bound(q, kmin, kmax)
    b = quest_upper_bound(q, kmin, kmax)
    if how == "max":   # order only: needs no logit scale or candidate mask (an op saved is ~10-30 us per CPU layer)
        return b.amax(-2)
    return aggregate(how, b * q.shape[-1] ** -0.5, torch.arange(b.shape[-1], device=b.device) < n_pages.unsqueeze(-1))


def fine_scores(selector: Selector, q: torch.Tensor, fmin: torch.Tensor, fmax: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
    """Page scores from sub-page min/max: q [..., G, D], fmin/fmax [..., C, S, D], valid [..., C] ->
    [..., C]: each query head's bound per sub-page, max over the page's sub-pages, then aggregated
    over the group. Empty sub-pages score -inf."""
    C, S, D = fmin.shape[-3:]
    b = quest_upper_bound(q, fmin.flatten(-3, -2), fmax.flatten(-3, -2))       # [..., G, C*S]
    b = torch.where(b.isnan(), NEG_INF, b)                                     # 0 * inf of an empty sub-page
    return aggregate(selector.aggregate, b.unflatten(-1, (C, S)).amax(-1) * D ** -0.5, valid)


def key_scores(selector: Selector, q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
               channels: Optional[torch.Tensor] = None, stale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Page scores from the pages' keys (SparQ): q [..., G, D], keys [..., C, P, D], valid [..., C] -> [..., C].
    Each query head's logits from its `selector.keys` largest-|q| channels, log-sum-exp over the page's
    tokens (an estimate of the page's log attention mass), aggregated over the group. A label selector:
    keys are label-cache rows [..., C, P, r] (the KV head's `channels` [..., r]); logits keep the full 1/sqrt(D).
    stale [..., C, P]: unwritten slots (a partial page's must not enter a normalisation over pages); None: none."""
    q = q.float()
    if selector.label:
        if channels is None:
            raise ValueError(f"selector {selector.name!r} reads calibrated label channels: pass channels=")
        q_r = gather_channels(q, channels[..., : keys.shape[-1]]) * q.shape[-1] ** -0.5
    else:
        top = q.abs().topk(min(selector.keys, q.shape[-1]), -1).indices
        q_r = torch.zeros_like(q).scatter(-1, top, q.gather(-1, top) * q.shape[-1] ** -0.5)  # others zeroed
    C, P = keys.shape[-3:-1]
    # one [G, r] x [r, C*P] matmul per head (an einsum here paid a layout copy: 2x slower on CPU)
    logits = torch.matmul(q_r, keys.float().flatten(-3, -2).transpose(-1, -2)).unflatten(-1, (C, P))
    if stale is not None:   # a finite floor, so a page with none written stays finite (it is never a candidate)
        logits = logits.masked_fill_(stale.unsqueeze(-3), FLOOR)
    # torch.logsumexp's own steps, less its guard for an infinite max (the floor is finite): 6 ops, not 9
    peak = logits.amax(-1, keepdim=True)
    return aggregate(selector.aggregate, (logits - peak).exp_().sum(-1).log_().add_(peak.squeeze(-1)), valid)


def tokens_in_pages(seq_lens: torch.Tensor, pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """Tokens written in logical pages `pages` of a context of seq_lens tokens (broadcast): P but in the last,
    0 past it."""
    return (seq_lens - pages * page_size).clamp(0, page_size)


def second_stage(selector: Selector, channels: Optional[torch.Tensor] = None,
                 seq_lens: Optional[torch.Tensor] = None, page_fill: Optional[torch.Tensor] = None,
                 stale: Optional[torch.Tensor] = None) -> Callable[..., torch.Tensor]:
    """The finer page score of a `fine` selector over candidate pages idx [..., C]: from the keys (or label
    cache; a page's tokens past seq_lens [...] are not counted; page_fill [..., N], the tokens written in each
    page, or stale [..., C, P], the candidates' unwritten slots, says the same when the caller made it once), or
    from sub-page bounds (which hold only written keys)."""
    if selector.keys:
        def score(selector, q, idx, meta, valid):
            P = meta[0].shape[-2]
            unwritten = stale
            if unwritten is None and (page_fill is not None or seq_lens is not None):
                fill = (page_fill.gather(-1, idx) if page_fill is not None
                        else tokens_in_pages(seq_lens[..., None], idx, P))
                unwritten = torch.arange(P, device=idx.device) >= fill.unsqueeze(-1)
            return key_scores(selector, q, *meta, valid, channels=channels, stale=unwritten)
        return score
    return lambda selector, q, idx, meta, valid: fine_scores(selector, q, *meta, valid)


@dataclass(frozen=True)
class BudgetRef:
    """Where per-head budgets were made: a context of `pages` pages; `mean` is the mean budget of the
    model's sparse heads (budget < 1) there."""
    pages: int
    mean: float

    @classmethod
    def of(cls, budgets: torch.Tensor, pages: int) -> "BudgetRef":
        """From the whole model's budget table (every layer and head, not one TP rank's share)."""
        sparse = budgets[budgets < 1.0].double()
        return cls(int(pages), float(sparse.mean()) if sparse.numel() else 1.0)


def pages_for_budget(budget: torch.Tensor, n_pages: torch.Tensor, floor_pages: int,
                     ref: Optional[BudgetRef] = None) -> torch.Tensor:
    """Pages a head keeps at a context of n_pages, at least the floor (sink + recent), at most the context.

    Without `ref` (a uniform budget): ceil(budget * n). Per-head budgets are fractions of the context they
    were made at (`ref`); there a head keeps floor + (budget * ref - floor) free pages. At another length
    every sparse head's free pages scale by the larger of
      * (n - floor) / (ref - floor), its share of the selectable pages: rules below ref, where the fixed
        floor makes reads exceed the budget (11.4% at 2k for 10% at 4k); ceil(budget * n) there dropped
        heads just above the floor to sink + recent, and with them every needle they retrieve;
      * (mean * n - floor) / (mean * ref - floor), which reads the mean budget: rules beyond ref, where
        the share alone read less (9.6% at 8k, 9.1% at 32k). A head at 1.0 stays dense."""
    n = n_pages.long()
    if ref is None or ref.pages <= floor_pages:
        k = torch.ceil(budget * n_pages - 1e-6).long()
    else:
        free = (budget * ref.pages - floor_pages).clamp(min=0.0)
        scale = (n_pages - floor_pages).clamp(min=0.0) / (ref.pages - floor_pages)     # the share
        room = ref.mean * ref.pages - floor_pages   # a mean head's free pages at ref (none: the share rules)
        if room > 0:   # host floats only: no device tensor made here (decode steps run in CUDA graphs)
            scale = torch.maximum(scale, (ref.mean * n_pages - floor_pages) / room)
        k = torch.where(budget >= 1.0, n, floor_pages + torch.ceil(free * scale - 1e-6).long())
    return torch.minimum(torch.clamp(k, min=floor_pages), n)


def is_forced(j: torch.Tensor, n_pages: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Logical pages j (broadcast against n_pages) kept whatever they score (the module docstring's rule; kernels
    inline it)."""
    return (j < sink) | ((j >= n_pages - recent) & (j < n_pages))


@dataclass(frozen=True)
class PagePins:
    """The rule's fixed places (`page_pins`; data-independent: a decode step makes them once): free [..., N] pages
    ranked by their score; value [..., N] +inf for a forced page, -inf for the rest (past the context, or free)."""
    free: torch.Tensor
    value: torch.Tensor


def page_pins(n_pages: torch.Tensor, N: int, sink: int, recent: int) -> PagePins:
    j, n = torch.arange(N, device=n_pages.device), n_pages.unsqueeze(-1)
    inside = j < n
    forced = is_forced(j, n, sink, recent) & inside
    return PagePins(inside & ~forced,
                    torch.full(forced.shape, NEG_INF, device=n_pages.device).masked_fill_(forced, math.inf))


def rank_fill(pins: PagePins, page_fill: torch.Tensor) -> torch.Tensor:
    """pins, page_fill [..., N] -> tokens written in the page at each rank, known before scoring: forced pages rank
    first in page order, and with recent >= 1 the only partial page (the last) is forced, so free pages are full."""
    return page_fill.gather(-1, pins.value.argsort(dim=-1, descending=True, stable=True))


@dataclass(frozen=True)
class LayerRanks:
    """choose_pages' inputs that no layer's data changes, when a decode step made them for all its layers at once
    (FlashInfer's plan/run split: on a CPU each small op costs 10-30 us once a layer's gathers have evicted the
    caches). listed [..., >= C]: rank < each row's `shortlist_len` (shortlist selectors); rank_stale [..., N, P]:
    slot t of the page at rank j is unwritten (`rank_fill`)."""
    pins: PagePins
    page_fill: torch.Tensor        # [..., N] tokens written in each page
    k_max: int                     # int(k_pages.max())
    listed: Optional[torch.Tensor] = None
    rank_stale: Optional[torch.Tensor] = None
    groups: Optional[list] = None  # [(heads [h], width)]: the second stage per head group (`ragged_second_stage`)


def shortlist_len(selector: Selector, k_pages: torch.Tensor, n_pages: torch.Tensor) -> torch.Tensor:
    """Pages each row's first stage passes to the second: min(ceil(shortlist * k), n)."""
    return torch.minimum(torch.ceil(selector.shortlist * k_pages - 1e-6).long(), n_pages.long())


def rank_pages(scores: torch.Tensor, n_pages: torch.Tensor, sink: int, recent: int,
               pins: Optional[PagePins] = None) -> torch.Tensor:
    """THE ranking rule: forced pages first, then by descending score, ties to the lower page index,
    invalid pages last. scores [..., N]; n_pages [...] valid pages per row -> page indices [..., N].
    pins: `page_pins(n_pages, N, sink, recent)` when the caller made them already (a decode step's plan)."""
    pins = pins if pins is not None else page_pins(n_pages, scores.shape[-1], sink, recent)
    return torch.where(pins.free, scores.float(), pins.value).argsort(dim=-1, descending=True, stable=True)


def top_pages(scores: torch.Tensor, n_pages: torch.Tensor, k_max: int, sink: int, recent: int,
              pins: Optional[PagePins] = None) -> torch.Tensor:
    """The first k_max entries of rank_pages' order."""
    return rank_pages(scores, n_pages, sink, recent, pins)[..., :k_max]


def choose_pages(selector: Selector, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 fine_meta: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, ...]]],
                 n_pages: torch.Tensor, k_pages: torch.Tensor, sink: int, recent: int,
                 channels: Optional[torch.Tensor] = None, seq_lens: Optional[torch.Tensor] = None,
                 ranks: Optional[LayerRanks] = None, carry: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The selector, end to end. q [..., G, D]; kmin/kmax [..., N, D] page metadata (may broadcast);
    fine_meta(idx [..., C]) -> the second stage's inputs for those logical pages (two-stage selectors only):
    sub-page (min, max) [..., C, S, D] for a `sub` selector, (keys [..., C, P, D],) for a `keys` one,
    (labels [..., C, P, r],) for a label one, whose `channels` [..., r] (broadcast against q's leading dims)
    are passed too; n_pages, k_pages [...]; seq_lens [...] the tokens in the context (None: n_pages whole
    pages), so a partial last page's stale slots do not enter a per-head normalisation; ranks: the same inputs'
    data-independent parts (`LayerRanks`, in place of seq_lens) if a decode step made them; carry [..., M]: pages
    carried from the previous step into a shortlist (carry.py), updated in place for the next. Returns the chosen
    pages [..., K], K = k_pages.max(), in rank order; a row's entries past its k are not selected (callers
    mask them)."""
    N = kmin.shape[-2]
    K = ranks.k_max if ranks is not None else int(k_pages.max())
    pins = ranks.pins if ranks is not None else page_pins(n_pages, N, sink, recent)
    page_fill = ranks.page_fill if ranks is not None else None
    if not selector.fine:
        return top_pages(coarse_scores(selector, q, kmin, kmax, n_pages), n_pages, K, sink, recent, pins)
    if not selector.shortlist:    # fine bound on every page
        idx = torch.arange(N, device=q.device).expand(*q.shape[:-2], N)
        valid = idx < n_pages.unsqueeze(-1)
        fine = second_stage(selector, channels, seq_lens, page_fill)(selector, q, idx, fine_meta(idx), valid)
        return top_pages(fine, n_pages, K, sink, recent, pins)
    C = min(N, math.ceil(selector.shortlist * K))
    coarse = coarse_scores(selector, q, kmin, kmax, n_pages)
    short = top_pages(coarse if carry is None else promote(coarse, carry), n_pages, C, sink, recent, pins)  # [..., C]
    if ranks is not None and ranks.listed is not None:
        listed = ranks.listed[..., :C]
    else:
        listed = torch.arange(C, device=q.device) < shortlist_len(selector, k_pages, n_pages).unsqueeze(-1)
    # the shortlist is in the rule's order, so its j-th page's unwritten slots are rank j's (rank_fill)
    stale = ranks.rank_stale[..., :C, :] if ranks is not None and ranks.rank_stale is not None else None
    if ranks is not None and ranks.groups is not None and stale is not None:
        fine = ragged_second_stage(selector, q, short, fine_meta, listed, channels, stale, ranks.groups)
    else:
        fine = second_stage(selector, channels, seq_lens, page_fill, stale)(selector, q, short, fine_meta(short),
                                                                           listed)
    if carry is not None:
        free = torch.broadcast_to(pins.free, (*short.shape[:-1], N)).gather(-1, short)
        carry.copy_(next_carry(short, fine, listed & free, carry.shape[-1]))
    # re-rank the shortlist by THE rule, in page space: each listed page's fine score at its page index over the
    # pins (forced +inf stays, unlisted -inf), so a stable sort breaks ties to the lower page index
    by_page = torch.broadcast_to(pins.value, (*short.shape[:-1], N)).clone()
    by_page.scatter_reduce_(-1, short, fine if selector.aggregate in MASKING else torch.where(listed, fine, NEG_INF),
                            "amax")
    return by_page.argsort(dim=-1, descending=True, stable=True)[..., :K]


def ragged_second_stage(selector: Selector, q: torch.Tensor, short: torch.Tensor, fine_meta: Callable,
                        listed: torch.Tensor, channels: Optional[torch.Tensor], stale: torch.Tensor,
                        groups: list) -> torch.Tensor:
    """The second stage of a shortlist [..., Hkv, C] run per head group at the group's own width: a head whose
    budget is small does not read (or multiply) the labels of the widest head's shortlist. groups [(heads [h],
    width)] cover every head, each width >= its heads' shortlist lengths; fine_meta(idx [..., h, width], heads)
    reads those heads' pages; stale [..., 1, C, P] (heads broadcast). Entries past a group's width are unlisted:
    -inf, as the aggregate scores every unlisted entry."""
    fine = torch.full(short.shape, NEG_INF, device=short.device)
    for heads, width in groups:
        idx = short.index_select(-2, heads)[..., :width]
        ch = None if channels is None else channels.index_select(-2, heads)
        score = second_stage(selector, ch, stale=stale[..., :width, :])
        part = score(selector, q.index_select(-3, heads), idx, fine_meta(idx, heads),
                     listed.index_select(-2, heads)[..., :width])
        fine.index_copy_(fine.dim() - 2, heads, F.pad(part, (0, short.shape[-1] - width), value=NEG_INF))
    return fine


def select_pages(scores: torch.Tensor, n_pages: torch.Tensor, k_pages: torch.Tensor,
                 sink: int, recent: int) -> torch.Tensor:
    """Boolean page mask [..., N]: the top-k pages per row (k may differ per row/head)."""
    order = rank_pages(scores, n_pages, sink, recent)
    keep_sorted = torch.arange(scores.shape[-1], device=scores.device) < k_pages.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
