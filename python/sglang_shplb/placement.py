"""Pure placement algorithms: assign units (KV groups or query heads) with loads to TP ranks.

A placement is `ranks`: one list of unit ids per rank, sorted ascending (the order the rank holds
them). SGLang gives every rank the same number of heads, so all methods but `lpt` keep the
equal-count rule (|ranks[r]| == units / tp).

  contiguous  SGLang's default: rank r gets units [r*k, (r+1)*k)  (the baseline)
  lpt         the paper: sort by load desc, give each to the least-loaded rank (no count rule)
  lpt-card    LPT that skips ranks already holding k units
  balanced    lpt-card, then best pairwise swaps out of the max-loaded rank until none helps;
              exact branch-and-bound when there are <= EXACT_MAX_UNITS units
"""
from __future__ import annotations

import heapq

import numpy as np

METHODS = ("contiguous", "lpt", "lpt-card", "balanced")
EXACT_MAX_UNITS = 12
EPS = 1e-12


def rank_loads(loads, ranks) -> list[float]:
    return [float(sum(loads[u] for u in r)) for r in ranks]


def imbalance(loads, ranks) -> float:
    """max / mean rank load (1.0 is perfect)."""
    rl = rank_loads(loads, ranks)
    mean = sum(rl) / len(rl)
    return max(rl) / mean if mean > 0 else 1.0


def is_equal_count(ranks) -> bool:
    return len({len(r) for r in ranks}) == 1


def lower_bound(loads, tp: int, equal_count: bool = True) -> float:
    """A lower bound on the best possible max rank load.

    Always: the mean load and the largest unit. Pigeonhole: of the j*tp+1 largest units, some rank
    holds j+1, so its load is at least the j+1 smallest of them; with equal counts (k units per
    rank) that rank also holds k-j-1 more units, at least the smallest others. j=0 is the largest
    unit with its k-1 smallest rank-mates."""
    p = sorted(loads, reverse=True)
    n = len(p)
    lb = max(sum(p) / tp, p[0])
    k = n // tp if equal_count and n % tp == 0 else 1
    for j in range(0, k if equal_count else 2):
        top = j * tp + 1
        if top > n:
            break
        mates = k - j - 1
        extra = sum(p[n - mates:]) if mates > 0 else 0.0   # smallest units, all outside the top
        lb = max(lb, sum(p[top - j - 1:top]) + extra)
    return float(lb)


# ---------------------------------------------------------------- methods
def contiguous(loads, tp: int) -> list[list[int]]:
    k = len(loads) // tp
    return [list(range(r * k, (r + 1) * k)) for r in range(tp)]


def _order(loads) -> list[int]:
    """Units by load descending; ties by id so results are deterministic."""
    return sorted(range(len(loads)), key=lambda u: (-loads[u], u))


def lpt(loads, tp: int, cap: int | None = None) -> list[list[int]]:
    """Greedy LPT; with `cap`, a rank holding `cap` units is full and skipped."""
    ranks = [[] for _ in range(tp)]
    heap = [(0.0, r) for r in range(tp)]        # (load, rank): least-loaded rank first
    for u in _order(loads):
        load, r = heapq.heappop(heap)
        ranks[r].append(u)
        if cap is None or len(ranks[r]) < cap:
            heapq.heappush(heap, (load + loads[u], r))
    return [sorted(r) for r in ranks]


def lpt_card(loads, tp: int) -> list[list[int]]:
    return lpt(loads, tp, cap=len(loads) // tp)


def swap_search(loads, ranks, max_iters: int = 10_000) -> list[list[int]]:
    """Repeatedly apply the best swap between the max-loaded rank and any other rank, while it
    strictly lowers that pair's max below the current max. Keeps counts. Vectorized per step."""
    ranks = [list(r) for r in ranks]
    w = np.asarray(loads, dtype=np.float64)
    rl = np.array([w[r].sum() for r in ranks])
    for _ in range(max_iters):
        m = int(rl.argmax())
        best, best_val = None, rl[m] - EPS * max(1.0, rl[m])
        a = w[ranks[m]]                                               # [k] units on the max rank
        for o in range(len(ranks)):
            if o == m or not ranks[o]:
                continue
            d = a[:, None] - w[ranks[o]][None, :]                     # [k, k'] load moved m -> o
            new_max = np.maximum(rl[m] - d, rl[o] + d)
            i, j = np.unravel_index(int(new_max.argmin()), new_max.shape)
            if new_max[i, j] < best_val:
                best, best_val = (o, int(i), int(j), float(d[i, j])), new_max[i, j]
        if best is None:
            break
        o, i, j, d = best
        ranks[m][i], ranks[o][j] = ranks[o][j], ranks[m][i]
        rl[m] -= d
        rl[o] += d
    return [sorted(r) for r in ranks]


def exact(loads, tp: int, incumbent=None) -> list[list[int]]:
    """Optimal equal-count placement by branch and bound (small instances only).
    Units go largest first; a unit is tried once per distinct (load, count) rank state, which
    removes the symmetry between identical (e.g. empty) ranks."""
    n = len(loads)
    k = n // tp
    order = _order(loads)
    best_ranks = incumbent or lpt_card(loads, tp)
    best = [max(rank_loads(loads, best_ranks)), best_ranks]
    lb = lower_bound(loads, tp)
    cur = [[] for _ in range(tp)]
    cur_load = [0.0] * tp

    def rec(i: int, cur_max: float) -> None:
        if best[0] <= lb * (1 + 1e-12):
            return                                  # incumbent is provably optimal
        if i == n:
            best[0], best[1] = cur_max, [sorted(r) for r in cur]
            return
        u, seen = order[i], set()
        for r in range(tp):
            state = (cur_load[r], len(cur[r]))
            if len(cur[r]) == k or state in seen:
                continue
            seen.add(state)
            new = cur_load[r] + loads[u]
            if max(new, cur_max) >= best[0] * (1 - 1e-12):
                continue
            cur[r].append(u)
            cur_load[r] = new
            rec(i + 1, max(new, cur_max))
            cur[r].pop()
            cur_load[r] -= loads[u]

    rec(0, 0.0)
    return best[1]


def balanced(loads, tp: int, exact_max_units: int = EXACT_MAX_UNITS) -> list[list[int]]:
    """Ours: the best of lpt-card and contiguous, improved by swaps; exact when small."""
    starts = [swap_search(loads, lpt_card(loads, tp)), swap_search(loads, contiguous(loads, tp))]
    ranks = min(starts, key=lambda rs: max(rank_loads(loads, rs)))
    if len(loads) <= exact_max_units and tp > 1:
        ranks = exact(loads, tp, incumbent=ranks)
    return ranks


def place(loads, tp: int, method: str) -> list[list[int]]:
    """Dispatch; `loads` is a sequence of floats, one per unit; len(loads) % tp == 0 is checked
    by the caller (the plan stage) with a message that names the fix."""
    loads = [float(x) for x in loads]
    if method == "contiguous":
        return contiguous(loads, tp)
    if method == "lpt":
        return lpt(loads, tp)
    if method == "lpt-card":
        return lpt_card(loads, tp)
    if method == "balanced":
        return balanced(loads, tp)
    raise ValueError(f"unknown placement {method!r}; choose one of {METHODS}")
