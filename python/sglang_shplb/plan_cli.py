"""The `python -m sglang_shplb.plan` command line (see plan.py's doc)."""
from __future__ import annotations

import argparse
import sys
import time

from . import placement as pl
from .artifacts import ArtifactError, model_fingerprint, model_shape, write_json
from .plan import GRANULARITIES, OBJECTIVES, __doc__ as PLAN_DOC, load_cost_model, make_plan


def compare_granularities(budgets, alt, tp, placement, objective, head_dim, cost_model, limit) -> list[str]:
    """One line per granularity: predicted total max-rank load (sum over layers), or why not."""
    by_gran = {budgets["granularity"]: budgets}
    if alt is not None:
        by_gran.setdefault(alt["granularity"], alt)
    if "kv" in by_gran:
        by_gran.setdefault("q", by_gran["kv"])      # q by expanding kv budgets
    lines, totals = [], {}
    for g in GRANULARITIES:
        if g not in by_gran:
            lines.append(f"  {g}: needs a {g} budgets file (--alt-budgets)")
            continue
        try:
            body = make_plan(by_gran[g], tp, placement, g, objective, head_dim, cost_model, kv_memory_limit=limit)
        except ArtifactError as e:
            lines.append(f"  {g}: not possible ({e})")
            continue
        totals[g] = body["summary"]["total_max_rank_load"]
        src = "expanded from kv budgets" if g != by_gran[g]["granularity"] else "own budgets"
        lines.append(f"  {g}: total max-rank {objective} load {totals[g]:.4g} "
                     f"(kv memory x{body['kv_memory_factor']:g}, {src})")
    if totals:
        lines.append(f"  -> {min(totals, key=totals.get)} granularity predicts the lower max-rank load")
    return lines


def _lpt_error(body: dict) -> ArtifactError:
    bad = sum(not pl.is_equal_count(x["rank_units"]) for x in body["layers"])
    return ArtifactError(f"lpt gives ranks different numbers of heads on {bad}/{body['num_layers']} layers "
                         f"(max imbalance {body['summary']['max_imbalance']:.3f}), which SGLang cannot load; "
                         "use --placement lpt-card or balanced")


