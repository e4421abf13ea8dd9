"""Quality at equal step time (tp 3): perplexity and top-1 agreement with dense for
uniform@B, today's optimal@B (budget-then-place: more step time), uniform at optimal's step time,
and the joint plan@B (step time = uniform@B's).

    python benchmark/balance_quality.py [--mean-budget 0.1] [--contexts 2048 4096] [--windows 1]

The model runs through quality.py's harness (HF transformers fp32; every query position attends
only to the pages the decode selector picks with each KV group's budget: the server's selection
code). Not through the server: the retrieval benchmark through the server is not run here (CPU
time). Step time = sum over layers of the slowest rank's decode load at tp 3, as a ratio to
uniform@B's (plan.py's cost model). The joint budgets are the plan's `unit_budgets` in model head
order (the placement only moves heads between ranks; it does not change what a head computes).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import PROFILE, write_result  # noqa: E402
from quality import SparseAttention, evaluate  # noqa: E402

from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb.budget import make_budgets  # noqa: E402
from sglang_shplb.joint import make_joint_plan  # noqa: E402
from sglang_shplb.models import prepare_corpus, prepare_model  # noqa: E402
from sglang_shplb.plan import make_plan  # noqa: E402
from sglang_shplb.profile import Profile  # noqa: E402

TP = 3


def variants(prof, mean):
    """name -> (budgets [L][U], step time ratio vs uniform@mean at tp 3, worst predicted recovery)."""
    def placed(body):
        plan = make_plan(body, TP, "balanced", "kv", profile=prof)
        return [x["unit_budgets"] for x in plan["layers"]], plan["summary"]["step_time_ratio"] * (
            body["mean_budget"] / mean), plan["summary"]["worst_recovery"]

    out = {f"uniform@{mean:g}": placed(make_budgets(prof, mean, "uniform", "kv"))}
    opt = placed(make_budgets(prof, mean, "optimal", "kv"))
    out[f"optimal@{mean:g} (today)"] = opt
    same = round(mean * opt[1], 4)
    out[f"uniform@{same:g} (optimal's step time)"] = placed(make_budgets(prof, same, "uniform", "kv"))
    joint = make_joint_plan(prof, mean, TP, "kv")
    out[f"joint@{mean:g}"] = ([x["unit_budgets"] for x in joint["layers"]], joint["summary"]["step_time_ratio"],
                              joint["summary"]["worst_recovery"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mean-budget", type=float, default=0.1)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--only", nargs="+", help="measure only variants whose name starts with one of these (e.g. joint "
                   "uniform@0.1); rows measured before stay in the table (raw JSON beside --out)")
    p.add_argument("--out", default=str(ROOT / "benchmark/results/balance_quality.md"))
    args = p.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    attn = SparseAttention(prof.meta["page_size"], prof.meta["sink_pages"], prof.meta["recent_pages"], "decode")
    ref_pages = -(-prof.meta["context_lens"][0] // prof.meta["page_size"])   # budgets are fractions of it
    AttentionInterface.register("shplb_balance_quality", attn)
    model_dir = prepare_model()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="shplb_balance_quality").eval()
    ids = AutoTokenizer.from_pretrained(model_dir)((prepare_corpus() / "lcet10.txt").read_text()).input_ids
    sets = variants(prof, args.mean_budget)
    raw_path = Path(args.out).with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    rows = ["| context | variant | step time vs uniform@B (tp 3) | predicted worst recovery | perplexity | vs dense "
            "| top-1 agreement |", "|---|---|---|---|---|---|---|"]
    for ctx in args.contexts:
        windows = [torch.tensor(ids[o: o + ctx]) for o in range(20000, 20000 + args.windows * ctx, ctx)]
        todo = [n for n in sets if f"{ctx}/{args.windows}/{n}" not in raw
                and (not args.only or any(n.startswith(o) for o in args.only))]
        dense = None
        if todo:
            attn.budgets = None
            dense = [evaluate(model, w) for w in windows]
        for name, (budgets, ratio, worst) in sets.items():
            key = f"{ctx}/{args.windows}/{name}"
            if name in todo:
                d_ppl = math.exp(torch.cat([n for n, _ in dense]).mean())
                t = time.time()
                attn.budgets = torch.tensor(budgets)
                attn.budget_ref = sel.BudgetRef.of(attn.budgets, ref_pages)
                res = [evaluate(model, w) for w in windows]
                raw[key] = {"ppl": math.exp(torch.cat([n for n, _ in res]).mean()), "dense_ppl": d_ppl,
                            "agree": float(torch.cat([(a == d).float() for (_, a), (_, d) in zip(res, dense)]).mean())}
                raw_path.write_text(json.dumps(raw, indent=1))
                print(ctx, name, raw[key], f"({time.time() - t:.0f}s)", flush=True)
            if key not in raw:
                continue
            r = raw[key]
            d_ppl = r["dense_ppl"]
            rows.append(f"| {ctx} | {name} | {ratio:.3f} | {worst:.3f} | {r['ppl']:.3f} | {r['ppl'] / d_ppl:.4f} | "
                        f"{r['agree']:.3f} |")
    write_result(args.out, "Quality at equal step time (tp 3): uniform vs optimal vs joint",
                 __doc__.split("\n\n", 2)[2].strip() + f"\n\n{args.windows} window(s) of lcet10.txt per context "
                 "(in the profile's calibration corpus: in-distribution).", rows,
                 f"python benchmark/balance_quality.py --mean-budget {args.mean_budget} --contexts "
                 f"{' '.join(map(str, args.contexts))} --windows {args.windows}  # rows missing below were not run yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
