"""Quality under sparsity: perplexity and top-1 agreement with dense, per budget method.

    python benchmark/quality.py [--contexts 2048 4096] [--means 0.02 0.05 0.1 0.2] [--windows 1]
    python benchmark/quality.py --selector prefill --contexts 4096 8192 --means 0.1 0.2 \
        --methods uniform optimal --out benchmark/results/quality_prefill.md

Runs the real model (HF transformers, fp32) over corpus windows where every query position
attends only to the pages our decode selector would pick for it: `selection.choose_pages` with
`--decode-selector` (default the server's default), sink + recent pages always, then the group's
top-k pages with k from its budget (the same code the server runs). Budgets:
uniform (Quest-style), shift (the paper), optimal (ours) from the committed profile, at equal
mean. The windows are taken from `--text` at token offset 20000: lcet10.txt by default, a text the profile
also read (at other offsets), so that measures in-distribution transfer; `--text pydoc` is a held-out
text (common.HELD_OUT, CPython's language reference: another genre, never seen by the profile).
Reports next-token perplexity, top-1 agreement with dense, and the decode selector's recall: the share of
each KV group's true attention mass outside the sink page that its kept pages hold (mean over its query
heads and the window's second half), as the mean and the worst over all layers and groups; and a PNG
(perplexity ratio vs mean budget).
`bubbles` is optimal plus fill-bubbles of a tp-3 plan (its real mean, above the nominal one, is
in the table). `--selector prefill` applies the sparse-prefill selector instead (query blocks of
64 against the sink, the diagonal window and top-k pages; `sglang_shplb.sparse_prefill`): what a
server with `--shplb-uniform-prefill-budget` computes for a prompt. The retrieval half is retrieval.py.
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
from common import (BUDGET_METHODS, PROFILE, TEXTS, LabelCalibration, corpus_text, kv_budgets, mean_of,  # noqa: E402
                    write_result)
from plots import line_plot  # noqa: E402

from sglang_shplb import recovery  # noqa: E402
from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb import sparse_prefill as sp  # noqa: E402
from sglang_shplb.budget import default_floor_pages  # noqa: E402
from sglang_shplb.models import prepare_model  # noqa: E402
from sglang_shplb.profile import Profile  # noqa: E402

# `optimal-total`: optimal on the paper's total-mass recovery, to show what the sinkless metric buys.
METHODS = (*BUDGET_METHODS, "optimal-total")
Q_CHUNK = 512  # queries per attention chunk: bounds memory at [Hq, chunk, L]


class SparseAttention:
    """An HF attention function that applies per-KV-group page selection at every query."""

    def __init__(self, page_size, sink, recent, selector="decode", decode_selector=sel.DEFAULT_SELECTOR):
        self.P, self.sink, self.recent, self.selector = page_size, sink, recent, selector
        self.decode_selector = decode_selector
        self.budgets = None  # [layers, Hkv] or None for dense
        self.budget_ref = None  # where the budgets were made (selection.pages_for_budget)
        self.prefill_estimate = sp.DEFAULT_ESTIMATE
        self.prefill_dense_tail = sp.DENSE_TAIL  # the prompt's last queries that attend densely (as served)
        self.prefill_budgets = None  # "prefill" selector: [layers, Hkv] prompt budgets (None: self.budgets)
        self.answer_from = None  # "prefill" selector: rows from here decode (sparse decode budgets), as served
        self.calibration = None  # common.LabelCalibration while calibrating a label selector's channels
        self.channels = {}       # {layer: [Hkv, r]} label channels of a label selector (calibrate_labels)
        self.recall = None       # {layer: (sum over rows of recall [Hkv], rows)} while measuring (add_recall)
        self.layer = 0

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.budgets is None:
            if self.calibration is not None:
                self.calibration.add(module.layer_idx, query[0], key[0])
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        q, k, v, layer, scale = query[0], key[0], value[0], module.layer_idx, scaling or module.scaling
        self.layer = layer
        if self.selector == "decode":
            out = self.attend(q, k, v, self.budgets[layer], scale)
        else:
            pf = self.budgets if self.prefill_budgets is None else self.prefill_budgets
            n = q.shape[1] if self.answer_from is None else self.answer_from   # the prompt, as the server prefills it
            out = torch.empty_like(q)
            est = self.estimate_of(layer)   # "dense" (harness only): this layer prefills with every page
            b = torch.ones_like(pf[layer]) if est == "dense" else pf[layer]
            out[:, :n] = self.attend_prefill(q[:, :n], k[:, :n], v[:, :n], b, scale,
                                             sp.DEFAULT_ESTIMATE if est == "dense" else est)
            if self.answer_from is not None:   # the server decodes the answer: per-query decode selection
                s = self.answer_from
                out[:, s:] = self.attend(q, k, v, self.budgets[layer], scale, start=s)[:, s:]
        return out.transpose(0, 1).unsqueeze(0), None  # HF wants [B, L, H, D]

    def estimate_of(self, layer: int) -> str:
        """`prefill_estimate` is NAME, or NAME@A-B: NAME in layers A..B, the served default elsewhere
        (NAME "dense": those layers prefill densely)."""
        name, _, span = self.prefill_estimate.partition("@")
        if not span:
            return name
        a, b = map(int, span.split("-"))
        return name if a <= layer <= b else sp.DEFAULT_ESTIMATE

    def attend_prefill(self, q, k, v, budgets, scale, estimate=sp.DEFAULT_ESTIMATE):
        """The server's sparse-prefill path on one whole prompt (prefix 0): the answer's rows are not there
        (their queries would join the last block's estimate, their keys its page metadata)."""
        Hq, L, D = q.shape
        Hkv, P = k.shape[0], self.P
        qb = q.view(Hkv, Hq // Hkv, L, D).permute(2, 0, 1, 3)                      # [L, Hkv, G, D]
        lo, hi = sel.page_minmax(k, P)
        chosen = sp.select_prefill_pages(qb, lo, hi, 0, budgets, P, self.sink, self.recent, estimate=estimate,
                                         keys=k, scale=scale, dense_tail=self.prefill_dense_tail)
        pad = lo.shape[1] * P - L
        pages = [torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(1, (-1, P)) for x in (k, v)]
        out = sp.attend_blocks(qb, *pages, chosen, 0, scale)                       # [L, Hkv, G, D]
        return out.permute(1, 2, 0, 3).reshape(Hq, L, -1)

    def page_mask(self, q, k, budgets, scale, start=0):
        """[Hkv, L, N]: pages selected for each query position (causal) from `start` on, by the shipping
        rule (`oracle`: the pages with the most true attention mass of the group, same forced pages)."""
        Hkv, L = k.shape[0], k.shape[1]
        P = self.P
        oracle = self.decode_selector == "oracle"
        rule = sel.Selector("quest_max", "max") if oracle else sel.get_selector(self.decode_selector)
        kmin, kmax = sel.page_minmax(k, P)                                        # [Hkv, N, D]
        fine = recovery.stage2_inputs(rule, k, P, self.channels.get(self.layer))       # each [Hkv, N, X, D]
        qg = q.view(Hkv, -1, L, q.shape[-1]).transpose(1, 2)                      # [Hkv, L, G, D]
        n_pages = torch.arange(L) // P + 1                                         # [L]
        k_pages = sel.pages_for_budget(budgets.view(Hkv, 1).double(), n_pages.view(1, L).double(),
                                       self.sink + self.recent, self.budget_ref)                   # [Hkv, L]
        mask = torch.zeros(Hkv, L, kmin.shape[1], dtype=torch.bool)
        heads = torch.arange(Hkv).view(-1, 1, 1)

        def fine_meta(idx):                                                        # [Hkv, c, C] logical pages
            return tuple(t[heads, idx] for t in fine)
        for s in range(start, L, Q_CHUNK):                                         # bounds the [Hkv, c, C, S, D] gather
            e = min(L, s + Q_CHUNK)
            n, kp = n_pages[s:e].expand(Hkv, -1), k_pages[:, s:e]
            if oracle:
                logits = torch.einsum("hcgd,hld->hgcl", qg[:, s:e], k) * scale
                logits = logits.masked_fill(torch.arange(L) > torch.arange(s, e).view(-1, 1), float("-inf"))
                probs = torch.nn.functional.pad(logits.softmax(-1), (0, kmin.shape[1] * P - L))
                mass = probs.unflatten(-1, (-1, P)).sum(-1).mean(1)                # [Hkv, c, N]
                top = sel.top_pages(mass, n, int(kp.max()), self.sink, self.recent)
            else:
                ch = self.channels.get(self.layer)                                 # [Hkv, r] label selectors
                top = sel.choose_pages(rule, qg[:, s:e], kmin.unsqueeze(1), kmax.unsqueeze(1), fine_meta, n, kp,
                                       self.sink, self.recent, None if ch is None else ch.unsqueeze(1),
                                       (torch.arange(s, e) + 1).expand(Hkv, -1))
            keep = torch.arange(top.shape[-1]).view(1, 1, -1) < kp.unsqueeze(-1)
            mask[:, s:e] = mask[:, s:e].scatter(-1, top, keep)
        return mask

    def attend(self, q, k, v, budgets, scale, start=0):
        """Rows from `start` on (the rows before are left unset)."""
        Hq, L, D = q.shape
        Hkv, G = k.shape[0], Hq // k.shape[0]
        pages = self.page_mask(q.float(), k.float(), budgets, scale, start)              # [Hkv, L, N]
        out = torch.empty_like(q)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        for s in range(start, L, Q_CHUNK):
            e = min(L, s + Q_CHUNK)
            tok = pages[:, s:e].repeat_interleave(self.P, -1)[..., :L] & causal[s:e]   # [Hkv, c, L]
            logits = torch.einsum("hgcd,hld->hgcl", q[:, s:e].view(Hkv, G, e - s, D), k) * scale
            if self.recall is not None and e > L // 2:
                self.add_recall(logits.masked_fill(~causal[s:e], float("-inf")).softmax(-1), tok, max(s, L // 2) - s)
            logits = logits.masked_fill(~tok.unsqueeze(1), float("-inf"))
            out[:, s:e] = torch.einsum("hgcl,hld->hgcd", logits.softmax(-1), v).reshape(Hq, e - s, D)
        return out

    def add_recall(self, probs, tok, first):
        """Sinkless recall of each KV group's true mass (probs [Hkv, G, c, L]) by its kept tokens (tok [Hkv, c, L]),
        summed over query heads and the chunk's rows from `first` on."""
        probs, tok = probs[:, :, first:], tok[:, first:]
        sink = probs[..., :self.sink * self.P].sum(-1)
        kept = (probs * tok.unsqueeze(1)).sum(-1)
        r = ((kept - sink) / (1 - sink).clamp(min=1e-9)).sum((1, 2))                  # [Hkv]
        total, n = self.recall.get(self.layer, (0, 0))
        self.recall[self.layer] = (total + r, n + probs.shape[1] * probs.shape[2])

    def recall_summary(self) -> dict:
        """Mean and worst recall over (layer, KV group) since `recall` was reset to {}."""
        r = torch.stack([t / n for t, n in self.recall.values()])
        return {"recall_mean": float(r.mean()), "recall_worst": float(r.min())}


def calibrate_labels(attn: SparseAttention, model, tokenizer, r: int) -> None:
    """Label channels per layer and KV head from a dense run over common.LabelCalibration's text."""
    attn.budgets, attn.calibration = None, LabelCalibration()
    evaluate(model, torch.tensor(attn.calibration.ids(tokenizer)))
    attn.channels, attn.calibration = attn.calibration.channels(r), None


def evaluate(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    return nll, logits.argmax(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--means", type=float, nargs="+", default=[0.02, 0.05, 0.10, 0.20])
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--text", choices=TEXTS, default="lcet10.txt",
                   help="text the windows are cut from (pydoc: held out, see common.HELD_OUT)")
    p.add_argument("--page-size", type=int, help="selection page size (default: the profile's)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--floor-pages", type=int, help="decode budgets: the fewest pages any KV group holds at the "
                   "profile's context (default: budget.default_floor_pages); rows are tagged METHOD+floorK (rows "
                   "without a floor in older raw files: sink + recent, the default before 2026-12-02)")
    p.add_argument("--selector", choices=("decode", "prefill"), default="decode")
    p.add_argument("--decode-selector", choices=[*sorted(sel.SELECTORS), "oracle"],
                   default=sel.DEFAULT_SELECTOR,
                   help="page ranking of the decode selector (the server's --shplb-selector; label selectors calibrate "
                   "their channels on common.LabelCalibration's text first)")
    p.add_argument("--label-source", choices=("profile", "calibration"), default="profile",
                   help="label channels of a label decode selector: the committed profile's (what the server reads "
                   "from the budgets), or calibrated on common.LabelCalibration's held-out text")
    p.add_argument("--prefill-estimate", default=sp.DEFAULT_ESTIMATE, choices=sp.ESTIMATES,
                   help="page estimate of --selector prefill (oracle: the true block page mass, a reference)")
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "quality.md"))
    p.add_argument("--raw", help="JSON of measured rows (default: --out with .json): reused, so runs resume and "
                   "accumulate; the table shows every row of this selector/page/windows in it")
    args = p.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    prof = Profile.load(PROFILE)
    page = args.page_size or prof.meta["page_size"]
    attn = SparseAttention(page, prof.meta["sink_pages"], prof.meta["recent_pages"], args.selector,
                           args.decode_selector)
    AttentionInterface.register("shplb_quality", attn)
    model_dir = prepare_model()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="shplb_quality").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tokenizer(corpus_text(args.text)).input_ids
    attn.prefill_estimate = args.prefill_estimate
    rule = sel.SELECTORS.get(args.decode_selector) if args.selector == "decode" else None
    rule = rule if rule is not None and rule.label else None
    label_r = rule.keys if rule is not None else 0
    if label_r and args.label_source == "profile":
        served = prof.label_channels("kv")
        attn.channels = {layer: served[layer, :, :label_r] for layer in range(served.shape[0])}
    elif label_r:
        calibrate_labels(attn, model, tokenizer, label_r)
    raw_path = Path(args.raw or Path(args.out).with_suffix(".json"))
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    tag = f"{args.selector}/page{page}/windows{args.windows}"
    # "prefill/": centre, the default until 2026-12
    if args.selector == "prefill" and args.prefill_estimate != "centre":
        tag = f"prefill-{args.prefill_estimate}/page{page}/windows{args.windows}"
    if args.selector == "decode":
        source = "+profile" if rule is not None and args.label_source == "profile" else ""
        tag = f"decode-{args.decode_selector}{source}/page{page}/windows{args.windows}"
    if args.text != "lcet10.txt":   # other texts' rows get their own tags (lcet10's keep the old ones)
        tag = tag.replace("/", f"@{args.text}/", 1)
    def label(meth, mean):   # rows name the floor their budgets were made with (uniform's has none)
        if args.floor_pages is not None:
            return f"{meth}+floor{args.floor_pages}"
        return meth if meth == "uniform" else f"{meth}+floor{default_floor_pages(prof.meta, mean)}"
    for ctx in args.contexts:
        todo = [(m, label(meth, m)) for m in args.means for meth in args.methods
                if f"{tag}/{ctx}/{m}/{label(meth, m)}" not in raw]
        if not todo:
            continue
        windows = [torch.tensor(text_ids[o: o + ctx]) for o in range(20000, 20000 + args.windows * ctx, ctx)]
        attn.budgets = None
        dense = [evaluate(model, w) for w in windows]
        raw[f"{tag}/{ctx}/1.0/dense"] = {"ppl": math.exp(torch.cat([n for n, _ in dense]).mean()),
                                         "agree": 1.0, "real_mean": 1.0}
        for mean, method in todo:
            base = method.split("+floor")[0]
            body = kv_budgets(base.split("-")[0], mean, "total" if base.endswith("-total") else "sinkless",
                              phase=args.selector, floor_pages=args.floor_pages)
            attn.budgets = torch.tensor(body["budgets"])
            attn.budget_ref = sel.BudgetRef.of(attn.budgets, -(-body["context_len"] // page))
            attn.recall = {} if args.selector == "decode" else None
            t = time.time()
            res = [evaluate(model, w) for w in windows]
            raw[f"{tag}/{ctx}/{mean}/{method}"] = {
                "ppl": math.exp(torch.cat([n for n, _ in res]).mean()), "real_mean": mean_of(body),
                "agree": float(torch.cat([(a == d).float() for (_, a), (_, d) in zip(res, dense)]).mean()),
                **(attn.recall_summary() if attn.recall else {})}
            attn.recall = None
            raw_path.write_text(json.dumps(raw, indent=1))  # resumable: a killed run loses one row at most
            print(ctx, mean, method, raw[f"{tag}/{ctx}/{mean}/{method}"], f"({time.time() - t:.0f}s)", flush=True)
    write_table(args, raw, tag, page)


def write_table(args, raw: dict, tag: str, page: int) -> None:
    """One table over every row of this phase/page/windows in the raw file; decode rows of every
    decode selector side by side (the selector is part of the row's tag)."""
    rows = ["| selector | context | mean budget | method | real mean | perplexity | vs dense | top-1 agreement | "
            "recall mean / worst |", "|---|---|---|---|---|---|---|---|---|"]
    series = {}
    suffix = "/" + tag.split("/", 1)[1]
    tags = sorted({k.split("/")[0] for k in raw if k.split("/")[0].startswith(args.selector)
                   and k.startswith(k.split("/")[0] + suffix + "/")}) or [tag.split("/")[0]]
    for t in tags:
        keys = sorted((k.split("/")[3:] for k in raw if k.startswith(t + suffix + "/")),
                      key=lambda x: (int(x[0]), float(x[1]) if x[2] != "dense" else -1,
                                     METHODS.index(x[2].split("+")[0]) if x[2].split("+")[0] in METHODS else -1,
                                     x[2]))
        for ctx, mean, method in keys:
            r, d = raw[f"{t}{suffix}/{ctx}/{mean}/{method}"], raw[f"{t}{suffix}/{ctx}/1.0/dense"]
            rows.append(f"| {t} | {ctx} | {float(mean):.2f} | {method} | {r['real_mean']:.3f} | {r['ppl']:.3f} | "
                        f"{r['ppl'] / d['ppl']:.3f} | {r['agree']:.3f} | " + (f"{r['recall_mean']:.3f} / "
                        f"{r['recall_worst']:.3f} |" if "recall_mean" in r else "— |"))
            if method != "dense":
                series.setdefault(f"{t} {method} ({ctx})", []).append((float(mean), r["ppl"] / d["ppl"]))
    line_plot(Path(args.out).with_suffix(".png"), series, "nominal mean budget", "perplexity / dense",
              f"SmolLM2-135M, {args.selector} selector, page {page}", hline=1.0)
    what = ("the pages the decode selector picks" if args.selector == "decode" else
            "the pages the sparse-prefill selector picks for its 64-query block")
    write_result(args.out, f"Quality under {args.selector}-selector sparsity (perplexity, top-1 agreement)",
                 f"SmolLM2-135M fp32, {args.windows} window(s) of {args.text} per context; every query position "
                 f"attends only to {what} (page {page}, sink 1, recent 2). Budgets per KV group from the committed "
                 "profile (`real mean`: bubbles adds budget). Rows accumulate over runs in --raw (default: the "
                 "result file's name, .json).", rows,
                 "python benchmark/quality.py " + " ".join(without_raw(sys.argv[1:])))


def without_raw(argv: list[str]) -> list[str]:
    """The command line less its --raw PATH (a report's temporary file: not part of what to reproduce)."""
    return argv[:argv.index("--raw")] + argv[argv.index("--raw") + 2:] if "--raw" in argv else argv


if __name__ == "__main__":
    main()
