"""Issue 33, item 2: why does sparse decode lose a needle's later digits? In-process attribution (HF fp32).

Reads lm-eval's logged RULER samples (the exact prompt strings the server got), or builds retrieval.py's prompts
(`--tasks`, scored as retrieval.py scores them), prefills each prompt densely (decode-only sparsity, as
`--shplb-budgets` without prefill budgets serves it), then decodes the answer token by token with an HF attention
function that, for every decode query, picks each KV group's pages with the package's own rule
(`selection.choose_pages`, the default selector `two_stage_label32_norm`, label channels and per-head budgets from a
budgets file, `selection.pages_for_budget` with the file's BudgetRef) and attends over those pages only. Diagnostics
per decode step, layer and KV head: the group's true page mass (dense softmax, mean over the group's query heads),
the oracle's pages at the same k, the selector's pages, the recall of mass, and where the needle's pages rank.

Modes:
  --teacher: teacher-forced on dense greedy's answer; reports per step whether sparse argmax == dense token.
  --greedy:  free-running greedy with the variant (what the server would answer).
Variants (`--variants`), all on the same prompts:
  dense, sparse (served default), oracle (true group mass, same k), sparse-Lx (sparse only in layers x..y),
  plus fixes applied inside this script only (the package is not edited):
  nbr: every selected free page also brings its right neighbour (j+1), up to the context;
  nbrM: only the top-M selected free pages (selector order) bring their neighbours j-1 and j+1;
  persistM: the M pages with the most attention weight (exact weights over the selected pages, computed
            anyway) at the previous decode step stay selected (TidalDecode-style position persistence);
  carryM: the served path's carried pages (carry.py, seeded as carry_seed seeds them after the prefill) at M pages
          per (layer, KV head); carry2 is what the server runs, `sparse` carries none;
  shortC: the default selector with a first-stage shortlist of C * k pages (served C = 3): more label rows read,
          the same pages attended;
  plusM: the selector's top k+M pages (same extra read as the fixes: the control);
  gateM: `sparse`, but a step whose top-1 logit leads the second by less than M is decoded again densely (the
         cache cropped back first): a margin-gated dense fallback; its reads count the fallback's whole context;
  VARIANT@M: the variant at the default allocation's budgets at mean M (optimal, committed profile), not --budgets';
  otopP: oracle top-p (Twilight's mass-adaptive budget, its upper bound): each step, layer and KV group reads
         the fewest pages whose true mass reaches P (sink and recent pages counted first); k varies per step.
  etopP: estimated top-p (Twilight with the served selector's own estimate): the served order over its whole
         shortlist, read to the fewest pages whose label-estimated mass reaches P, never fewer than `sparse`'s k;
         etopPfree: the same with no floor but the forced pages; etopPkeys: the estimate (and the shortlist's
         order) from the full keys, exact over the shortlist: the bound of a better second stage.

    OMP_NUM_THREADS=1 .venv/bin/python benchmark/needle_attribution.py --samples S.jsonl --docs 0 3 \
        --budgets dec10.json --variants dense sparse oracle persist8 nbr4 plus8 --greedy --teacher
"""
import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmark")]

from sglang_shplb import recovery  # noqa: E402
from sglang_shplb import selection as sel  # noqa: E402
from sglang_shplb.carry_seed import SeedPlan, seed  # noqa: E402
from sglang_shplb.models import prepare_model  # noqa: E402


