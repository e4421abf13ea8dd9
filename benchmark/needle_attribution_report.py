"""Tables from needle_attribution.py --diagnose dumps (teacher-forced, served default selector).

Step s feeds dense's answer token s and should predict token s+1; for the needle's digits the token to copy
sits at prompt position needle_pos[s] (its "source page"). For every (step, layer, KV head) where the needle's
pages hold at least --min-share of the group's sink-less mass, it prints: that share, k, the shortlist length
3k, the source page's oracle rank (true group mass, sink excluded from the count), its coarse rank (page
bound, max over the group: the shortlist's order), its second-stage rank (label log-sum-exp, normalised per
head: '-' = not shortlisted), selected or not, selected at the previous step, the neighbour pages'
selection, the sink-less recall of the group's mass, and top-p (pages for 90% of the sink-less mass).
Then per failing (layer, head) the per-query-head view: true mass share and page-bound rank of each query head.

    .venv/bin/python benchmark/needle_attribution_report.py /tmp/issue33/attr/diag_doc2.pt [--min-share 0.3]
"""
import argparse
import math

import torch


def rank_of(scores, j, exclude=()):
    """0-based rank of entry j in descending order (ties to the lower index), `exclude` not counted."""
    s = scores.clone().float()
    for e in exclude:
        s[e] = float("-inf")
    v = s[j]
    return int((s > v).sum() + (s[:j] == v).sum())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dump")
    p.add_argument("--min-share", type=float, default=0.3)
    a = p.parse_args()
    d = torch.load(a.dump, weights_only=False)
    res, recs = d["res"], d["records"]
    P = 16
    npos = res["needle_pos"]
    needle_pages = sorted({x // P for x in npos} | {(npos[-1] + 1) // P})
    print(f"doc {res['doc']} value {res['value']}: digits at {npos[0]}..{npos[-1]}, pages {needle_pages}; "
          f"teacher-forced sparse (1 = dense's token) {res['teacher'].get('sparse')}; greedy {res['greedy']}")
    print()
    print("| step (predicts) | layer | kv | needle share of sinkless mass | k | 3k | src page | oracle rank | "
          "coarse rank | 2nd-stage rank | selected | prev step | nbr -1/+1 selected | sinkless recall | top-p 90% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    prev_mask = {}
    fails = []
    for r in sorted(recs, key=lambda x: (x["step"], x["layer"])):
        if "mask" not in r:
            continue
        s, layer = r["step"], r["layer"]
        mass, mask, k = r["mass"], r["mask"], r["k"]
        Hkv, N = mass.shape
        src = (npos[s] if s < len(npos) else npos[-1] + 1) // P
        for h in range(Hkv):
            m = mass[h].clone()
            sinkless = m.clone()
            sinkless[0] = 0
            tot = float(sinkless.sum())
            share = float(sinkless[needle_pages].sum()) / max(tot, 1e-12)
            if share >= a.min_share:
                kk = int(k[h])
                orank = rank_of(sinkless, src, exclude=(0, N - 1, N - 2))
                crank = int(r["crank"][h, src])
                fs = r["fscore"][h]
                listed = not (math.isnan(float(fs[src])) or math.isinf(float(fs[src])))
                frank = rank_of(torch.nan_to_num(fs, nan=float("-inf")), src) if listed else "-"
                sel_ = bool(mask[h, src])
                pm = prev_mask.get((layer, h))
                prev = "-" if pm is None else ("yes" if pm[src] else "no")
                nb = "/".join(("yes" if mask[h, j] else "no") if 0 <= j < N else "·" for j in (src - 1, src + 1))
                recall = float(sinkless[mask[h]].sum()) / max(tot, 1e-12)
                cs = sinkless.sort(descending=True).values.cumsum(0) / max(tot, 1e-12)
                p90 = int((cs < 0.9).sum()) + 1
                tokname = res["gold"][s + 1] if s + 1 < len(res["gold"]) else None
                print(f"| {s} ({tokname}) | {layer} | {h} | {share:.3f} | {kk} | {3 * kk} | {src} | {orank} | "
                      f"{crank} | {frank} | {'**no**' if not sel_ else 'yes'} | {prev} | {nb} | {recall:.3f} | {p90} |")
                if not sel_:
                    fails.append((s, layer, h, r, src))
            prev_mask[(layer, h)] = mask[h].clone()
    print()
    for s, layer, h, r, src in fails:
        hb, hm, qn = r["head_bound"][h], r["head_mass"][h], r["qnorm"][h]
        N = hb.shape[-1]
        parts = []
        for g in range(hb.shape[0]):
            sl = hm[g].clone()
            sl[0] = 0
            parts.append(f"q{g}: |q| {float(qn[g]):.1f}, src-page share {float(sl[src] / sl.sum()):.3f}, "
                         f"bound rank {rank_of(hb[g], src, exclude=(0, N - 1, N - 2))}, bound {float(hb[g, src]):.1f} "
                         f"vs max {float(hb[g].max()):.1f}")
        print(f"step {s} layer {layer} kv {h} src page {src}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
