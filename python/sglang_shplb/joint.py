"""Joint budgets + placement at equal step time: the best quality the hardware time of uniform-B buys.

A layer waits for its slowest rank, so the step's attention time is T = sum over layers of the
max rank load, where a rank's load is the sum of its units' costs (coef[0] * budget + coef[1]).
Uniform budget B at the same tp costs T_u = layers * units_per_rank * (coef[0] * B + coef[1]).
We maximise, subject to T <= T_u, first the worst unit's predicted recovery, then the mean:

  1. worst case: bisection on a target recovery tau. A unit needs budget max(curve^-1(tau), floor);
     each layer's cap is the max rank load of the best equal-count placement of those needs
     (placement.balanced: exact for <= 12 units); tau is feasible when the caps sum to <= T_u.
     Uniform-B is always feasible, so the result's worst recovery is >= uniform-B's.
  2. bubbles: each rank below its layer's cap gets budget up to the cap (free: the max is unchanged),
     best marginal recovery first.
  3. slack: T_u - sum(caps) raises the cap of the layer whose ranks gain the most recovery per page
     (every rank of that layer spends one more page step), until the slack is spent.
Budget thus moves between layers too, the only freedom when every rank holds one unit.
With tp = 1 this is `budget.optimal` at the same total (one rank: cap = the layer's total).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from . import placement as pl
from .artifacts import ArtifactError
from .budget import _spend_leftover, default_floor_pages, eval_curves, invert_curves, label_channels
from .plan import GRANULARITIES, _check_divisible, cost_coefs, load_cost_model, make_plan, uniform_step_time

BISECT_ITERS = 40


@dataclass
class JointSolution:
    budgets: torch.Tensor             # [L, U] fractions of context (float64)
    ranks: list                       # [L][tp] unit ids per rank
    step_time: float                  # sum over layers of the max rank load (cost units)
    uniform_step_time: float          # the budget it was held to
    tau: float                        # worst-case target reached by step 1
    recovery: torch.Tensor            # [L, U] predicted recovery


def step_time(budgets: torch.Tensor, ranks, coef) -> float:
    cost = coef[0] * budgets.double() + coef[1]
    return float(sum(max(float(cost[l, r].sum()) for r in rr) for l, rr in enumerate(ranks)))


def _layer_cap(costs: list[float], tp: int, fixed=None) -> tuple[float, list]:
    if fixed is not None:
        ranks = fixed
    elif len(costs) == tp:        # one unit per rank: nothing to place
        ranks = [[u] for u in range(tp)]
    else:
        ranks = pl.balanced(costs, tp)
    return max(pl.rank_loads(costs, ranks)), ranks


def _caps(need: torch.Tensor, tp: int, coef, fixed=None) -> tuple[float, list, list]:
    costs = (coef[0] * need + coef[1]).tolist()
    out = [_layer_cap(c, tp, None if fixed is None else fixed[l]) for l, c in enumerate(costs)]
    return sum(c for c, _ in out), [c for c, _ in out], [r for _, r in out]


def solve(curves: torch.Tensor, grid: torch.Tensor, tp: int, mean: float, floor: float, step: float,
          coef=(1.0, 0.0), fixed_ranks=None, budget_time: float | None = None) -> JointSolution:
    """curves [L, U, G] (recovery vs budget on `grid`) -> budgets and placement (see module doc).
    `fixed_ranks`: keep this placement (e.g. prefill budgets on the decode plan's placement);
    `budget_time`: hold to this step time instead of uniform-`mean`'s."""
    L, U, _ = curves.shape
    if not 0.0 < mean <= 1.0:
        raise ArtifactError(f"--mean-budget must be in (0, 1], got {mean}")
    if tp < 1 or U % tp:
        raise ArtifactError(f"{U} units per layer cannot be split evenly over tp={tp}")
    if mean < floor - 1e-12:
        raise ArtifactError(f"--mean-budget {mean} is below the floor of {floor:.4f} (floor pages at the "
                            "profile's context length); raise it or lower --floor-pages")
    curves = curves.double()
    T = uniform_step_time(L, U, tp, mean, coef) if budget_time is None else budget_time
    floor_t = torch.full((L, U), floor, dtype=torch.float64)

    def need(tau: float) -> torch.Tensor:
        return torch.maximum(invert_curves(curves, grid, torch.full((L, U), tau)), floor_t)

    # 1. worst case: uniform-mean is feasible, so start from its worst recovery
    lo = float(eval_curves(curves, grid, torch.full((L, U), min(mean, 1.0))).min())
    hi = 1.0
    if _caps(need(hi), tp, coef, fixed_ranks)[0] <= T * (1 + 1e-12):
        lo = hi
    for _ in range(BISECT_ITERS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _caps(need(mid), tp, coef, fixed_ranks)[0] <= T * (1 + 1e-12) else (lo, mid)
    b = need(lo)
    total, caps, ranks = _caps(b, tp, coef, fixed_ranks)
    if total > T * (1 + 1e-9):   # only when even the floor does not fit (a budget_time below the floor's)
        raise ArtifactError(f"the floor budgets alone ({floor:.4f} of context per unit) need step time {total:.4g} "
                            f"> {T:.4g} allowed; raise --mean-budget or use fewer units (--granularity kv)")
    # 2. bubbles, 3. slack
    for l in range(L):
        _fill_layer(b[l], curves[l], grid, ranks[l], caps[l], coef, step)
    _spend_slack(b, curves, grid, ranks, caps, coef, step, T - sum(caps))
    return JointSolution(b, ranks, step_time(b, ranks, coef), T, lo, eval_curves(curves, grid, b))


def _fill_layer(row, curves, grid, ranks, cap, coef, step) -> None:
    """Raise each rank's budgets (in place) until its load reaches `cap`."""
    for r in ranks:
        idx = torch.tensor(r)
        load = float((coef[0] * row[idx] + coef[1]).sum())
        slack = (cap - load) / coef[0]
        if slack <= 1e-12:
            continue
        if len(r) == 1:          # one unit: it takes the whole slack (recovery is monotone)
            row[r[0]] = min(1.0, float(row[r[0]]) + slack)
        else:
            row[idx] = _spend_leftover(curves[idx], grid, row[idx].clone(), slack, step)


def _rank_gain(row, curves, grid, r, amount) -> float:
    """Best recovery gain of spending `amount` of budget on one unit of rank r."""
    idx = torch.tensor(r)
    b = row[idx]
    add = torch.minimum(torch.full_like(b, amount), 1.0 - b)
    if float(add.max()) <= 1e-12:
        return 0.0
    g = eval_curves(curves[idx], grid, b + add) - eval_curves(curves[idx], grid, b)
    return float(g.max())


def _spend_slack(b, curves, grid, ranks, caps, coef, step, slack) -> None:
    """Greedy over layers: raising a layer's cap by one page step of cost lets each of its ranks
    spend one step of budget; pick the layer whose ranks gain most, until the slack is gone."""
    quantum = coef[0] * step

    def layer_gain(l):
        return sum(_rank_gain(b[l], curves[l], grid, r, step) for r in ranks[l])

    heap = [(-layer_gain(l), l) for l in range(len(ranks))]
    heapq.heapify(heap)
    while slack > 1e-12 * max(1.0, sum(caps)) and heap:
        gain, l = heapq.heappop(heap)
        if -gain <= 0:
            break
        d = min(quantum, slack)
        caps[l] += d
        slack -= d
        _fill_layer(b[l], curves[l], grid, ranks[l], caps[l], coef, step)
        heapq.heappush(heap, (-layer_gain(l), l))


# ---------------------------------------------------------------- the plan artifact
def make_joint_plan(profile, mean: float, tp: int, granularity: str = "kv", head_dim: int | None = None,
                    cost_model: dict | None = None, kv_memory_limit: float | None = None,
                    prefill_mean: float | None = None, selector: str = "runtime", metric: str = "sinkless",
                    floor_pages: int | None = None) -> dict:
    """Profile -> plan body (plan.py's schema) whose decode step time is held to uniform-`mean`'s at
    kv granularity (SGLang's own layout; q granularity pays its KV copies in memory, not here).
    granularity 'auto': kv, or q when the memory limit allows it and its worst-then-mean
    predicted recovery is higher. Prefill budgets, if asked, are solved on the decode placement."""
    meta = profile.meta
    Hq, Hkv = meta["num_q_heads"], meta["num_kv_heads"]
    if not 0.0 < mean <= 1.0:
        raise ArtifactError(f"--mean-budget must be in (0, 1], got {mean}")
    if prefill_mean is not None and not 0.0 < prefill_mean <= 1.0:
        raise ArtifactError(f"--prefill-mean-budget must be in (0, 1], got {prefill_mean}")
    factors = {"kv": 1.0, "q": Hq / Hkv}
    limit = float("inf") if kv_memory_limit is None else kv_memory_limit
    if granularity == "auto":
        allowed = [g for g in GRANULARITIES if factors[g] <= limit and not (prefill_mean and g == "q")]
        if kv_memory_limit is None:
            allowed = [g for g in allowed if g == "kv"]     # q only where a memory limit allows it
    elif granularity in GRANULARITIES:
        allowed = [granularity]
    else:
        raise ArtifactError(f"choose --granularity from {GRANULARITIES + ('auto',)}")
    if not any(factors[g] <= limit for g in allowed):
        raise ArtifactError(f"--kv-memory-limit {kv_memory_limit:g} is met by no granularity (kv needs x1, q needs "
                            f"x{factors['q']:g} the KV cache); raise the limit to at least 1")
    allowed = [g for g in allowed if factors[g] <= limit]
    if prefill_mean is not None and allowed == ["q"]:
        raise ArtifactError("prefill budgets are per KV group; use --granularity kv with --prefill-mean-budget")
    fits = [g for g in allowed if (Hkv if g == "kv" else Hq) % tp == 0]
    if not fits:
        _check_divisible(Hkv if allowed[0] == "kv" else Hq, tp, allowed[0], Hq)   # raises, naming the fix
    allowed = fits
    ctx, page = meta["context_lens"][0], meta["page_size"]
    given = floor_pages
    floor_pages = default_floor_pages(meta, mean) if given is None else given
    floor, step = floor_pages * page / ctx, page / ctx
    cost_model = cost_model or load_cost_model(None)
    shape = {"context_len": ctx, "num_q_heads": Hq, "num_kv_heads": Hkv}
    ref_gran = "kv" if Hkv % tp == 0 else allowed[0]
    ref = uniform_step_time(meta["num_layers"], Hkv if ref_gran == "kv" else Hq, tp, mean,
                            cost_coefs(shape, ref_gran, head_dim or 1, cost_model)["decode"])
    best, why = None, None
    for g in allowed:
        coef = cost_coefs(shape, g, head_dim or 1, cost_model)["decode"]
        try:
            sol = solve(profile.curves(selector, g, metric), profile.grid, tp, mean, floor, step, coef,
                        budget_time=ref)
        except ArtifactError as e:      # e.g. q: every query head's floor pages cost more than uniform-B
            why = f"{g} granularity: {e}"
            continue
        key = (round(float(sol.recovery.min()), 9), float(sol.recovery.mean()))
        if best is None or key > best[0]:
            best = (key, g, sol)
    if best is None:
        raise ArtifactError(why)
    _, g, sol = best
    body = {"model_fingerprint": meta["model_fingerprint"], "granularity": g, "selector": selector,
            "method": "joint", "metric": metric, "mean_budget": mean, "page_size": page, "context_len": ctx,
            "floor_pages": floor_pages, "sink_pages": meta["sink_pages"], "recent_pages": meta["recent_pages"],
            "num_layers": meta["num_layers"], "num_q_heads": Hq, "num_kv_heads": Hkv, "budgets": sol.budgets.tolist(),
            **label_channels(profile, g)}
    if prefill_mean is not None:
        coef = cost_coefs(shape, "kv", head_dim or 1, cost_model)["prefill"]
        pre_floor = default_floor_pages(meta, prefill_mean) if given is None else given
        pre = solve(profile.curves("prefill", "kv", metric), profile.grid, tp, prefill_mean, pre_floor * step, step,
                    coef, fixed_ranks=sol.ranks)
        body.update(prefill_mean_budget=prefill_mean, prefill_floor_pages=pre_floor,
                    prefill_budgets=pre.budgets.tolist())
    plan = make_plan(body, tp, "balanced", g, "decode", head_dim, cost_model, profile, placements=sol.ranks)
    plan["summary"]["uniform_step_time"] = ref
    plan["summary"]["uniform_granularity"] = ref_gran
    plan["summary"]["step_time_ratio"] = plan["summary"]["predicted_step_time"] / ref
    plan["summary"]["worst_recovery"] = float(sol.recovery.min())
    plan["placement"] = "joint"
    plan["summary"]["joint"] = {"granularities_tried": allowed, "tau": sol.tau}
    if prefill_mean is not None:
        plan["summary"]["prefill_step_time_ratio"] = pre.step_time / pre.uniform_step_time
    return plan
