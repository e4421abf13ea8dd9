"""Recall of the block-sparse prefill selector: how much of each query block's true attention mass the
pages it keeps hold, per page estimate, at equal pages kept.

    OMP_NUM_THREADS=1 python benchmark/prefill_recall.py [--contexts 2048 4096 8192] [--budgets 0.05 0.1 0.2] \
        [--needles variable_track multi_value]

A dense HF forward (SmolLM2 fp32) records every layer's queries and keys; the shipping selection
(`sparse_prefill.select_prefill_pages`, uniform budget per KV head, no dense tail) then picks pages for every
64-query block, and `block_page_mass` (softmax per query, mean over the block and the group) scores
--blocks sampled blocks per layer in the second half of the window. Reported: the kept share of the mass
*outside* the forced pages (sinks and the diagonal window), the part the estimate decides. `oracle` fills
the same number of pages per (block, KV head) with the most true mass: the most any estimate can keep.
Texts: prose windows of alice29/asyoulik (the decode recall's texts), and RULER-style prompts
(--needles families, seeds 0..--seeds-1). The estimates that lost to centre (label-cache log-mass, Quest bounds)
are in git history with their results.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import PROFILE, write_result  # noqa: E402

from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb import sparse_prefill as sp  # noqa: E402
from sglang_shplb.models import prepare_corpus, prepare_model  # noqa: E402
from sglang_shplb.profile import Profile, token_windows  # noqa: E402

TEXTS = ("alice29.txt", "asyoulik.txt")


class Capture:
    """HF attention function: dense SDPA, recording each layer's q [Hq, L, D] and k [Hkv, L, D]."""

    def __init__(self):
        self.q, self.k = {}, {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.q[module.layer_idx], self.k[module.layer_idx] = query[0].detach(), key[0].detach()
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)


