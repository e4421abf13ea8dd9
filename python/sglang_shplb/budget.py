"""Stage 2 — budget: per-head page budgets at a fixed total, from a profile's recovery curves.

    python -m sglang_shplb.budget --profile PROFILE --mean-budget 0.1 --out BUDGETS.json
        [--method uniform|shift|optimal|greedy] [--granularity kv|q] [--selector runtime|oracle]
        [--floor-pages K] [--metric sinkless|total] [--report budgets.png] [--prefill-mean-budget B]

Budgets are fractions of a head's context. Each unit (a KV group at `kv`, a query head at `q`)
gets at least `floor_pages` pages (default: 128 tokens, the paper's donor floor, where the mean
holds it, else sink + recent) and at most its whole context; the total, mean_budget x units, is met
exactly.
  uniform  every unit gets the mean (Quest-style baseline);
  shift    the paper's max-min shifting: move one page at a time from the highest-recovery unit to
           the lowest, until the move no longer helps;
  optimal  ours: the largest worst-case recovery tau whose budgets fit the total (bisection on tau
           over monotone curves), then what is left goes by marginal recovery gain.
  greedy   the most total recovery: from the floor, each page goes to the unit it lifts most (the
           max-sum allocation; what perplexity tracks rather than the worst unit).
Recovery is measured on the mass outside the always-kept sink pages by default (`sinkless`):
with the paper's `total` mass, sink-heavy heads look sparse and get starved, and per-head budgets
then lose to uniform on perplexity (benchmark/results/quality.md, in git at 96caf91).
--prefill-mean-budget adds `prefill_budgets` (per KV group, same method, from the profile's
`prefill_kv` curves of the block-sparse prefill selector); the server then runs sparse prefill.
"""
from __future__ import annotations

import argparse
import heapq
import sys

import torch

from .artifacts import ArtifactError, write_json
from .curves import eval_curves, invert_curves  # noqa: F401  (budget's callers read them here too)

METHODS = ("uniform", "shift", "optimal", "greedy")


# ---------------------------------------------------------------- allocation methods
def uniform(curves, grid, mean, floor, step):
    return torch.full(curves.shape[:1], mean, dtype=torch.float64)


def shift(curves, grid, mean, floor, step):
    """Paper: repeatedly move `step` from the sparsest unit (highest recovery) to the least sparse."""
    b = uniform(curves, grid, mean, floor, step)
    for _ in range(100_000):
        r = eval_curves(curves, grid, b)
        recv = int(r.argmin())
        donors = r.masked_fill(b - floor < 1e-12, float("-inf"))
        donor = int(donors.argmax())
        amount = min(step, 1.0 - float(b[recv]), float(b[donor] - floor[donor]))
        if donor == recv or amount <= 1e-12:
            break
        new = b.clone()
        new[recv] += amount
        new[donor] -= amount
        r_new = eval_curves(curves, grid, new[[recv, donor]])
        if r_new[1] < r_new[0] or r_new[0] <= r[recv]:
            break  # moving no longer helps: the donor would drop below the recipient
        b = new
    return b


def optimal(curves, grid, mean, floor, step):
    """Max-min exactly (bisection on the target), then leftover by marginal gain."""
    total = mean * len(curves)

    def cost(tau):
        return torch.maximum(invert_curves(curves, grid, torch.full(curves.shape[:1], tau)), floor)

    lo, hi = float(eval_curves(curves, grid, floor).min()), 1.0
    if cost(hi).sum() <= total:
        lo = hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid).sum() <= total else (lo, mid)
    b = cost(lo)
    return _spend_leftover(curves, grid, b, total - float(b.sum()), step)


def greedy(curves, grid, mean, floor, step):
    """Max-sum: start every unit at the floor, then spend the rest by marginal recovery gain."""
    return _spend_leftover(curves, grid, floor.clone(), mean * len(curves) - float(floor.sum()), step)


