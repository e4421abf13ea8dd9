"""Decode attention on CPU: shplb sparse (the default recipe's budgets) vs SGLang's torch_native dense, side by side.

    OMP_NUM_THREADS=1 python benchmark/attention_cpu.py [--budget B] [--contexts 2048 4096 8192]

Budgets: the default recipe's per-head decode budgets (what `make serve` serves: `optimal` at the recipe's mean
from the committed profile, each layer's own; every one of the 30 layers is timed and the mean per layer
reported), or with --budget B one uniform budget (layer 0 timed). Shortlist selectors carry pages between steps
as served (carry.py), its cost included.

SmolLM2 shapes per layer (3 KV heads x 3 query heads, head_dim 64, fp32), a paged KV pool with
scrambled pages as SGLang's allocator leaves it. Dense is SGLang's own
TorchNativeAttnBackend._run_sdpa_forward_decode; sparse is our selection (`--selectors`, each with
its own metadata read, per-head top-k) plus attention over the selected tokens, as the server runs a layer:
on the step's `plan_decode` (page table, page counts, the ranking rule's pins and each layer's shortlist masks for
all 30 layers, made once per decode step), whose time is added divided by the model's 30 layers. Times are medians of
interleaved repeats; the ratio is what to read (this machine is shared and noisy).
"""
import argparse
import statistics
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb.carry import new_carry  # noqa: E402
from sglang_shplb.recipe import DEFAULT_MEAN_BUDGET  # noqa: E402
from sglang_shplb.sparse_attention import (attend_selected, fold_labels, new_label_cache,  # noqa: E402
                                           new_page_metadata, plan_decode, select_layer, update_page_minmax)

HKV, G, D, P = 3, 3, 64, 16
LAYERS = 30   # SmolLM2's layers: the server plans a decode step once (plan_decode) and every layer reuses it


def build_pool(bs, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages_per_req = ctx // P
    total = bs * pages_per_req
    perm = torch.randperm(total, generator=g)
    k_buf = torch.randn(total * P, HKV, D, generator=g)
    v_buf = torch.randn(total * P, HKV, D, generator=g)
    req_to_token = (perm.view(bs, pages_per_req, 1) * P + torch.arange(P)).view(bs, ctx).int()
    kmin, kmax = new_page_metadata(k_buf.shape[0], HKV, D, P, "cpu")
    update_page_minmax(kmin, kmax, torch.arange(k_buf.shape[0]), k_buf, P)
    fine = {}
    for sub in {s.sub for s in sel.SELECTORS.values() if s.sub}:   # sub-page metadata of every selector
        fine[sub] = new_page_metadata(k_buf.shape[0], HKV, D, sub, "cpu")
        update_page_minmax(*fine[sub], torch.arange(k_buf.shape[0]), k_buf, sub)
    for r in {s.keys for s in sel.SELECTORS.values() if s.label}:   # label caches (any fixed channels: timing)
        channels = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(HKV)])
        fine[("label", r)] = (new_label_cache(k_buf.shape[0], channels, P, k_buf.dtype, "cpu"), channels)
        fold_labels(*fine[("label", r)], torch.arange(k_buf.shape[0]), k_buf)
    return k_buf, v_buf, req_to_token, kmin, kmax, fine


def decode_inputs(name: str, fine: dict) -> dict:
    """select_decode_tokens' metadata arguments for selector `name` from build_pool's `fine`."""
    rule = sel.get_selector(name)
    return {"fine": fine.get(rule.sub), "labels": fine.get(("label", rule.keys)) if rule.label else None}


@cache
def recipe_budgets(mean: float = DEFAULT_MEAN_BUDGET) -> dict:
    """The default recipe's budgets body, as the launcher solves it from the committed profile (at another mean:
    the recipe's allocation at that mean, as `--shplb-mean-budget` would make it)."""
    from common import committed_profile

    from sglang_shplb.budget import make_budgets

    return make_budgets(committed_profile(), mean, "optimal", prefill_mean=mean)


