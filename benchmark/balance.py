"""Budgets judged at equal step time: uniform vs budget-then-place vs the joint solver (predicted),
and ragged vs padded CPU decode (measured).

    OMP_NUM_THREADS=1 python benchmark/balance.py [--profile P] [--seed 0] [--no-timing]
        [--out benchmark/results/balance.md]

Step time = sum over layers of the slowest rank's decode load (KV bytes read, cost model of plan.py),
as a ratio to uniform-B's at the same tp. Per (model, tp, B):
  uniform       every KV group at B (ratio 1 by definition);
  optimal+place today's pipeline: `budget --method optimal` at mean B, then `plan --placement balanced`;
  uniform@same  uniform at the budget whose step time equals optimal+place's (what that time buys plainly);
  joint         `plan --profile --mean-budget B` (joint.py): held to uniform-B's step time.
Recovery: predicted per KV group from the profile's runtime-selector curves (sink-less mass);
worst = the worst group of the model, mean = over all groups. SmolLM2 uses its real profile. The
Llama-3.1-8B (32 layers x 8 KV groups) and Qwen2.5-72B (80 x 8) rows are **synthetic**: those
shapes with every group's curve drawn i.i.d. (fixed seed) from SmolLM2's real curves.
Timing (real code, one SmolLM2 layer's shapes, all 30 layers' budgets): the CPU decode attention of
`sparse_attention.attend_selected` (ragged: heads in width buckets) vs the same selection padded to
the largest head (the previous layout), for uniform and optimal budgets at tp 1.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROFILE, machine_line  # noqa: E402

from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb import placement as pl  # noqa: E402
from sglang_shplb.budget import allocate, eval_curves  # noqa: E402
from sglang_shplb.joint import solve, step_time  # noqa: E402
from sglang_shplb.plan_cli import main as plan_main  # noqa: E402
from sglang_shplb.profile import Profile  # noqa: E402

BUDGETS = (0.05, 0.1, 0.2)
SHAPES = {"SmolLM2-135M (real)": (None, (1, 3)), "Llama-3.1-8B shape (resampled)": ((32, 8), (2, 4, 8)),
          "Qwen2.5-72B shape (resampled)": ((80, 8), (2, 4, 8))}


def resampled(curves: torch.Tensor, layers: int, units: int, gen: torch.Generator) -> torch.Tensor:
    flat = curves.reshape(-1, curves.shape[-1])
    return flat[torch.randint(len(flat), (layers, units), generator=gen)]


def uniform_at_time(curves, grid, tp, time_target, floor):
    """The uniform budget whose step time is `time_target` (costs are linear: solve directly)."""
    L, U, _ = curves.shape
    b = min(1.0, max(floor, time_target / (L * (U // tp))))
    return b, eval_curves(curves, grid, torch.full((L, U), b))


def row(name, curves, grid, tp, mean, floor, step):
    L, U, _ = curves.shape
    T_u = L * (U // tp) * mean
    uni = eval_curves(curves, grid, torch.full((L, U), mean))
    flat = curves.reshape(L * U, -1)
    opt_b = allocate(flat, grid, mean, "optimal", floor, step).view(L, U)
    ranks = [pl.place(opt_b[l].tolist(), tp, "balanced") for l in range(L)]
    t_opt = step_time(opt_b, ranks, (1.0, 0.0))
    opt = eval_curves(curves, grid, opt_b)
    b_same, same = uniform_at_time(curves, grid, tp, t_opt, floor)
    t0 = time.perf_counter()
    sol = solve(curves, grid, tp, mean, floor, step)
    secs = time.perf_counter() - t0
    imb = max(max(float(sol.budgets[l, r].sum()) for r in rr) / (float(sol.budgets[l].sum()) / tp)
              for l, rr in enumerate(sol.ranks))
    f = lambda r: f"{float(r.min()):.3f} / {float(r.mean()):.3f}"  # noqa: E731
    return (f"| {name} | {tp} | {U // tp} | {mean:.2f} | {f(uni)} | {t_opt / T_u:.3f} | {f(opt)} | "
            f"{b_same:.3f}: {f(same)} | {sol.step_time / T_u:.3f} | {f(sol.recovery)} | {imb:.3f} | "
            f"{float(sol.recovery.min()) / float(uni.min()):.2f}x | {secs:.2f} |")


def decode_timing(prof, floor, step, ctxs=(4096, 8192), batches=(1, 4), repeats=5) -> list[str]:
    """Ragged (attend_selected) vs padded attention over the same selections, summed over layers."""
    from attention_cpu import D, G, HKV, P, build_pool, decode_inputs

    from sglang_shplb.sparse_attention import _attend, attend_selected, head_buckets, select_decode_tokens

    curves = prof.curves("runtime", "kv", "sinkless")
    L, U, _ = curves.shape
    ref_pages = -(-prof.meta["context_lens"][0] // P)
    sets = {"uniform 0.10": torch.full((L, U), 0.1),
            "optimal 0.10": allocate(curves.reshape(L * U, -1), prof.grid, 0.1, "optimal", floor, step).view(L, U)}
    rows = ["| context | batch | budgets | layers split into buckets | padded ms (30 layers) | ragged ms "
            "| padded / ragged |",
            "|---|---|---|---|---|---|---|"]
    for ctx in ctxs:
        for bs in batches:
            k_buf, v_buf, r2t, kmin, kmax, fine = build_pool(bs, ctx)
            meta = decode_inputs(sel.DEFAULT_SELECTOR, fine)                # the default selector's metadata
            seq, idx = torch.full((bs,), ctx), torch.arange(bs)
            q = torch.randn(bs, HKV, G, D)
            for name, b in sets.items():
                # file vs --shplb-uniform-budget
                ref = sel.BudgetRef.of(b, ref_pages) if name.startswith("optimal") else None
                chosen = [select_decode_tokens(q, kmin, kmax, r2t, idx, seq, b[l], P, 1, 2, budget_ref=ref, **meta)
                          for l in range(L)]
                runs = {"padded": lambda: [_attend(q, k_buf, v_buf, c.rows, c.valid, D ** -0.5) for c in chosen],
                        "ragged": lambda: [attend_selected(q, k_buf, v_buf, c, D ** -0.5) for c in chosen]}
                ts = {k: [] for k in runs}
                for _ in range(repeats):          # interleaved: drift hits both alike
                    for k, fn in runs.items():
                        t = time.perf_counter()
                        fn()
                        ts[k].append(time.perf_counter() - t)
                p, r = (statistics.median(ts[k]) * 1e3 for k in ("padded", "ragged"))
                split = sum(len(head_buckets(c)) > 1 for c in chosen)   # 0: ragged runs the padded call itself
                rows.append(f"| {ctx} | {bs} | {name} | {split}/{L} | {p:.1f} | {r:.1f} | {p / r:.2f}x |")
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=str(PROFILE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true", help="predicted tables only (seconds)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "balance.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    prof = Profile.load(args.profile)
    meta = prof.meta
    ctx, page = meta["context_lens"][0], meta["page_size"]
    floor, step = (meta["sink_pages"] + meta["recent_pages"]) * page / ctx, page / ctx
    real = prof.curves("runtime", "kv", "sinkless").double()
    gen = torch.Generator().manual_seed(args.seed)
    rows = ["| model | tp | groups/rank | B | uniform worst / mean | optimal+place step time | optimal+place worst / "
            "mean | uniform@same time: B, worst / mean | joint step time | joint worst / mean | joint max/mean rank "
            "load | joint worst / uniform worst | solve s |", "|" + "---|" * 13]
    for name, (shape, tps) in SHAPES.items():
        curves = real if shape is None else resampled(real, *shape, gen)
        for tp in tps:
            for mean in BUDGETS:
                rows.append(row(name, curves, prof.grid, tp, mean, floor, step))
                print(rows[-1], flush=True)
    png = Path(args.out).with_name("balance_plan_tp3.png")
    with tempfile.TemporaryDirectory() as tmp:   # the plan report of SmolLM2 tp 3 at 10%, through the CLI
        plan_main(["--profile", args.profile, "--mean-budget", "0.1", "--tp", "3", "--out", f"{tmp}/plan.json",
                   "--report", str(png)])
    timing = [] if args.no_timing else ["", "## Ragged vs padded CPU decode attention (measured)", "",
                                        "Same selections, one SmolLM2 layer shape per layer budget row, all 30 layers, "
                                        "1 thread, medians of interleaved repeats. A layer not split into buckets "
                                        "runs exactly the padded call (the ratio there is the machine's noise: "
                                        "other engineers' servers shared the 2 cores).", "",
                                        *decode_timing(prof, floor, step)]
    text = "\n".join([
        "# Budgets at equal step time: uniform vs budget-then-place vs joint", "", __doc__.split("\n\n", 2)[2].strip(),
        "", f"Profile `{Path(args.profile).name}` (model {meta['model']}, context {meta['context_lens']}); "
        f"seed {args.seed}.", "", "Reproduce: `OMP_NUM_THREADS=1 python benchmark/balance.py`", "", machine_line(), "",
        "## Predicted (step time as a ratio to uniform-B at the same tp)", "", *rows, "",
        f"Plan report, SmolLM2 tp 3 at 10% (before: optimal + balanced; after: joint): [{png.name}]({png.name})",
        *timing, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