def _spend_leftover(curves, grid, b, leftover, step):
    """Greedy by marginal recovery per unit budget; the last partial step goes to the best unit."""
    def gain(i, amount):
        return float(eval_curves(curves[i], grid, b[i] + amount) - eval_curves(curves[i], grid, b[i])) / amount

    heap = [(-gain(i, step), i) for i in range(len(b)) if b[i] < 1.0]
    heapq.heapify(heap)
    while leftover > 1e-12 and heap:
        _, i = heapq.heappop(heap)
        amount = min(step, leftover, 1.0 - float(b[i]))
        b[i] += amount
        leftover -= amount
        if b[i] < 1.0 - 1e-12:
            heapq.heappush(heap, (-gain(i, min(step, 1.0 - float(b[i]))), i))
    return b


ALLOCATORS = {"uniform": uniform, "shift": shift, "optimal": optimal, "greedy": greedy}   # METHODS, in order


def allocate(curves: torch.Tensor, grid: torch.Tensor, mean: float, method: str, floor_frac: float,
             step: float) -> torch.Tensor:
    """curves [units, G] -> budgets [units] (fractions, float64) with sum == mean * units."""
    if method not in METHODS:
        raise ArtifactError(f"unknown method {method!r}; choose one of {METHODS}")
    if not (0.0 < mean <= 1.0):
        raise ArtifactError(f"--mean-budget must be in (0, 1], got {mean}")
    if mean < floor_frac:
        raise ArtifactError(f"--mean-budget {mean} is below the floor of {floor_frac:.4f} (floor pages at the "
                            "profile's context length); raise it or lower --floor-pages")
    floor = torch.full(curves.shape[:1], floor_frac, dtype=torch.float64)
    b = ALLOCATORS[method](curves, grid, mean, floor, step)
    assert abs(float(b.sum()) - mean * len(b)) < 1e-6 * len(b), "budget total not met"
    return b


# ---------------------------------------------------------------- artifact
FLOOR_TOKENS = 128   # the paper's donor floor: max-min shifting stops taking budget from a head at ~128 tokens


