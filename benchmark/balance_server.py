"""Does the plan predict what the ranks read? A real `--tp 3` server with the joint plan, KV tokens
read per rank and layer from its Prometheus gauge vs the plan's rank loads.

    OMP_NUM_THREADS=1 python benchmark/balance_server.py [--mean-budget 0.1] [--prompt-tokens 4000]
        [--new-tokens 16] [--out benchmark/results/balance_server.md]

Steps (all shipping code): `plan --profile P --mean-budget B --tp 3 --model M` (joint solver),
`launch_server --tp 3 --shplb-plan plan.json --enable-metrics`, one greedy request of
--prompt-tokens corpus tokens plus --new-tokens generated, gauge read before and after.
Predicted tokens per (rank, layer) = sum over decode steps of the rank's budgets x context (the
plan's linear cost model, what rank_load is proportional to); 'page rule' adds the runtime's
rounding (ceil to whole pages, sink+recent floor), the only thing the plan leaves out. Errors are
|measured - predicted| / predicted; 'share' compares each rank's share of its layer's reads;
'step time' is the sum over layers of the most-read rank, measured vs predicted. Decode steps:
--new-tokens - 1 (the first token comes from prefill), at context prompt + 1, prompt + 2, ...
"""
import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import PROFILE, machine_line  # noqa: E402
from harness import Server  # noqa: E402
from sglang_shplb import selection as sel  # noqa: E402

GAUGE = re.compile(r'^sglang:shplb_kv_tokens_read\{(?P<labels>[^}]*)\}\s+(?P<v>\S+)', re.M)


