"""What `make serve` serves: the default recipe at tp 1 and tp 3, solved as the launcher solves it.

    python benchmark/served_recipe.py [--contexts 2048 4096 8192] [--out benchmark/results/served_recipe.md]

For each tp: the recipe's one-line description (the launcher's start-up line), the share of the KV a decode step
reads at each context (the shipping page-count rule, `selection.pages_for_budget`, floors included: mean over
heads, the least and the most any head reads), the prefill budgets' mean, and, for tp 3, the plan's balance: the
slowest rank's predicted work over the mean rank's per layer (1.00: every rank waits for no other), its
predicted step time against uniform budgets at the same mean, and the predicted recovery of the worst head.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import write_result  # noqa: E402


def reads(rank, ctx: int, cfg) -> torch.Tensor:
    """Share of the KV each of this rank's KV heads reads per decode step at a context of `ctx` tokens."""
    from sglang_shplb import selection as sel

    P = cfg.page_size
    n = torch.tensor(float(-(-ctx // P)))
    k = sel.pages_for_budget(rank.decode.double(), n, cfg.sink_pages + cfg.recent_pages, rank.budget_ref(P))
    return (k.double() / n).flatten()


def recipe_rows(tp: int, contexts: list[int], model: Path) -> tuple[list[str], str, dict | None]:
    import json

    from sglang_shplb.artifacts import model_fingerprint, model_shape
    from sglang_shplb.config import ShplbConfig
    from sglang_shplb.recipe import DEFAULT_MEAN_BUDGET, COMMITTED_PROFILES, solve
    from sglang_shplb.serving import resolve

    shape, fp = model_shape(model), model_fingerprint(model)
    recipe = solve(COMMITTED_PROFILES[0], DEFAULT_MEAN_BUDGET, tp, fp, shape["head_dim"])
    cfg = ShplbConfig(**{recipe.kind: str(recipe.path)})
    L, Hkv = shape["num_hidden_layers"], shape["num_key_value_heads"]
    ranks = [resolve(cfg, L, Hkv, tp, r, fp) for r in range(tp)]
    body = json.loads(recipe.path.read_text())
    cells = []
    for ctx in contexts:
        share = torch.cat([reads(r, ctx, cfg) for r in ranks])
        cells.append(f"{share.mean():.1%} ({share.min():.1%}–{share.max():.1%})")
    prefill = torch.cat([r.prefill.double().flatten() for r in ranks if r.prefill is not None])
    row = f"| {tp} | {recipe.kind} | {recipe.mean:g} | {' | '.join(cells)} | {prefill.mean():.3f} |"
    return [row], recipe.describe().split("; artifact ")[0], body if recipe.kind == "plan" else None


def balance_rows(plan: dict) -> list[str]:
    imb = [lay["imbalance"] for lay in plan["layers"]]
    s = plan["summary"]
    return ["| layers | slowest / mean rank, worst layer | mean over layers | predicted step time / uniform's "
            "| worst head's predicted recovery | mean recovery |", "|---|---|---|---|---|---|",
            f"| {len(imb)} | {max(imb):.3f} | {sum(imb) / len(imb):.3f} | {s['step_time_ratio']:.3f} | "
            f"{s['worst_recovery']:.3f} | {s['mean_recovery']:.3f} |"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--out", default=str(ROOT / "benchmark/results/served_recipe.md"))
    args = p.parse_args()
    from sglang_shplb.models import prepare_model

    model = Path(prepare_model())
    rows = ["| tp | artifact | mean budget | " + " | ".join(f"decode reads at {c} (heads)" for c in args.contexts)
            + " | prefill budget, mean |", "|---|---|---|" + "---|" * len(args.contexts) + "---|"]
    lines, plan = [], None
    for tp in (1, 3):
        r, line, body = recipe_rows(tp, args.contexts, model)
        rows += r
        lines.append(f"- tp {tp}: {line}")
        plan = body or plan
    write_result(args.out, "What `make serve` serves: the default recipe",
                 "The launcher's start-up line per tp:\n\n" + "\n".join(lines),
                 [*rows, "", *balance_rows(plan)], "python benchmark/served_recipe.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