def main(argv: list[str] | None = None) -> int:
    from .budget import load_budgets

    p = argparse.ArgumentParser(prog="python -m sglang_shplb.plan", description=PLAN_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", help="budgets file to place; without it, --profile and --mean-budget run the "
                   "joint solver (budgets and placement together, held to uniform-B's step time)")
    p.add_argument("--mean-budget", type=float, help="joint solver: the uniform budget B whose step time is matched")
    p.add_argument("--prefill-mean-budget", type=float, help="joint solver: also prefill budgets at this mean")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--placement", choices=pl.METHODS, default="balanced")
    p.add_argument("--granularity", choices=GRANULARITIES + ("auto",),
                   help="default: the budgets file's; joint solver: kv ('auto': q too where --kv-memory-limit allows)")
    p.add_argument("--objective", choices=OBJECTIVES, default="decode")
    p.add_argument("--fill-bubbles", action="store_true", help="raise budgets on under-loaded ranks (needs --profile)")
    p.add_argument("--profile", help="profile whose curves predict recovery (--fill-bubbles, joint solver)")
    p.add_argument("--model", help="checkpoint: checks the artifacts' fingerprint and gives head_dim")
    p.add_argument("--head-dim", type=int, help="head_dim for absolute costs when --model is not given")
    p.add_argument("--cost-model", help="JSON calibration of the cost model (see above)")
    p.add_argument("--kv-memory-limit", type=float, help="max KV memory factor allowed (q granularity = group size)")
    p.add_argument("--alt-budgets", help="budgets at the other granularity, for the granularity comparison")
    p.add_argument("--report", help="write a PNG: rank loads per layer, this placement vs contiguous")
    args = p.parse_args(argv)
    joint = args.budgets is None
    if joint and (args.profile is None or args.mean_budget is None):
        p.error("give --budgets BUDGETS.json, or --profile PROFILE --mean-budget B for the joint solver")
    if not joint and (args.mean_budget is not None or args.prefill_mean_budget is not None):
        p.error("--mean-budget/--prefill-mean-budget are for the joint solver; a budgets file has its own mean")
    if joint and (args.fill_bubbles or args.objective != "decode" or args.alt_budgets):
        p.error("the joint solver fills bubbles itself and plans decode placement (prefill budgets follow it); "
                "drop --fill-bubbles/--objective/--alt-budgets")
    if args.fill_bubbles and not args.profile:
        p.error("--fill-bubbles needs --profile PROFILE (the recovery curves it maximizes)")
    if args.granularity == "auto" and not joint:
        p.error("--granularity auto is for the joint solver; a budgets file has its own granularity")
    if args.tp < 1:
        p.error("--tp must be >= 1")
    try:
        t0 = time.perf_counter()
        fp = model_fingerprint(args.model) if args.model else None
        head_dim = model_shape(args.model)["head_dim"] if args.model else args.head_dim
        cost_model = load_cost_model(args.cost_model)
        profile = None
        if args.profile:
            from .profile import Profile
            profile = Profile.load(args.profile, fp)
        if joint:
            from .joint import make_joint_plan
            body = make_joint_plan(profile, args.mean_budget, args.tp, args.granularity or "kv", head_dim,
                                   cost_model, args.kv_memory_limit, args.prefill_mean_budget)
            compare = []
        else:
            budgets = load_budgets(args.budgets, fp)
            alt = load_budgets(args.alt_budgets, budgets["model_fingerprint"]) if args.alt_budgets else None
            if profile is not None and profile.meta["model_fingerprint"] != budgets["model_fingerprint"]:
                raise ArtifactError(f"profile {args.profile} is for another model than budgets {args.budgets}; "
                                    "use the profile the budgets came from")
            body = make_plan(budgets, args.tp, args.placement, args.granularity, args.objective, head_dim,
                             cost_model, profile, args.fill_bubbles, args.kv_memory_limit)
            compare = compare_granularities(budgets, alt, args.tp, args.placement, args.objective, head_dim,
                                            cost_model, args.kv_memory_limit)
        if not body["equal_count"]:
            raise _lpt_error(body)
        write_json(args.out, "plan", body)
        if args.report:
            from .report import plan_report
            before = None
            if joint:   # today's pipeline at the same mean, for the before/after picture
                from .budget import make_budgets
                before = make_plan(make_budgets(profile, args.mean_budget, "optimal", body["granularity"]), args.tp,
                                   "balanced", body["granularity"], "decode", head_dim, cost_model)
            plan_report(body, args.report, before)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(args, body, compare, time.perf_counter() - t0)
    return 0


def _print_summary(args, body, compare, seconds) -> None:
    s = body["summary"]
    print(f"wrote {args.out}: {body['placement']} at {body['granularity']} granularity, tp={body['tp_size']}, "
          f"{body['objective']} objective ({seconds:.2f}s)")
    print(f"  imbalance max/mean over layers: {s['max_imbalance']:.4f} / {s['mean_imbalance']:.4f} "
          f"(contiguous {s['contiguous_max_imbalance']:.4f} / {s['contiguous_mean_imbalance']:.4f}); "
          f"predicted time vs contiguous {s['total_max_rank_load'] / s['contiguous_total_max_rank_load']:.3f}x, "
          f"vs lower bound {s['total_max_rank_load'] / s['total_lower_bound']:.3f}x")
    print(f"  predicted step time {s['predicted_step_time']:.4g} = {s['step_time_ratio']:.3f}x uniform at the same "
          f"mean ({s['uniform_granularity']} granularity, {s['uniform_step_time']:.4g})")
    if body["units_per_rank"] == 1 and body["tp_size"] > 1 and body["placement"] != "joint":
        print("  note: each rank holds one unit, so placement cannot balance anything; try --granularity q")
    if "recovery_gain" in s:
        print(f"  predicted mean recovery {s['mean_recovery_before']:.4f} -> {s['mean_recovery']:.4f} "
              f"(gain {s['recovery_gain']:+.4f})")
    if "worst_recovery" in s:
        print(f"  predicted worst recovery {s['worst_recovery']:.4f}")
    if compare:
        print("granularity comparison:")
        print("\n".join(compare))


if __name__ == "__main__":
    sys.exit(main())