def default_floor_pages(meta: dict, mean: float) -> int:
    """Fewest pages a unit keeps at the profile's context when --floor-pages is not given: FLOOR_TOKENS where
    the mean budget holds that many pages, else sink + recent. A floor under max-min keeps the groups that
    look local on the calibration text (15 of 90 at sink + recent only, without it) able to retrieve, and
    it lowers perplexity at 5% and 10% on the profile's texts and a held-out one (benchmark/results/SUMMARY.md)."""
    forced = meta["sink_pages"] + meta["recent_pages"]
    pages = -(-FLOOR_TOKENS // meta["page_size"])
    return max(forced, pages) if pages <= mean * meta["context_lens"][0] / meta["page_size"] else forced


def make_budgets(profile, mean: float, method: str = "optimal", granularity: str = "kv",
                 selector: str = "runtime", floor_pages: int | None = None, metric: str = "sinkless",
                 prefill_mean: float | None = None) -> dict:
    meta = profile.meta
    curves = profile.curves(selector, granularity, metric)              # [L, U, G]
    L, U, _ = curves.shape
    ctx, page = meta["context_lens"][0], meta["page_size"]
    given = floor_pages
    floor_pages = default_floor_pages(meta, mean) if given is None else given
    b, r = _allocate_units(curves, profile.grid, mean, method, floor_pages * page / ctx, page / ctx)
    extra = {} if prefill_mean is None else _prefill_budgets(
        profile, prefill_mean, method, granularity, metric,
        default_floor_pages(meta, prefill_mean) if given is None else given, page / ctx)
    return {**extra, **label_channels(profile, granularity),
        "model_fingerprint": meta["model_fingerprint"], "granularity": granularity, "selector": selector,
        "method": method, "metric": metric, "mean_budget": mean, "page_size": page, "context_len": ctx,
        "floor_pages": floor_pages, "sink_pages": meta["sink_pages"], "recent_pages": meta["recent_pages"],
        "num_layers": L, "num_q_heads": meta["num_q_heads"], "num_kv_heads": meta["num_kv_heads"],
        "budgets": b.tolist(), "predicted_recovery": r.tolist(),
        "summary": {"mean_recovery": float(r.mean()), "worst_recovery": float(r.min())},
    }


def label_channels(profile, granularity: str) -> dict:
    """The profile's calibrated label channels per unit ({} for a profile without them): the server's
    default selector reads them (selection.DEFAULT_SELECTOR)."""
    ch = profile.label_channels(granularity)
    return {} if ch is None else {"label_channels": ch.tolist()}


def _prefill_budgets(profile, mean, method, granularity, metric, floor_pages, step) -> dict:
    """Per-KV-group prefill budgets from the profile's block-selector curves (prefill_kv)."""
    if granularity != "kv":
        raise ArtifactError("prefill budgets are per KV group (a query block's pages are shared by the group); "
                            "use --granularity kv with --prefill-mean-budget")
    b, r = _allocate_units(profile.curves("prefill", "kv", metric), profile.grid, mean, method, floor_pages * step,
                           step)
    return {"prefill_mean_budget": mean, "prefill_floor_pages": floor_pages, "prefill_budgets": b.tolist(),
            "prefill_predicted_recovery": r.tolist()}


def _allocate_units(curves: torch.Tensor, grid: torch.Tensor, mean: float, method: str, floor_frac: float,
                    step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """curves [L, U, G] -> (budgets, predicted recovery), each [L, U], allocated over all units at once."""
    L, U, _ = curves.shape
    flat = curves.reshape(L * U, -1)
    b = allocate(flat, grid, mean, method, floor_frac, step=step)
    return b.view(L, U), eval_curves(flat, grid, b).view(L, U)


def load_budgets(path, fingerprint: str | None = None) -> dict:
    """Read, checksum and validate a budgets artifact (schema.Budgets); returns its body."""
    from .schema import Budgets

    return Budgets.load(path, fingerprint).to_json()


def main(argv: list[str] | None = None) -> int:
    from .profile import Profile

    p = argparse.ArgumentParser(prog="python -m sglang_shplb.budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True)
    p.add_argument("--mean-budget", type=float, required=True, help="mean fraction of context, in (0, 1]")
    p.add_argument("--method", choices=METHODS, default="optimal")
    p.add_argument("--granularity", choices=("kv", "q"), default="kv")
    p.add_argument("--selector", choices=("runtime", "oracle"), default="runtime")
    p.add_argument("--floor-pages", type=int, help="minimum pages per unit at the profile's context (default: "
                   "128 tokens, the paper's donor floor, where the mean budget holds it, else sink + recent; "
                   "benchmark/results/SUMMARY.md)")
    p.add_argument("--metric", choices=("sinkless", "total"), default="sinkless",
                   help="recovery of the mass outside the sink pages (default) or of all mass (the paper)")
    p.add_argument("--prefill-mean-budget", type=float, help="also make per-KV-group prefill budgets at this mean "
                   "(needs a profile with prefill curves)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", help="write a PNG: budget heatmap and recovery curves")
    args = p.parse_args(argv)
    try:
        prof = Profile.load(args.profile)
        body = make_budgets(prof, args.mean_budget, args.method, args.granularity, args.selector, args.floor_pages,
                            args.metric, args.prefill_mean_budget)
        write_json(args.out, "budget", body)
        if args.report:
            from .report import budget_report
            budget_report(prof, body, args.report)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = body["summary"]
    print(f"wrote {args.out}: {args.method} at mean {args.mean_budget}: predicted recovery mean "
          f"{s['mean_recovery']:.4f}, worst {s['worst_recovery']:.4f}")
    if "prefill_budgets" in body:
        r = torch.tensor(body["prefill_predicted_recovery"])
        print(f"  prefill budgets at mean {args.prefill_mean_budget}: predicted recovery mean {float(r.mean()):.4f}, "
              f"worst {float(r.min()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