def gauge(url) -> dict:
    out = {}
    for m in GAUGE.finditer(requests.get(f"{url}/metrics", timeout=60).text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        out[(int(lab["tp_rank"]), int(lab["layer"]))] = float(m["v"])
    return out


def prompt_ids(model, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from sglang_shplb.models import corpus_files

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok((corpus_files()[0]).read_text(errors="replace")).input_ids
    return ids[1000:1000 + n]


def predicted(plan: dict, seq_lens: list[int], page_rule: bool) -> torch.Tensor:
    """[tp, layers] KV tokens each rank reads over decode steps of the given sequence lengths."""
    P, floor = plan["page_size"], plan["sink_pages"] + plan["recent_pages"]
    # where the budgets were made, as the server's selection.pages_for_budget takes it (serving.resolve)
    every = torch.tensor([b for x in plan["layers"] for rank in x["rank_budgets"] for b in rank], dtype=torch.float64)
    ref = sel.BudgetRef.of(every, math.ceil(plan["context_len"] / P))
    out = torch.zeros(plan["tp_size"], plan["num_layers"], dtype=torch.float64)
    for l, x in enumerate(plan["layers"]):
        for r, budgets in enumerate(x["rank_budgets"]):
            for b in budgets:
                for s in seq_lens:
                    if page_rule:   # the server's rule, at the context the budgets were made at
                        n = math.ceil(s / P)
                        k = int(sel.pages_for_budget(torch.tensor(b, dtype=torch.float64), torch.tensor(float(n)),
                                                     floor, ref))
                        # pages are whole except the last (current) page, always selected
                        out[r, l] += k * P - (n * P - s)
                    else:
                        out[r, l] += b * s
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mean-budget", type=float, default=0.1)
    p.add_argument("--prompt-tokens", type=int, default=4000)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmark/results/balance_server.md"))
    p.add_argument("--raw", help="also write the measured and predicted reads per rank and layer (JSON) here")
    args = p.parse_args()
    from sglang_shplb.models import prepare_model

    model = str(prepare_model())
    tmp = Path(tempfile.mkdtemp(prefix="balance_server_"))
    plan_path = tmp / "plan.json"
    subprocess.run([sys.executable, "-m", "sglang_shplb.plan", "--profile", str(PROFILE), "--mean-budget",
                    str(args.mean_budget), "--tp", "3", "--model", model, "--out", str(plan_path)], check=True)
    plan = json.loads(plan_path.read_text())
    ids = prompt_ids(model, args.prompt_tokens)
    srv = Server(["--model-path", model, "--dtype", "float32", "--tp", "3", "--shplb-plan", str(plan_path),
                  "--enable-metrics"], tmp / "server.log")
    try:
        t0 = time.time()
        srv.wait_ready(900)
        before = gauge(srv.url)
        r = requests.post(f"{srv.url}/generate", json={"input_ids": ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}}, timeout=1800)
        r.raise_for_status()
        time.sleep(2)
        after = gauge(srv.url)
        wall = time.time() - t0
    finally:
        srv.stop()
    tp, L = plan["tp_size"], plan["num_layers"]
    measured = torch.tensor([[after.get((r, l), 0.0) - before.get((r, l), 0.0) for l in range(L)] for r in range(tp)],
                            dtype=torch.float64)
    # decode steps: the first generated token comes from prefill; each later one is one decode step
    seq = [len(ids) + i for i in range(1, args.new_tokens)]
    lin, rule = predicted(plan, seq, False), predicted(plan, seq, True)
    plan_load = torch.tensor([x["rank_load"] for x in plan["layers"]], dtype=torch.float64).T   # [tp, L]

    def err(pred):
        return float(((measured - pred).abs() / pred).max())

    share_m = measured / measured.sum(0, keepdim=True)
    share_p = plan_load / plan_load.sum(0, keepdim=True)
    imb = (measured.max(0).values / measured.mean(0))
    rows = ["| quantity | value |", "|---|---|",
            f"| decode steps (assumed: new tokens - 1) | {len(seq)} |",
            f"| measured KV tokens read, all ranks and layers | {measured.sum():.0f} |",
            f"| predicted by the plan's linear model (budget x context) | {lin.sum():.0f} |",
            f"| max error per (rank, layer), linear model | {err(lin):.2%} |",
            f"| max error per (rank, layer), plan + page rounding rule | {err(rule):.2%} |",
            f"| step time (sum over layers of the max rank reads): measured / linear prediction - 1 | "
            f"{float(measured.max(0).values.sum() / lin.max(0).values.sum()) - 1:+.2%} |",
            f"| max error of a rank's share of its layer's reads vs rank_load share | "
            f"{float((share_m - share_p).abs().max()):.4f} |",
            "| measured max/mean rank reads per layer: worst, mean | "
            f"{float(imb.max()):.4f}, {float(imb.mean()):.4f} |",
            "| plan's predicted max/mean rank load per layer: worst | "
            f"{max(x['imbalance'] for x in plan['layers']):.4f} |",
            f"| server wall time (start + request) | {wall:.0f} s |"]
    per_layer = ["| layer | " + " | ".join(f"rank {r} measured / plan-linear" for r in range(tp)) + " |",
                 "|---|" + "---|" * tp]
    for l in range(L):
        per_layer.append(f"| {l} | " + " | ".join(f"{measured[r, l]:.0f} / {lin[r, l]:.0f}" for r in range(tp)) + " |")
    text = "\n".join(["# Plan vs server: KV tokens read per rank and layer (tp 3, joint plan)", "",
                      __doc__.split("\n\n", 2)[2].strip(), "",
                      f"Joint plan at mean {args.mean_budget}, tp 3 (summary: step time "
                      f"{plan['summary']['step_time_ratio']:.3f}x uniform); prompt {len(ids)} tokens, "
                      f"{args.new_tokens} new tokens.", "",
                      "Reproduce: `OMP_NUM_THREADS=1 python benchmark/balance_server.py`", "", machine_line(), "",
                      *rows, "", *per_layer, ""])
    Path(args.out).write_text(text)
    if args.raw:   # the tensors behind the per-layer table, only when asked (the report links the .md only)
        Path(args.raw).write_text(json.dumps(
            {"measured": measured.tolist(), "linear": lin.tolist(), "page_rule": rule.tolist(), "seq_lens": seq}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