def layer_recall(q, k, scale, estimates, budgets, meta, n_blocks):
    """{(estimate, budget): (sum of recall over sampled blocks and heads, count)} for one layer."""
    Hq, L, D = q.shape
    Hkv, P, B = k.shape[0], meta["page_size"], sp.QUERY_BLOCK
    qb = q.view(Hkv, Hq // Hkv, L, D).permute(2, 0, 1, 3)                      # [L, Hkv, G, D]
    lo, hi = sel.page_minmax(k, P)
    nb, N = math.ceil(L / B), lo.shape[1]
    picks = torch.linspace(nb // 2, nb - 1, n_blocks).round().long().unique()
    first, _ = sp.block_positions(0, L, B)
    mass = sp.block_page_mass(sp.pad_blocks(qb, B)[picks], k, scale, first[picks], P)   # [s, Hkv, N]
    out, times = {}, {}
    j = torch.arange(N)
    for b in budgets:
        for est in estimates:
            t = time.perf_counter()
            # oracle: the same pages kept per (block, head) as any estimate, the most true mass can fill them
            chosen = sp.select_prefill_pages(qb, lo, hi, 0, torch.full((Hkv,), b), P, meta["sink_pages"],
                                             meta["recent_pages"], estimate="centre" if est == "oracle" else est,
                                             dense_tail=0)
            if est != "oracle":
                times[est] = times.get(est, 0) + time.perf_counter() - t
            win = (j >= chosen.win_lo[picks].view(-1, 1)) & (j <= chosen.win_hi[picks].view(-1, 1))   # [s, N]
            forced = (win | (j < meta["sink_pages"])).unsqueeze(1)                                    # [s, 1, N]
            free = mass.masked_fill(forced, 0)
            if est == "oracle":
                free_k = chosen.count[picks] - forced.sum(-1)                                       # [s, Hkv]
                top = free.sort(-1, descending=True).values
                kept_mass = (top * (torch.arange(N) < free_k.unsqueeze(-1))).sum(-1)
            else:
                kept = win.unsqueeze(1).expand(-1, Hkv, -1).clone()
                rest = chosen.rest[picks]
                kept.scatter_(-1, rest.clamp(min=0), (rest >= 0) | kept.gather(-1, rest.clamp(min=0)))
                kept_mass = (free * kept).sum(-1)
            total = free.sum(-1)
            ok = total > 1e-6
            rec = kept_mass[ok] / total[ok]
            s, c = out.get((est, b), (0.0, 0))
            out[(est, b)] = (s + float(rec.sum()), c + int(ok.sum()))
    return out, times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--estimates", nargs="+", default=list(sp.ESTIMATES), choices=sp.ESTIMATES)
    p.add_argument("--texts", type=int, default=2, help=f"prose windows per context (from {TEXTS})")
    p.add_argument("--needles", nargs="*", default=["variable_track", "multi_value"],
                   help="RULER-style task families whose prompts are measured too")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--blocks", type=int, default=6, help="sampled query blocks per layer")
    p.add_argument("--out", default=str(ROOT / "benchmark/results/prefill_recall.md"))
    args = p.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    meta = Profile.load(PROFILE).meta
    cap = Capture()
    AttentionInterface.register("shplb_prefill_recall", cap)
    md = prepare_model()
    tok = AutoTokenizer.from_pretrained(md)
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, attn_implementation="shplb_prefill_recall")
    model.eval()
    sources = []
    for ctx in args.contexts:
        for i in range(args.texts):
            text = TEXTS[i % len(TEXTS)]
            sources.append((f"prose {text.split('.')[0]}", ctx,
                            token_windows(tok, [prepare_corpus() / text], ctx, 1)[0]))
        if args.needles:
            from retrieval import LEVELS, corpus_pieces
            from ruler_tasks import make_task

            pieces = corpus_pieces()
            count = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
            for fam in args.needles:
                for seed in range(args.seeds):
                    task = make_task(fam, LEVELS[fam], pieces, count, ctx, seed)
                    prompt = task.prompt(tok)
                    sources.append((f"{fam} s{seed}", ctx,
                                    torch.tensor(tok(prompt, add_special_tokens=False).input_ids)))
    keys = [(e, b) for b in args.budgets for e in args.estimates]
    rows = ["| text | context | " + " | ".join(f"{e} @{b:g}" for e, b in keys) + " |", "|---|---|" + "---|" * len(keys)]
    totals, times = {}, {}
    for name, ctx, ids in sources:
        t0 = time.time()
        with torch.no_grad():
            model(ids[None])
        acc = {}
        for layer in sorted(cap.q):
            q, k = cap.q[layer].float(), cap.k[layer].float()
            res, tm = layer_recall(q, k, q.shape[-1] ** -0.5, args.estimates, args.budgets, meta, args.blocks)
            for key, (s, c) in res.items():
                a = acc.get(key, (0.0, 0))
                acc[key] = (a[0] + s, a[1] + c)
            for e, t in tm.items():
                times[e] = times.get(e, 0) + t
        rec = {key: s / max(c, 1) for key, (s, c) in acc.items()}
        for key, r in rec.items():
            totals.setdefault((name.split()[0], ctx, key), []).append(r)
        rows.append(f"| {name} | {ctx} | " + " | ".join(f"{rec[key]:.3f}" for key in keys) + " |")
        print(rows[-1], f"({time.time() - t0:.0f}s)", flush=True)
    for kind in sorted({k[0] for k in totals}):
        for ctx in args.contexts:
            rows.append(f"| **mean {kind}** | {ctx} | " + " | ".join(
                f"**{sum(totals[(kind, ctx, key)]) / len(totals[(kind, ctx, key)]):.3f}**" for key in keys) + " |")
    rows += ["", "Selection time, all layers and sources (s, this machine): "
             + ", ".join(f"{e} {t:.1f}" for e, t in times.items())]
    write_result(args.out, "Prefill selector recall: the kept share of each query block's attention mass",
                 "SmolLM2 fp32 (HF), one dense forward per text recording q and k; the shipping block selection "
                 "(`sparse_prefill.select_prefill_pages`, 64-query blocks, uniform budget per KV head, no dense tail) "
                 f"per estimate; {args.blocks} sampled blocks per layer in the window's second half. Recall = kept "
                 "share of the block's true page mass outside the forced pages (sinks + diagonal window), mean over "
                 "blocks, KV heads and layers. `oracle` fills the same page counts with the most true mass.", rows,
                 "OMP_NUM_THREADS=1 python benchmark/prefill_recall.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