def model_budgets(uniform: float | None, mean: float = DEFAULT_MEAN_BUDGET):
    """(budgets [LAYERS, HKV], their BudgetRef, the layers to time): the recipe's at `mean`, or one uniform budget."""
    if uniform is not None:
        return torch.full((LAYERS, HKV), uniform), None, [0]
    body = recipe_budgets(mean)
    b = torch.tensor(body["budgets"], dtype=torch.float64)
    return b, sel.BudgetRef.of(b, -(-body["context_len"] // P)), list(range(LAYERS))


def bytes_bound(ctx: int) -> float:
    """Dense / default bytes one decode step's attention reads at context ctx: e2e_serving's bytes-per-step model
    (K/V read plus the served selector's page metadata, fp32) without the weights. Per request, so any batch."""
    from e2e_serving import step_bytes

    from sglang_shplb.artifacts import write_json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "budgets.json"
        write_json(path, "budget", recipe_budgets())
        return step_bytes(None, 1, ctx, 0) / step_bytes(path, 1, ctx, 0)


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def column_runs(name, mean, args, bs, q, k_buf, v_buf, req_to_token, rows_idx, seq_lens, kmin, kmax, fine):
    """(plan, sparse, timed layers) of one column: selector `name` at the recipe's budgets at `mean` (or --budget).
    plan: the step's plan_decode with the selector's shortlist masks, made once per decode step; sparse: every timed
    layer as served, selecting on that plan (carrying pages) and attending."""
    budgets, ref, layers = model_budgets(args.budget, mean)   # the whole model's: the plan's work is per step
    carry = None if args.no_carry else new_carry(LAYERS, bs, HKV, "cpu")

    def plan():
        step = plan_decode(req_to_token, rows_idx, seq_lens, budgets, P, 1, 2, ref)
        step.ranks(0, sel.get_selector(name))
        return step

    step_plan = plan()

    def sparse():
        qg = q.view(bs, HKV, G, D)
        for layer in layers:
            chosen = select_layer(step_plan, layer, qg, kmin, kmax, req_to_token, P, 1, 2, name, k_buf=k_buf,
                                  carry=None if carry is None else carry[layer], **decode_inputs(name, fine))
            attend_selected(qg, k_buf, v_buf, chosen, D ** -0.5)
    return plan, sparse, layers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, help="one uniform budget instead of the default recipe's per-head ones")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--means", type=float, nargs="+", help="instead of --selectors: the default selector at the "
                   "recipe's per-head budgets at each of these means, one column each")
    p.add_argument("--no-carry", action="store_true", help="without carried pages (their cost, by difference)")
    p.add_argument("--selectors", nargs="+",
                   default=sorted(sel.SELECTORS),
                   choices=sorted(sel.SELECTORS), help="decode selectors timed side by side (selection cost included)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_cpu.md"))
    args = p.parse_args()
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    torch.set_num_threads(1)
    if args.means:   # one column per mean: the default selector at the recipe's allocation at that mean
        columns = [(f"{sel.DEFAULT_SELECTOR}@{m}", sel.DEFAULT_SELECTOR, m) for m in args.means]
    else:
        columns = [(n, n, DEFAULT_MEAN_BUDGET) for n in args.selectors]
    bound = args.budget is None and not args.means   # the bytes model reads the default recipe's budgets
    rows = ["| context | batch | dense ms | " + " | ".join(f"{c} ms | {c} speed-up" for c, *_ in columns)
            + " | bound × (bytes/step, default) |" * bound,
            "|---|---|---|" + "---|---|" * len(columns) + "---|" * bound]
    for ctx in args.contexts:
        for bs in args.batches:
            k_buf, v_buf, req_to_token, kmin, kmax, fine = build_pool(bs, ctx)
            seq_lens, rows_idx = torch.full((bs,), ctx), torch.arange(bs)
            q = torch.randn(bs, HKV * G, D)
            out = torch.empty_like(q)

            def dense():
                TorchNativeAttnBackend._run_sdpa_forward_decode(
                    None, q, out, k_buf, v_buf, req_to_token, rows_idx, seq_lens, scaling=D ** -0.5,
                    enable_gqa=True)

            runs = {c: column_runs(name, mean, args, bs, q, k_buf, v_buf, req_to_token, rows_idx, seq_lens, kmin,
                                   kmax, fine) for c, name, mean in columns}
            td, tp, ts = [], {c: [] for c in runs}, {c: [] for c in runs}
            for _ in range(3):  # interleave so drift hits all alike
                td += timed(dense, args.repeats // 3)
                for c, (plan, sparse, _) in runs.items():
                    tp[c] += timed(plan, args.repeats // 3)
                    ts[c] += timed(sparse, args.repeats // 3)
            d = statistics.median(td) * 1e3
            # a layer's selection and attention, plus its share of the step's plan
            ms = {c: statistics.median(ts[c]) * 1e3 / len(runs[c][2]) + statistics.median(tp[c]) * 1e3 / LAYERS
                  for c in runs}
            cells = [f"{ms[c]:.2f} | {d / ms[c]:.2f}x" for c in runs]
            rows.append(f"| {ctx} | {bs} | {d:.2f} | " + " | ".join(cells) + " |"
                        + f" {bytes_bound(ctx):.2f}x |" * bound)
            print(rows[-1], flush=True)
    what = (f"uniform budget {args.budget} (layer 0)" if args.budget else
            f"the default recipe's per-head budgets (optimal) at means {args.means}; mean over all {LAYERS} layers"
            if args.means else
            f"the default recipe's per-head budgets (mean {DEFAULT_MEAN_BUDGET}; mean over all {LAYERS} layers)")
    write_result(args.out, "Decode attention, CPU: shplb sparse vs torch_native dense",
                 f"SmolLM2 shapes, {what}, page {P}, sink 1 + recent 2 pages, "
                 f"{'no carried pages' if args.no_carry else 'carried pages (as served)'}, "
                 f"1 thread; shplb ms = a layer's selection and attention + 1/{LAYERS} of the step's plan "
                 "(plan_decode for all 30 layers with every timed selector's shortlist masks, made once per decode "
                 "step and shared by the model's layers). Bound: the bytes-per-step model's dense / default ratio "
                 "for attention (e2e_serving.step_bytes without the weights: K/V read plus the served selector's "
                 "page metadata), the speed-up reading alone would give against a dense kernel that reads each K/V "
                 "byte once; torch_native's dense first gathers the request's K/V into a copy "
                 "(`k_cache[per_req_tokens]`), so a measured ratio can exceed it. Goal: >= 4x at 8k.", rows,
                 "OMP_NUM_THREADS=1 python benchmark/attention_cpu.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