class Attr:
    """HF attention function: dense for prompt rows, per-head page selection for decode rows."""

    def __init__(self, P, sink, recent, budgets, ref, channels, n_prompt):
        self.P, self.sink, self.recent = P, sink, recent
        self.budgets, self.ref, self.channels, self.n_prompt = budgets, ref, channels, n_prompt
        self.variant = "dense"
        self.sparse_layers = None       # None: all layers; else a set
        self.record = None              # list to append per-(step, layer) diagnostics to
        self.carry = {}                 # persistM: layer -> [Hkv, M] pages carried from the previous step
        self.step = 0
        self.reads = []                 # (layer, Hkv) tokens read per decode step
        self.kept = []                  # (layer, Hkv) true group mass of the pages read, per decode step
        self.at_mean = {}               # VARIANT@M: mean -> (budgets, BudgetRef) of the default allocation at M
        self.last_q = {}                # layer -> [Hq, D] the prompt's last query (carryM's seed)

    # ---------------------------------------------------------------------------------------------
    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        layer = module.layer_idx
        Lq, Lk = query.shape[2], key.shape[2]
        sparse_here = self.variant != "dense" and (self.sparse_layers is None or layer in self.sparse_layers)
        if Lq > 1 or Lk <= self.n_prompt or not sparse_here:
            if Lq > 1:
                self.last_q[layer] = query[0, :, -1]       # carryM's seed (carry_seed: the prompt's last query)
                return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
            out, probs = self.decode_dense(query[0], key[0], value[0], scaling or module.scaling)
            if self.record is not None and Lk > self.n_prompt:
                self.diagnose(layer, query[0], key[0], probs, None, None)
            return out, None
        return self.decode_sparse(layer, query[0], key[0], value[0], scaling or module.scaling), None

    def decode_dense(self, q, k, v, scale):
        Hq, Hkv = q.shape[0], k.shape[0]
        G = Hq // Hkv
        logits = torch.einsum("hgd,hld->hgl", q.float().view(Hkv, G, -1), k.float()) * scale
        probs = logits.softmax(-1)
        out = torch.einsum("hgl,hld->hgd", probs, v.float()).reshape(1, 1, Hq, -1)
        return out.to(q.dtype), probs

    def decode_sparse(self, layer, q, k, v, scale):
        Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
        G, L, P = Hq // Hkv, k.shape[1], self.P
        qg = q.float().view(Hkv, 1, G, D)                                     # [Hkv, 1(row), G, D]
        n_pages = torch.full((Hkv, 1), (L - 1) // P + 1)
        seq = torch.full((Hkv, 1), L)
        v_name, budgets, ref = self.budgets_of(self.variant)
        kp = sel.pages_for_budget(budgets[layer].view(Hkv, 1).double(), n_pages.double(),
                                  self.sink + self.recent, ref)                # [Hkv, 1]
        logits = torch.einsum("hgd,hld->hgl", qg[:, 0], k.float()) * scale      # [Hkv, G, L]
        probs = logits.softmax(-1)
        N = int(n_pages.max())
        mass = torch.nn.functional.pad(probs, (0, N * P - L)).unflatten(-1, (N, P)).sum(-1).mean(1)  # [Hkv, N]
        extra, listed_pages = 0, None
        if v_name.startswith("plus"):
            extra = int(v_name[4:])
            kp = torch.minimum(kp + extra, n_pages)
        if v_name == "oracle":
            chosen = sel.top_pages(mass.view(Hkv, 1, N), n_pages, int(kp.max()), self.sink, self.recent)
        elif v_name.startswith("otop"):   # oracle top-p: each step's fewest pages holding mass p (forced ones first)
            forced = sel.is_forced(torch.arange(N), n_pages, self.sink, self.recent)             # [Hkv, N]
            order = mass.masked_fill(forced, float("inf")).sort(-1, descending=True).indices    # [Hkv, N]
            held = mass.gather(-1, order).cumsum(-1)
            kp = ((held < float(v_name[4:])).sum(-1, keepdim=True) + 1).clamp(max=N)
            kp = torch.maximum(kp, forced.sum(-1, keepdim=True))
            chosen = order.unsqueeze(1)
        elif v_name.startswith("etop"):   # estimated top-p: the served order, cut where the labels' mass reaches p
            chosen, kp, listed_pages = self.estimated_top_p(layer, qg, k, n_pages, kp, seq, v_name[4:])
        elif v_name == "labelall":   # diagnostic: the default's second stage on every page (no page-bound shortlist)
            rule = sel.Selector("label32_norm_all", "norm", None, 0.0, keys=32, label=True)
            chosen = self.choose(layer, qg, k, n_pages, kp, seq, rule=rule)
        elif v_name.startswith("short"):  # the default selector with a shortlist of c * k pages (served: c = 3)
            rule = dataclasses.replace(sel.get_selector(self.selector), name=v_name, shortlist=float(v_name[5:]))
            chosen = self.choose(layer, qg, k, n_pages, kp, seq, rule=rule)
        elif v_name.startswith("carry"):  # the served path: carried pages promoted into the shortlist (carry.py)
            chosen = self.choose(layer, qg, k, n_pages, kp, seq, self.carried(layer, int(v_name[5:]), k))
        else:
            chosen = self.choose(layer, qg, k, n_pages, kp, seq)                 # [Hkv, 1, K]
        keep = torch.arange(chosen.shape[-1]).view(1, 1, -1) < kp.unsqueeze(-1)
        mask = torch.zeros(Hkv, 1, N, dtype=torch.bool).scatter(-1, chosen, keep)[:, 0]   # [Hkv, N]
        base = mask.clone()
        if v_name == "nbr" or (v_name.startswith("nbr") and v_name[3:].isdigit()):
            m = int(v_name[3:]) if v_name[3:] else None
            free = [[int(j) for j, ok in zip(chosen[h, 0], keep[h, 0]) if ok and not
                     sel.is_forced(j, n_pages[h, 0], self.sink, self.recent)] for h in range(Hkv)]
            for h in range(Hkv):
                top = free[h] if m is None else free[h][:m]
                for j in top:
                    for nb in ((j + 1,) if m is None else (j - 1, j + 1)):
                        if 0 <= nb < N:
                            mask[h, nb] = True
        if v_name.startswith("persistlab"):   # carry the previous step's best second-stage (label) pages: no extra pass
            m = int(v_name[10:])
            rule = sel.get_selector(self.selector)
            if self.carry.get(layer) is not None:                                # carried pages are read too
                for h in range(Hkv):
                    mask[h, self.carry[layer][h][self.carry[layer][h] < N]] = True
            idx = torch.arange(N).expand(Hkv, 1, N)
            lab = recovery.stage2_inputs(rule, k.float(), P, self.channels[layer])
            heads = torch.arange(Hkv).view(-1, 1, 1)
            # label score, selected pages
            fs = sel.second_stage(rule, self.channels[layer].unsqueeze(1), seq)(
                rule, qg, idx, tuple(t[heads, idx] for t in lab), mask.unsqueeze(1))[:, 0]
            forced = sel.is_forced(torch.arange(N), n_pages, self.sink, self.recent)
            fs = fs.masked_fill(forced | ~mask, float("-inf"))
            cur = fs.topk(min(m, N), -1).indices
        if v_name.startswith("persist"):
            prev = self.carry.get(layer)
            if prev is not None:
                for h in range(Hkv):
                    mask[h, prev[h][prev[h] < N]] = True
        tok = mask.repeat_interleave(P, -1)[:, :L]                              # [Hkv, L]
        sl = logits.masked_fill(~tok.unsqueeze(1), float("-inf")).softmax(-1)    # [Hkv, G, L]
        if v_name.startswith("persistlab"):
            self.carry[layer] = cur
        elif v_name.startswith("persist"):                                    # pages with the most weight now
            m = int(v_name[7:])
            w = torch.nn.functional.pad(sl, (0, N * P - L)).unflatten(-1, (N, P)).sum(-1).mean(1)   # [Hkv, N]
            forced = sel.is_forced(torch.arange(N), n_pages, self.sink, self.recent)               # [Hkv, N]
            self.carry[layer] = w.masked_fill(forced, -1).topk(min(m, N), -1).indices
        self.reads.append((layer, (mask.sum(-1) * P).tolist()))
        listed_mass = (mass * listed_pages).sum(-1).tolist() if v_name.startswith("etop") else None
        self.kept.append((layer, (mass * mask).sum(-1).tolist(), listed_mass))   # true group mass read, listed
        out = torch.einsum("hgl,hld->hgd", sl, v.float()).reshape(1, 1, Hq, -1).to(q.dtype)
        if self.record is not None:
            self.diagnose(layer, q, k, probs, mask, base, kp, qg, n_pages, seq)
        return out

    def choose(self, layer, qg, k, n_pages, kp, seq, carry=None, rule=None):
        """The served selection (`choose_pages`) of this layer's pages; `rule`: another Selector than --selector."""
        rule = rule or sel.get_selector(self.selector)
        Hkv = k.shape[0]
        kmin, kmax = sel.page_minmax(k.float(), self.P)
        fine = recovery.stage2_inputs(rule, k.float(), self.P, self.channels[layer])
        heads = torch.arange(Hkv).view(-1, 1, 1)

        def fine_meta(idx):
            return tuple(t[heads, idx] for t in fine)
        return sel.choose_pages(rule, qg, kmin.unsqueeze(1), kmax.unsqueeze(1), fine_meta, n_pages, kp,
                                self.sink, self.recent, self.channels[layer].unsqueeze(1), seq, carry=carry)

    def carried(self, layer, m, k):
        """carryM: this layer's [Hkv, 1, m] carried pages, seeded at the first decode step by the server's own
        carry_seed.seed over the prompt (its last query, the label cache of every prompt page, one request row);
        choose_pages then updates them in place each step. carry2 is what the server runs (carry.CARRIED_PAGES)."""
        if layer not in self.carry:
            rule, P, n = sel.get_selector(self.selector), self.P, self.n_prompt
            Hkv, D = k.shape[0], k.shape[-1]
            N = -(-n // P)
            channels = self.channels[layer][:, :rule.keys]
            labels = sel.gather_channels(torch.nn.functional.pad(k[:, :n].float(), (0, 0, 0, N * P - n)), channels)
            j = torch.arange(N)
            fill = sel.tokens_in_pages(torch.tensor(n), j, P)
            plan = SeedPlan(rows=torch.tensor([0]), last=torch.tensor([0]), label_rows=j.view(1, 1, N),
                            inside=torch.ones(1, 1, N, dtype=torch.bool),
                            free=sel.page_pins(torch.tensor([N]), N, self.sink, self.recent).free.view(1, 1, N),
                            stale=(torch.arange(P) >= fill.unsqueeze(-1)).view(1, 1, N, P))
            carry = torch.full((1, Hkv, m), -1, dtype=torch.long)                # [request rows, Hkv, m]
            seed(carry, plan, self.last_q[layer].float().view(1, Hkv, -1, D), labels, channels, rule)
            self.carry[layer] = carry.transpose(0, 1).contiguous()               # [Hkv, 1 (row), m]
        return self.carry[layer]

    def budgets_of(self, variant: str):
        """(the variant's rule, its budgets [L, Hkv], BudgetRef): VARIANT@M reads the default allocation (optimal,
        from the committed profile) at mean M instead of the --budgets file."""
        if "@" not in variant:
            return variant, self.budgets, self.ref
        name, mean = variant.split("@")
        if mean not in self.at_mean:
            from common import committed_profile

            from sglang_shplb.budget import make_budgets
            body = make_budgets(committed_profile(), float(mean), "optimal", "kv")
            b = torch.tensor(body["budgets"], dtype=torch.float64)
            self.at_mean[mean] = (b, sel.BudgetRef.of(b, -(-body["context_len"] // self.P)))
        return name, *self.at_mean[mean]

    def estimated_top_p(self, layer, qg, k, n_pages, kp, seq, spec):
        """etopP[free|keys]: the served selector's order over its whole shortlist (its first kp pages are
        `sparse`'s), read up to the fewest pages whose estimated group mass reaches P, at least kp (`free`: at least
        the forced pages). The estimate is the label logits' per-page log-sum-exp, softmaxed per query head over the
        shortlist (forced pages included), averaged over the group: what the second stage computes, no extra read.
        `keys`: the bound of a better second stage: the estimate from the full keys (exact over the shortlist), and
        the shortlist ordered by it. Returns the order [Hkv, 1, C], each group's page count [Hkv, 1] and its listed
        pages [Hkv, N] (bool)."""
        free, exact = spec.endswith("free"), spec.endswith("keys")
        p = float(spec[:-4] if free or exact else spec)
        rule = sel.get_selector(self.selector)
        Hkv, P = k.shape[0], self.P
        K = int(kp.max())
        N = int(n_pages.max())
        C = min(N, math.ceil(rule.shortlist * K))
        kmin, kmax = sel.page_minmax(k.float(), P)
        coarse = sel.coarse_scores(rule, qg, kmin.unsqueeze(1), kmax.unsqueeze(1), n_pages)       # [Hkv, 1, N]
        pins = sel.page_pins(n_pages, N, self.sink, self.recent)
        short = sel.top_pages(coarse, n_pages, C, self.sink, self.recent, pins)                   # [Hkv, 1, C]
        listed = torch.arange(C) < sel.shortlist_len(rule, kp, n_pages).unsqueeze(-1)
        labels = recovery.stage2_inputs(rule, k.float(), P, self.channels[layer])[0]            # [Hkv, N, P, r]
        heads = torch.arange(Hkv).view(-1, 1, 1)
        fine = sel.second_stage(rule, self.channels[layer].unsqueeze(1), seq)(
            rule, qg, short, (labels[heads, short],), listed)                                     # [Hkv, 1, C]
        by_page = torch.broadcast_to(pins.value, (Hkv, 1, N)).clone()
        by_page.scatter_reduce_(-1, short, fine, "amax")
        order = by_page.argsort(dim=-1, descending=True, stable=True)[..., :C]                   # [Hkv, 1, C]
        # per-head estimated mass over the listed shortlist (page log-sum-exp of the label logits, or the keys')
        if exact:
            lg = torch.einsum("hgd,hnpd->hgnp", qg[:, 0] * qg.shape[-1] ** -0.5, recovery.page_keys(k, P))
        else:
            q_r = sel.gather_channels(qg[:, 0], self.channels[layer][:, :labels.shape[-1]]) * qg.shape[-1] ** -0.5
            lg = torch.einsum("hgr,hnpr->hgnp", q_r, labels)                                      # [Hkv, G, N, P]
        written = torch.arange(N * P).view(N, P) < int(seq.max())
        lse = lg.masked_fill(~written, float("-inf")).logsumexp(-1)                              # [Hkv, G, N]
        cand = torch.zeros(Hkv, N, dtype=torch.bool).scatter(-1, short[:, 0], listed[:, 0])
        est = lse.masked_fill(~cand.unsqueeze(1), float("-inf")).softmax(-1).mean(1)             # [Hkv, N]
        if exact:    # THE ranking rule (forced pages first) on the exact mass of the listed pages
            order = sel.top_pages(est.masked_fill(~cand, -1.0).unsqueeze(1), n_pages, C, self.sink, self.recent, pins)
        held = est.gather(-1, order[:, 0]).cumsum(-1)                                             # [Hkv, C]
        k_p = (held < p).sum(-1, keepdim=True) + 1
        floor = sel.is_forced(torch.arange(N), n_pages, self.sink, self.recent).sum(-1, keepdim=True) if free else kp
        k_new = torch.minimum(torch.maximum(k_p, floor), cand.sum(-1, keepdim=True))
        return order, k_new, cand

    def selector_ranks(self, layer, qg, k, n_pages, kp, seq):
        """Diagnostics only: each page's coarse rank, whether shortlisted, its fine score/rank within the shortlist."""
        rule = sel.get_selector(self.selector)
        Hkv, P = k.shape[0], self.P
        kmin, kmax = sel.page_minmax(k.float(), P)
        coarse = sel.coarse_scores(rule, qg, kmin.unsqueeze(1), kmax.unsqueeze(1), n_pages)     # [Hkv,1,N]
        order = sel.rank_pages(coarse, n_pages, self.sink, self.recent)                        # [Hkv,1,N]
        N = coarse.shape[-1]
        crank = torch.empty_like(order).scatter_(-1, order, torch.arange(N).expand_as(order))
        C = min(N, int(torch.ceil(rule.shortlist * kp.max().double() - 1e-6)))
        short = order[..., :C]
        fine = recovery.stage2_inputs(rule, k.float(), P, self.channels[layer])
        heads = torch.arange(Hkv).view(-1, 1, 1)
        listed = torch.arange(C) < sel.shortlist_len(rule, kp, n_pages).unsqueeze(-1)
        fs = sel.second_stage(rule, self.channels[layer].unsqueeze(1), seq)(
            rule, qg, short, tuple(t[heads, short] for t in fine), listed)                    # [Hkv,1,C]
        fscore = torch.full((Hkv, 1, N), float("nan")).scatter(-1, short, fs)
        return crank[:, 0], fscore[:, 0], coarse[:, 0]

    def diagnose(self, layer, q, k, probs, mask, base, kp=None, qg=None, n_pages=None, seq=None):
        Hkv, G, L = probs.shape
        P = self.P
        N = (L - 1) // P + 1
        mass = torch.nn.functional.pad(probs, (0, N * P - L)).unflatten(-1, (N, P)).sum(-1).mean(1)   # [Hkv, N]
        rec = {"step": self.step, "layer": layer, "mass": mass}
        if mask is not None:
            rec.update(mask=mask, base=base, k=kp[:, 0])
            rec["crank"], rec["fscore"], rec["coarse"] = self.selector_ranks(layer, qg, k, n_pages, kp, seq)
            kmin, kmax = sel.page_minmax(k.float(), P)
            b = sel.quest_upper_bound(qg[:, 0], kmin, kmax)                       # [Hkv, G, N] per query head
            rec["head_bound"] = b
            rec["head_mass"] = torch.nn.functional.pad(probs, (0, N * P - L)).unflatten(-1, (N, P)).sum(-1)  # [Hkv,G,N]
            rec["qnorm"] = qg[:, 0].norm(dim=-1)
        self.record.append(rec)


def recall_tail(attn: Attr) -> dict:
    """A teacher-forced run's true mass read per (step, layer, KV group): its mean, the share below 0.8, the tokens
    read per step, and (etop) the share of those below 0.8 whose whole listed shortlist already held < 0.8."""
    kept = torch.tensor([x for _, r, _ in attn.kept for x in r])
    low = kept < 0.8
    out = {"mean": float(kept.mean()), "below_0.8": float(low.double().mean()),
           "reads": sum(sum(r) / len(r) for _, r in attn.reads) / len(attn.reads)}
    if attn.kept[0][2] is not None:
        listed = torch.tensor([x for _, _, r in attn.kept for x in r])
        out["listed_below_0.8"] = float((listed[low] < 0.8).double().mean()) if low.any() else 0.0
    return out


def needle_positions(tok, ids, value):
    """Token positions of the needle's value digits in the prompt (first occurrence)."""
    vid = tok(" " + value, add_special_tokens=False).input_ids[1:]   # ' ' then digits
    vid = vid or tok(" " + value, add_special_tokens=False).input_ids   # a one-token value (a variable's name)
    for i in range(len(ids) - len(vid)):
        if ids[i:i + len(vid)] == vid:
            return list(range(i, i + len(vid)))
    raise ValueError("needle not found")


def run(model, attn, ids, cache0, first_tok, steps, feed=None):
    """Decode `steps` tokens from the prefilled cache. feed: teacher-forced tokens (None: greedy).
    Returns the argmax token of every step (the first is the prefill's)."""
    cache = copy.deepcopy(cache0)
    attn.carry, attn.step, attn.fallbacks, attn.margins = {}, 0, 0, []
    gate = float(attn.variant[4:]) if attn.variant.startswith("gate") else None
    name = attn.variant
    out = [first_tok]
    cur = first_tok
    for s in range(steps):
        attn.step = s
        inp = feed[s] if feed is not None else cur
        n = cache.get_seq_length()
        attn.variant = "sparse" if gate is not None else name
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[inp]]), past_key_values=cache, use_cache=True).logits[0, -1]
            top2 = logits.topk(2).values
            attn.margins.append(float(top2[0] - top2[1]))
            if gate is not None and float(top2[0] - top2[1]) < gate:   # unsure: the step again, dense
                cache.crop(n)
                attn.variant, attn.fallbacks = "dense", attn.fallbacks + 1
                logits = model(input_ids=torch.tensor([[inp]]), past_key_values=cache, use_cache=True).logits[0, -1]
        cur = int(logits.argmax())
        out.append(cur)
    attn.variant = name
    return out


def prompts(args, tok):
    """(name, prompt text, the needle value to locate, scorer or None) per prompt asked for."""
    if args.tasks:
        from retrieval import task_of

        for key in args.tasks:
            task = task_of(tok, key)
            yield key.replace("/", "-"), task.prompt(tok), task.answers[0], task.score
        return
    if not args.samples:
        raise SystemExit("give --samples (lm-eval samples jsonl) or --tasks (retrieval.py prompts)")
    samples = [json.loads(x) for x in Path(args.samples).read_text().splitlines()]
    for d in args.docs:
        s = next(x for x in samples if x["doc_id"] == d)
        value = s["target"][0] if isinstance(s["target"], list) else s["target"]
        yield d, s["arguments"]["gen_args_0"]["arg_0"], value.strip("[]'\" "), None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", help="lm-eval samples jsonl (dense run)")
    p.add_argument("--docs", type=int, nargs="+", default=[0], help="the samples' doc ids to run")
    p.add_argument("--tasks", nargs="+", help="instead of --samples: retrieval.py prompts, family/level/context/seed")
    p.add_argument("--budgets", help="decode budgets file (`python -m sglang_shplb.budget`, no prefill budgets)")
    p.add_argument("--selector", default=sel.DEFAULT_SELECTOR)
    p.add_argument("--variants", nargs="+", default=["dense", "sparse", "oracle"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--teacher", action="store_true")
    p.add_argument("--layer-scan", action="store_true", help="teacher-forced: sparse in one layer only / all but one")
    p.add_argument("--diagnose", action="store_true", help="per step/layer/head diagnostics of `sparse`")
    p.add_argument("--out", default="/tmp/issue33/attr")
    p.add_argument("--table", help="only render the greedy answers stored in --out (retrieval prompts) to this .md")
    args = p.parse_args()
    if args.table:
        return table(args)
    if not args.budgets:
        raise SystemExit("give --budgets (a decode budgets file) to run, or --table to render stored answers")
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    b = json.loads(Path(args.budgets).read_text())
    budgets = torch.tensor(b["budgets"], dtype=torch.float64)
    P, sink, recent = b["page_size"], b["sink_pages"], b["recent_pages"]
    ref = sel.BudgetRef.of(budgets, -(-b["context_len"] // P))
    channels = {l: torch.tensor(c)[:, :sel.LABEL_RANK] for l, c in enumerate(b["label_channels"])}
    md = prepare_model()
    tok = AutoTokenizer.from_pretrained(md)
    attn = Attr(P, sink, recent, budgets, ref, channels, 0)
    attn.selector = args.selector
    AttentionInterface.register("shplb_attr", attn)
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, attn_implementation="shplb_attr").eval()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from transformers import DynamicCache
    for d, prompt, value, score in prompts(args, tok):
        ids = tok(prompt).input_ids
        npos = needle_positions(tok, ids, value)
        attn.n_prompt = len(ids)
        attn.variant = "dense"
        t0 = time.time()
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = int(model(input_ids=torch.tensor([ids]), past_key_values=cache,
                              use_cache=True).logits[0, -1].argmax())
        print(f"doc {d}: {len(ids)} tokens, needle {value} at {npos[0]}..{npos[-1]} pages "
              f"{sorted({x // P for x in npos})}, prefill {time.time() - t0:.0f}s", flush=True)
        gold = run(model, attn, ids, cache, first, args.steps)
        print("  dense greedy:", repr(tok.decode(gold)), flush=True)
        res = {"doc": d, "value": value, "n_prompt": len(ids), "needle_pos": npos, "gold": gold,
               "gold_text": tok.decode(gold), "gold_margin": attn.margins,
               "greedy": {}, "teacher": {}, "reads": {}, "kept": {},
               "commands": ["python benchmark/needle_attribution.py " + " ".join(sys.argv[1:])]}
        for v in args.variants:
            attn.variant, attn.sparse_layers = v, None
            if args.greedy:
                attn.reads, attn.kept = [], []
                g = run(model, attn, ids, cache, first, args.steps)
                res["greedy"][v] = tok.decode(g)
                if attn.reads:   # mean tokens read per (sparse layer, KV head, step)
                    res["reads"][v] = sum(sum(r) / len(r) for _, r in attn.reads) / len(attn.reads)
                    # gateM: a fallback step also reads the whole context, after its discarded sparse pass
                    res["reads"][v] += attn.fallbacks / args.steps * len(ids)
            if args.teacher:
                attn.reads, attn.kept = [], []
                t = run(model, attn, ids, cache, first, len(gold) - 1, feed=gold)
                res["teacher"][v] = [int(a == bb) for a, bb in zip(t[1:], gold[1:])]
                if attn.kept:
                    res["kept"][v] = recall_tail(attn)
                    print(f"  {v:10s} teacher: {res['kept'][v]}", flush=True)
            scored = f" score {score(res['greedy'][v]):.2f}" if args.greedy and score else ""
            print(f"  {v:10s} greedy {res['greedy'].get(v)!r}{scored} teacher {res['teacher'].get(v)} "
                  f"reads/step {res['reads'].get(v, 0):.0f}", flush=True)
        if args.layer_scan:
            scan = {}
            L = model.config.num_hidden_layers
            for l in range(L):
                attn.variant, attn.sparse_layers = "sparse", {l}
                t = run(model, attn, ids, cache, first, len(gold) - 1, feed=gold)
                only = [int(a == bb) for a, bb in zip(t[1:], gold[1:])]
                attn.sparse_layers = set(range(L)) - {l}
                t = run(model, attn, ids, cache, first, len(gold) - 1, feed=gold)
                allbut = [int(a == bb) for a, bb in zip(t[1:], gold[1:])]
                scan[l] = {"only": only, "all_but": allbut}
                print(f"  layer {l:2d}: sparse only here {only}  dense only here {allbut}", flush=True)
            res["layer_scan"] = scan
            attn.sparse_layers = None
        if args.diagnose:
            attn.variant, attn.record = "sparse", []
            run(model, attn, ids, cache, first, len(gold) - 1, feed=gold)
            torch.save({"records": attn.record, "res": res, "ids": ids}, f"{args.out}/diag_doc{d}.pt")
            attn.record = None
        save(Path(f"{args.out}/doc{d}.json"), res)


def table(args) -> None:
    """Every stored retrieval prompt's greedy answer per variant, its score and the tokens read per step."""
    from common import write_result
    from retrieval import task_of
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepare_model())
    docs = [json.loads(f.read_text()) for f in sorted(Path(args.out).glob("doc*.json"))]
    docs = [d for d in docs if str(d["doc"]).count("-") == 3]          # retrieval prompts (--tasks)
    variants = list(dict.fromkeys(v for d in docs for v in d["greedy"]))
    lines = ["| prompt | dense | dense's lead | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 3)]
    scores = {}
    for d in docs:
        task = task_of(tok, d["doc"].replace("-", "/"))
        scores[d["doc"]] = task.score
        cell = lambda text, reads="": f"{task.score(text):.2f} `{text.strip()[:24]!r}`{reads}"   # noqa: E731
        lines.append(f"| {d['doc']} | {cell(d['gold_text'])} | {departure_lead(d)} | " + " | ".join(
            cell(d["greedy"][v], f" ({d['reads'][v]:.0f})") if v in d["greedy"] else "—" for v in variants) + " |")
    kept = {v: sum(v in d["greedy"] and scores[d["doc"]](d["greedy"][v]) >= scores[d["doc"]](d["gold_text"])
                   for d in docs) for v in variants}
    lines.append(f"| **at dense's score** (of {len(docs)}) | — | — | "
                 + " | ".join(str(kept[v]) for v in variants) + " |")
    lines += recall_table(docs)
    runs = list(dict.fromkeys(c for d in docs for c in d.get("commands", [])))
    lines += ["", "Runs (then `--table`): " + "; ".join(f"`{c}`" for c in runs)]
    write_result(args.table, "Decode budgets per step: top-p (oracle and estimated) against the served selector",
                 "Greedy answers of retrieval.py prompts with dense prefill and the default's decode budgets "
                 "(in-process HF fp32; the budgets file of `python -m sglang_shplb.budget --profile "
                 "python/sglang_shplb/data/smollm2-135m.profile.safetensors --mean-budget 0.1`, as `--budgets`): "
                 "score, the answer's start, and in brackets the tokens read per decode step (mean over steps, "
                 "layers and KV groups). `sparse` is the served selector at the file's per-head page counts, "
                 "`oracle` the true top pages at the same counts, `otopP` the fewest pages holding mass P, per "
                 "step, layer and KV group; `etopP` the served selector's own order over its shortlist, read until "
                 "its label estimate of the group's mass reaches P, never below the served count (`free`: no such "
                 "floor; `keys`: the estimate and the shortlist's order from the full keys, an exact second stage) "
                 "— Twilight's top-p on what the served selector computes; `sparse@M` the served selector "
                 "at the default allocation at mean M; `gateM` the served selector, but a step whose top-1 logit "
                 "leads the second by less than M runs again densely (its reads count that step's whole context); "
                 "`carryM` the served path's carried pages (carry2 is what the server runs: `sparse` carries none), "
                 "`shortC` the served selector with a shortlist of C·k pages (served: 3), `labelall` its second "
                 "stage over every page (no shortlist). Dense's lead: its top-1 logit minus its second at the first "
                 "step where teacher-forced `sparse` departs from dense's answer. The prompts: those the default's "
                 "decode budgets lose through the server with dense prefill (retrieval_attribution.md).", lines,
                 "python benchmark/needle_attribution.py " + " ".join(sys.argv[1:]))


def departure_lead(d: dict) -> str:
    """Dense's top-1 logit lead over its second token at the first step where teacher-forced `sparse` departs from
    dense's answer (how near a tie the lost token was), and that step."""
    t = d.get("teacher", {}).get("sparse")
    if "gold_margin" not in d or not t or all(t):
        return "—"
    s = t.index(0)
    return f"{d['gold_margin'][s]:.2f} (step {s})"


def recall_table(docs: list) -> list:
    """Teacher-forced runs (`--teacher`): per prompt and variant, the true mass read per (step, layer, KV group)."""
    variants = list(dict.fromkeys(v for d in docs for v in d.get("kept", {})))
    if not variants:
        return []
    lines = ["", "Teacher-forced on dense's answer (the same contexts for every variant): the true group mass read per "
             "decode step, layer and KV group — its mean / the share of entries below 0.8 — and the tokens read per "
             "step. For etop, in brackets: of the entries below 0.8, the share whose whole listed shortlist (the "
             "second stage's candidates) held less than 0.8 (the first stage missed the mass; the rest the second "
             "stage misranked).", "",
             "| prompt | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
    for d in docs:
        k = d.get("kept", {})
        cell = lambda r: (f"{r['mean']:.3f} / {r['below_0.8']:.1%} ({r['reads']:.0f})"   # noqa: E731
                          + (f" [{r['listed_below_0.8']:.0%}]" if "listed_below_0.8" in r else ""))
        lines.append(f"| {d['doc']} | " + " | ".join(cell(k[v]) if v in k else "—" for v in variants) + " |")
    return lines


def save(path: Path, res: dict) -> None:
    """Write a prompt's results, keeping the variants an earlier run of the same prompt and answer stored there."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old["gold"] == res["gold"]:
            res.setdefault("gold_margin", old.get("gold_margin"))
            for part in ("greedy", "teacher", "reads", "kept"):
                res[part] = {**old.get(part, {}), **res.get(part, {})}
            res["commands"] = list(dict.fromkeys(old.get("commands", []) + res.get("commands", [])))
    path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
