"""Selector recall: which page ranking finds the pages the heads need, at equal pages read.

    python benchmark/selector.py [--contexts 2048 4096 8192] [--texts 2] [--budgets 0.02 0.05 0.1 0.2]
        [--needle-contexts 2048 4096] [--needle-seeds 10] [--selectors quest_sum quest_max ...]

Runs the real model (HF transformers, fp32) and calls the shipping selector (`selection.choose_pages`,
the rule the server, the profiler and the GPU kernels' reference use) on the captured queries/keys:
  * recall: on long corpus windows (several texts, offsets the profile's first window did not start at),
    for sampled query positions in every layer and KV group, the share of the group's true attention
    mass (mean over its query heads; sink page excluded: `sinkless`) in the pages each selector keeps,
    at equal pages per head (uniform budget b -> ceil(b * pages), >= sink + recent). `oracle` keeps the
    pages with the most true mass.
  * needle: RULER-style prompts (`ruler_tasks.py`, `--needle-families`, the server's completion form). The
    prompt runs dense (as prefill does without a prefill budget); dense greedy decoding up to the
    answer is the gold, teacher-forced with every answer step sparse in every layer (decode),
    per-KV-group budgets from the committed profile (`optimal` or `uniform` at a mean). Exact match:
    every gold token that spells the answer is the argmax (filler such as " the number" is not scored). Needle hit:
    on the KV groups that put >= 30% of their first-step mass on the needle's pages, the share where a needle page is
    selected. Dense must answer the task, else it is dropped.
  * cost: page-metadata bytes one (request, KV head) reads per decode step (fp32, D=64, P=16) and the
    selected KV bytes, at 8k context, against dense KV bytes.
Raw numbers go to --raw (JSON, resumable); the table to --out.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import LabelCalibration, kv_budgets, write_result  # noqa: E402
from ruler_tasks import FAMILIES  # noqa: E402

from sglang_shplb import recovery  # noqa: E402
from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb.models import prepare_corpus, prepare_model  # noqa: E402

SINK, RECENT = 1, 2
NEEDLE_MASS = 0.3
NEEDLE_FAMILIES = ["single_needle", "multi_key"]   # needle forms by default (ruler_tasks.FAMILIES has more)
DECISION = (ROOT / "benchmark" / "selector_decision.md").read_text().strip()   # the choice, with its numbers
S = sel.Selector
# The selectors this study compares: the two the server offers (selection.SELECTORS) and the variants that lost
# (selector_decision.md); only the winners are served.
STUDIED = {s.name: s for s in (
    S("quest_sum", "sum"), S("quest_max", "max"), S("quest_norm", "norm"), S("quest_psum", "psum"),
    S("two_stage4_psum", "psum", 4, 3.0), S("sub8_max", "max", 8), S("sub4_max", "max", 4),
    S("two_stage8", "max", 8, 3.0), S("two_stage_keys16", "max", None, 3.0, keys=16),
    S("two_stage_label16", "max", None, 3.0, keys=16, label=True),
    S("two_stage_label32", "max", None, 3.0, keys=32, label=True),
    S("two_stage_label32_psum", "psum", None, 3.0, keys=32, label=True),
    *sel.SELECTORS.values(),
)}


def studied(name: str) -> sel.Selector:
    if name not in STUDIED:
        raise SystemExit(f"unknown selector {name!r}; choose from {sorted(STUDIED)}")
    return STUDIED[name]


def page_mass_of(probs: torch.Tensor, P: int) -> torch.Tensor:
    n = -(-probs.shape[-1] // P)
    return torch.nn.functional.pad(probs, (0, n * P - probs.shape[-1])).unflatten(-1, (n, P)).sum(-1)


def chosen_by(name: str, q, k, group_mass, n_pages, k_pages, P, channels=None, seq_lens=None):
    """Pages [..., K] a selector keeps. q [Hkv, S, G, D], k [Hkv, L, D], group_mass [Hkv, S, N];
    channels [Hkv, r]: a label selector's calibrated channels in this layer; seq_lens [Hkv, S] each query's
    context (the keys after it in its page are not its own)."""
    if name == "oracle":
        return sel.top_pages(group_mass, n_pages, int(k_pages.max()), SINK, RECENT)
    s = studied(name)
    kmin, kmax = sel.page_minmax(k, P)
    fine = recovery.stage2_inputs(s, k, P, channels)                               # each [Hkv, N, X, D]

    def fine_meta(idx):                                                        # idx [Hkv, S, C]
        h = torch.arange(idx.shape[0]).view(-1, 1, 1)
        return tuple(t[h, idx] for t in fine)
    return sel.choose_pages(s, q, kmin.unsqueeze(1), kmax.unsqueeze(1), fine_meta, n_pages, k_pages, SINK, RECENT,
                            None if channels is None else channels.unsqueeze(1), seq_lens)


class Probe:
    """HF attention function: dense attention, plus recall statistics (mode 'recall') or sparse answer
    steps (mode 'needle': queries of a cached-prefix forward attend only to the selected pages)."""

    def __init__(self, P, selectors, budgets, n_queries=16):
        self.P, self.selectors, self.budgets, self.n_queries = P, selectors, budgets, n_queries
        self.mode, self.stats = "dense", {}
        self.layer_budgets = None  # [layers, Hkv] for needle mode
        self.budget_ref = None     # where the needle budgets were made (selection.pages_for_budget)
        self.selector = None
        self.needle_pages = None
        self.hits = []
        self.calibration = None    # common.LabelCalibration while mode is 'calibrate'
        self.channels = {}         # label selector name -> {layer: [Hkv, r]}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        scale = scaling or module.scaling
        if self.mode == "recall":
            self.recall(module.layer_idx, query[0], key[0], scale)
        if self.mode == "calibrate":
            self.calibration.add(module.layer_idx, query[0], key[0])
        if query.shape[2] != key.shape[2]:  # cached answer steps (sdpa's is_causal would misalign them)
            return self.sparse(module.layer_idx, query[0], key[0], value[0], scale), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    @torch.no_grad()
    def recall(self, layer, q, k, scale):
        Hq, L, D = q.shape
        Hkv, P = k.shape[0], self.P
        pos = torch.linspace(L // 2, L - 1, self.n_queries).long().unique()
        qs = q[:, pos].float().view(Hkv, Hq // Hkv, len(pos), D)
        logits = torch.einsum("hgsd,hld->hgsl", qs, k.float()) * scale
        logits.masked_fill_(torch.arange(L) > pos[:, None], float("-inf"))
        gm = page_mass_of(logits.softmax(-1), P).mean(1)                          # [Hkv, S, N]
        sink = gm[..., :SINK].sum(-1)
        n_pages = (pos // P + 1).expand(Hkv, -1)
        qg = qs.transpose(1, 2)                                                    # [Hkv, S, G, D]
        for b in self.budgets:
            kp = sel.pages_for_budget(torch.tensor(b), n_pages, SINK + RECENT)
            for name in self.selectors:
                ch = self.channels.get(name, {}).get(layer)
                chosen = chosen_by(name, qg, k.float(), gm, n_pages, kp, P, ch, (pos + 1).expand(Hkv, -1))
                kept = recovery.kept_mass(gm, chosen, kp)
                rec = ((kept - sink) / (1 - sink).clamp(min=1e-6)).clamp(0, 1)
                self.stats.setdefault((name, b), []).append(rec.flatten())

    @torch.no_grad()
    def sparse(self, layer, q, k, v, scale):
        """q [Hq, A, D] answer steps at absolute positions L-A..L-1 over k/v [Hkv, L, D]."""
        Hq, A, D = q.shape
        Hkv, L, P = k.shape[0], k.shape[1], self.P
        G = Hq // Hkv
        pos = torch.arange(L - A, L)
        qg = q.float().view(Hkv, G, A, D)
        logits = torch.einsum("hgad,hld->hgal", qg, k.float()) * scale
        causal = torch.arange(L) <= pos[:, None]                                   # [A, L]
        logits.masked_fill_(~causal, float("-inf"))
        if self.selector is None:
            out = torch.einsum("hgal,hld->hgad", logits.softmax(-1), v.float())
            return out.reshape(Hq, A, -1).transpose(0, 1).unsqueeze(0).to(q.dtype)
        gm = page_mass_of(logits.softmax(-1), P).mean(1)                           # [Hkv, A, N]
        n_pages = (pos // P + 1).expand(Hkv, -1)
        kp = sel.pages_for_budget(self.layer_budgets[layer].view(Hkv, 1).double(), n_pages.double(), SINK + RECENT,
                                  self.budget_ref)
        chosen = chosen_by(self.selector, qg.transpose(1, 2), k.float(), gm, n_pages, kp, P,
                           self.channels.get(self.selector, {}).get(layer), (pos + 1).expand(Hkv, -1))  # [Hkv, A, K]
        keep = torch.arange(chosen.shape[-1]) < kp.unsqueeze(-1)
        pages = torch.zeros(Hkv, A, gm.shape[-1], dtype=torch.bool).scatter(-1, chosen, keep)
        tok = pages.repeat_interleave(P, -1)[..., :L] & causal                     # [Hkv, A, L]
        logits = logits.masked_fill(~tok.unsqueeze(1), float("-inf"))
        if self.needle_pages is not None:  # first answer step: is a needle page kept where it matters?
            nm = gm[:, 0, self.needle_pages].sum(-1)                               # [Hkv]
            hit = pages[:, 0, self.needle_pages].any(-1)
            self.hits += [bool(h) for h, m in zip(hit, nm) if m >= NEEDLE_MASS]
        out = torch.einsum("hgal,hld->hgad", logits.softmax(-1), v.float())
        return out.reshape(Hq, A, -1).transpose(0, 1).unsqueeze(0).to(q.dtype)


def windows(tok, ctx, n_texts):
    """One window per text, from the middle of each corpus text (long enough)."""
    out = []
    for f in sorted(prepare_corpus().glob("*.txt")):
        ids = tok(f.read_text(errors="replace")).input_ids
        if len(ids) >= ctx + 1000:
            s = (len(ids) - ctx) // 2 + 137
            out.append((f.name, torch.tensor(ids[s: s + ctx])))
    return out[:n_texts]


def run_recall(model, tok, probe, args, raw):
    for ctx in args.contexts:
        key = f"recall/{ctx}/{args.texts}/{args.queries}"
        done = raw.setdefault(key, {})
        todo = [n for n in args.selectors + ["oracle"] if any(f"{n}@{b}" not in done for b in args.budgets)]
        if not todo:
            continue
        probe.selectors, probe.stats, probe.mode = todo, {}, "recall"
        t = time.time()
        for name, ids in windows(tok, ctx, args.texts):
            with torch.no_grad():
                model.model(ids[None], use_cache=False)
        probe.mode = "dense"
        for (name, b), v in probe.stats.items():
            v = torch.cat(v)
            done[f"{name}@{b}"] = {"mean": float(v.mean()), "p10": float(v.quantile(0.1))}
        print(f"recall {ctx}: {time.time() - t:.0f}s", flush=True)
        Path(args.raw).write_text(json.dumps(raw, indent=1))


def needle_tasks(tok, ctx, seeds, families=NEEDLE_FAMILIES):
    from retrieval import LEVELS, corpus_pieces
    from ruler_tasks import make_task

    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    pieces = corpus_pieces()
    return [make_task(fam, lvl, pieces, count, ctx, 1000 + s)
            for fam in families for s in range(seeds) for lvl in [LEVELS[fam]]]


def encode(tok, task, P):
    """(prompt ids, pages holding the asked needle) of a task in the server's completion form."""
    prompt = task.prompt(tok)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    needle = [n for n in task.needles if task.answers[0] in n][0]
    a = prompt.index(needle)
    toks = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < a + len(needle) and e > a]
    return torch.tensor(enc.input_ids), sorted({t // P for t in toks})


def dense_answer(model, tok, task, prompt, cache, max_new=16):
    """Dense greedy continuation up to the token completing the last answer (the teacher-forced gold) and
    the indices of its tokens that spell the answers (the ones exact match checks), or None when dense
    does not answer (max_new tokens per answer). Leaves the prompt in `cache`."""
    with torch.no_grad():
        nxt = model(prompt[None], past_key_values=cache, use_cache=True).logits[0, -1].argmax()
        out = [int(nxt)]
        while not all(a in tok.decode(out) for a in task.answers) and len(out) < max_new * len(task.answers):
            nxt = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1].argmax()
            out.append(int(nxt))
    cache.crop(prompt.shape[0])
    text = tok.decode(out)
    if task.score(text) != 1:
        return None
    ends = [len(tok.decode(out[: i + 1])) for i in range(len(out))]
    starts = [0] + ends[:-1]
    spans = [(text.index(ans), text.index(ans) + len(ans)) for ans in task.answers]
    spell = [i for i in range(len(out)) if any(starts[i] < e and ends[i] > a for a, e in spans)]
    return torch.tensor(out), torch.tensor(spell)


def needle_key(args, ctx):
    fams = "" if args.needle_families == NEEDLE_FAMILIES else "/" + "+".join(args.needle_families)
    return f"needle/{ctx}/{args.needle_seeds}{fams}"


def run_needle(model, tok, probe, args, raw):
    from transformers import DynamicCache

    configs = [(m, b) for m in args.needle_methods for b in args.needle_means]
    for ctx in args.needle_contexts:
        tasks = needle_tasks(tok, ctx, args.needle_seeds, args.needle_families)
        key = needle_key(args, ctx)
        done = raw.setdefault(key, {})
        for ti, task in enumerate(tasks):
            tkey = f"{task.family}/{task.seed}"
            rows = done.setdefault(tkey, {})
            todo = [(m, b, s) for m, b in configs for s in args.selectors + ["oracle"] if f"{s}/{m}@{b}" not in rows]
            if not todo and "dense" in rows:
                continue
            prompt, needle_pages = encode(tok, task, probe.P)
            probe.mode, probe.selector = "needle", None
            cache = DynamicCache()
            L0 = prompt.shape[0]
            gold = dense_answer(model, tok, task, prompt, cache)
            if gold is None:
                rows["dense"] = False
                print(f"needle {ctx} {ti + 1}/{len(tasks)} {tkey}: dense misses the answer", flush=True)
                continue
            answer, spell = gold

            def answer_run():  # the answer's tokens: the first comes from the (dense) prompt pass
                with torch.no_grad():
                    out = model(answer[None, :-1], past_key_values=cache, use_cache=True).logits[0].argmax(-1)
                cache.crop(L0)
                pred = torch.cat([answer[:1], out])
                return bool((pred[spell] == answer[spell]).all())
            rows["dense"] = answer_run()
            for m, b, s in todo:
                if not rows["dense"]:
                    break
                body = kv_budgets(m, b)
                probe.layer_budgets = torch.tensor(body["budgets"])
                probe.budget_ref = sel.BudgetRef.of(probe.layer_budgets, -(-body["context_len"] // probe.P))
                probe.selector, probe.needle_pages, probe.hits = s, needle_pages, []
                em = answer_run()
                rows[f"{s}/{m}@{b}"] = {"em": em, "hits": probe.hits}
                probe.selector = None
            probe.needle_pages = None
            print(f"needle {ctx} {ti + 1}/{len(tasks)} {tkey} dense={rows['dense']}", flush=True)
            Path(args.raw).write_text(json.dumps(raw, indent=1))


def cost_rows(selectors, budgets, ctx=8192, P=16, D=64):
    N = ctx // P
    dense = 2 * ctx * D * 4
    rows = ["| selector | budget | metadata bytes / step | selected KV bytes | total vs dense KV |",
            "|---|---|---|---|---|"]
    for b in budgets:
        k = int(sel.pages_for_budget(torch.tensor(b), torch.tensor(N), SINK + RECENT))
        for name in selectors:
            meta = studied(name).metadata_bytes(N, k, P, D)
            kv = 2 * k * P * D * 4
            rows.append(f"| {name} | {b:.2f} | {meta / 1024:.1f} KiB | {kv / 1024:.1f} KiB | "
                        f"{(meta + kv) / dense:.3f} |")
    return rows


def write_tables(args, raw):
    names = args.selectors + ["oracle"]
    rows = ["## Recall of the oracle's attention mass (sinkless, mean over layers, groups, queries; p10 in brackets)",
            "", "| context | budget | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for ctx in args.contexts:
        d = raw.get(f"recall/{ctx}/{args.texts}/{args.queries}", {})
        for b in args.budgets:
            cells = [f"{d[f'{n}@{b}']['mean']:.3f} ({d[f'{n}@{b}']['p10']:.2f})" if f"{n}@{b}" in d else "—"
                     for n in names]
            rows.append(f"| {ctx} | {b:.2f} | " + " | ".join(cells) + " |")
    rows += ["", "## Needle: teacher-forced exact match (needle-page hit rate on retrieval groups)", "",
             "| context | budgets | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for ctx in args.needle_contexts:
        d = raw.get(needle_key(args, ctx), {})
        kept = [t for t in d.values() if t.get("dense")]
        for m in args.needle_methods:
            for b in args.needle_means:
                cells = []
                for n in names:
                    r = [t[f"{n}/{m}@{b}"] for t in kept if f"{n}/{m}@{b}" in t]
                    hits = [h for x in r for h in x["hits"]]
                    rate = f"{sum(hits) / len(hits):.2f}" if hits else "—"   # no group over NEEDLE_MASS: no rate
                    cells.append(f"{sum(x['em'] for x in r)}/{len(r)} ({rate})" if r else "—")
                rows.append(f"| {ctx} ({len(kept)}/{len(d)} dense-solved) | {m}@{b} | " + " | ".join(cells) + " |")
    rows += ["", "## Cost per decode step and KV head at 8k (fp32 metadata; page 16, D 64)", "",
             *cost_rows(args.selectors, args.budgets)]
    from plots import line_plot

    ctx = max((c for c in args.contexts if f"recall/{c}/{args.texts}/{args.queries}" in raw), default=None)
    if ctx:
        d = raw[f"recall/{ctx}/{args.texts}/{args.queries}"]
        line_plot(Path(args.out).with_suffix(".png"),
                  {n: [(b, d[f"{n}@{b}"]["mean"]) for b in args.budgets if f"{n}@{b}" in d] for n in names},
                  "budget (fraction of pages per head)", "sinkless recall of the group's attention mass",
                  f"SmolLM2-135M, {ctx} tokens, page {args.page_size}", hline=None)
    write_result(args.out, "Selector recall, needle retrieval and cost at equal pages read",
                 "SmolLM2-135M fp32 (HF transformers), shipping `selection.choose_pages`. See the script's "
                 "docstring for the definitions. Raw: " + Path(args.raw).name + ".\n\n" + DECISION, rows,
                 "python benchmark/selector.py " + " ".join(sys.argv[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096, 8192])
    p.add_argument("--texts", type=int, default=2)
    p.add_argument("--queries", type=int, default=16, help="sampled query positions per window and layer")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--selectors", nargs="+", default=list(STUDIED), choices=sorted(STUDIED),
                   help="selectors compared (label ones calibrate on common.LabelCalibration)")
    p.add_argument("--needle-contexts", type=int, nargs="*", default=[2048, 4096])
    p.add_argument("--needle-seeds", type=int, default=10)
    p.add_argument("--needle-methods", nargs="+", default=["optimal", "uniform"])
    p.add_argument("--needle-families", nargs="+", default=NEEDLE_FAMILIES, choices=sorted(FAMILIES),
                   help="task forms of the needle prompts (multi-answer forms score every answer's tokens)")
    p.add_argument("--needle-means", type=float, nargs="+", default=[0.1])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmark/results/selector.md"))
    p.add_argument("--raw", default=str(ROOT / "benchmark/results/selector.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tables-only", action="store_true", help="rewrite --out from --raw without measuring")
    args = p.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    raw = json.loads(Path(args.raw).read_text()) if Path(args.raw).exists() else {}
    raw = raw if raw.get("page_size") == args.page_size else {"page_size": args.page_size}
    if args.tables_only:
        return write_tables(args, raw)
    probe = Probe(args.page_size, args.selectors, args.budgets, args.queries)
    AttentionInterface.register("shplb_selector", probe)
    model_dir = prepare_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="shplb_selector").eval()
    labels = [n for n in args.selectors if STUDIED[n].label]
    if labels:   # calibrate the label channels on a held-out text first
        probe.mode, probe.calibration = "calibrate", LabelCalibration()
        with torch.no_grad():
            model.model(torch.tensor(probe.calibration.ids(tok))[None], use_cache=False)
        probe.channels = {n: probe.calibration.channels(STUDIED[n].keys) for n in labels}
        probe.mode = "dense"
    run_recall(model, tok, probe, args, raw)
    run_needle(model, tok, probe, args, raw)
    write_tables(args, raw)


if __name__ == "__main__":
    main()
