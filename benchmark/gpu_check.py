"""GPU check of the selection kernels and sparse-vs-dense decode attention timing (one H100, < 8 min).

    python benchmark/gpu_check.py [--out benchmark/results/gpu_check.md] [--budget 0.1]
    python benchmark/gpu_check.py --dry-run      # tiny sizes on CPU, torch fallbacks (or the Triton
                                                 # kernels interpreted if TRITON_INTERPRET=1 is set)

(a) Triton kernels (kernels/) against the torch references at realistic sizes, with timings.
(b) A synthetic paged KV cache (32 q / 8 kv heads, head_dim 128, bf16, page 16, randomly scattered
    pages), contexts 8k/32k, batch 1/8: dense decode attention vs our sparse decode (Quest scores +
    per-head top-k selection + attention over the selected tokens) at --budget mean per-head budget.
    Attention: FlashInfer if it imports (sparse: one row per (request, kv head) over the cache viewed
    as [slots*Hkv, 1, 1, D] pages of one token), else torch gather + SDPA for both. At 100% budget
    the sparse output must equal dense (bf16 tolerance).
(c) Block-sparse prefill (benchmark/gpu_prefill_check.py): Triton kernel vs torch reference, 100% budget
    vs dense causal SDPA, and per-layer timing dense vs selection + kernel at --budget, 8k/32k.
Needs torch + triton only (no sglang). Writes markdown to --out and JSON next to it. Exit 1 on a failed check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

import sglang_shplb_kernels as K  # noqa: E402
from gpu_prefill_check import prefill_check  # noqa: E402
from sglang_shplb import selection as S  # noqa: E402

SINK, RECENT = 1, 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="markdown path (default benchmark/results/gpu_check.md; dry run: a temp file)")
    p.add_argument("--budget", type=float, default=0.10, help="mean per-head decode budget (fraction)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=420, help="seconds; later configs are skipped past it")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    return p.parse_args()


class Run:
    """Sizes, the kernel implementations in use, and the collected results."""

    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
        if self.dev.type == "cpu" and not args.dry_run:
            sys.exit("no CUDA device: use --dry-run")
        gpu = self.dev.type == "cuda"
        triton_ok = gpu or os.environ.get("TRITON_INTERPRET") == "1"
        self.impl = "triton" if triton_ok else "torch"
        self.update = K.update_page_minmax if triton_ok else K.update_page_minmax_torch
        self.scores = K.quest_scores if triton_ok else K.quest_scores_torch
        self.select = K.select_topk_pages if triton_ok else K.select_topk_pages_torch
        self.Hq, self.Hkv, self.D = (32, 8, 128) if gpu else (4, 2, 16)
        self.contexts, self.batches = ((8192, 32768), (1, 8)) if gpu else ((64, 200), (1, 3))
        self.iters = 30 if gpu else 2
        self.env, self.checks, self.timings, self.attn, self.notes = {}, [], [], [], []

    def elapsed(self):
        return time.time() - self.t0

    def check(self, name, ok, detail=""):
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)

    def time_ms(self, fn):
        """Median wall time of fn() in ms (CUDA events on GPU), after warm-up."""
        for _ in range(3 if self.dev.type == "cuda" else 1):
            fn()
        times = []
        for _ in range(self.iters):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); fn(); b.record(); torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    def timed(self, name, fn, ref_fn=None):
        row = {"op": name, "ms": self.time_ms(fn)}
        if ref_fn is not None:
            row["torch_ref_ms"] = self.time_ms(ref_fn)
        self.timings.append(row)


# ------------------------------------------------------------------------- synthetic paged cache
class Cache:
    """bs requests of ~ctx tokens on randomly scattered physical pages (page 0 unused, as in SGLang)."""

    def __init__(self, run, bs, ctx):
        P, dev = run.args.page_size, run.dev
        self.bs, self.P = bs, P
        self.seq_lens = torch.tensor([ctx - 5 * r for r in range(bs)])           # partial last pages
        self.n_pages = (self.seq_lens + P - 1) // P
        maxN = int(self.n_pages.max())
        num_pages = bs * maxN + 1
        perm = (torch.randperm(num_pages - 1) + 1).view(bs, maxN)
        self.page_ids = perm.to(dev)                                             # [bs, maxN] physical
        pos = torch.arange(maxN * P)
        self.req_to_token = (perm[:, pos // P] * P + pos % P).to(dev)            # [bs, maxN*P] slots
        shape = (num_pages * P, run.Hkv, run.D)
        self.k = torch.randn(shape, dtype=torch.bfloat16, device=dev)
        self.v = torch.randn(shape, dtype=torch.bfloat16, device=dev)
        self.kmin = torch.empty(num_pages, run.Hkv, run.D, device=dev)
        self.kmax = torch.empty_like(self.kmin)
        valid = pos[None, :] < self.seq_lens[:, None]
        self.locs = self.req_to_token[valid.to(dev)]                             # every written slot
        run.update(self.k[self.locs], self.locs, self.kmin, self.kmax, P)
        self.seq_dev, self.n_dev = self.seq_lens.to(dev), self.n_pages.to(dev)


def k_pages_for(run, cache, mean):
    """Per-head budgets spread 0.5x..1.5x around the mean (a crude stand-in for a real profile)."""
    H = run.Hkv
    spread = torch.linspace(0.5, 1.5, H) if H > 1 else torch.ones(1)
    budget = (mean * spread).clamp(max=1.0) if mean < 1 else torch.ones(H)
    k = S.pages_for_budget(budget[None, :], cache.n_pages[:, None].float(), SINK + RECENT)
    return k.to(run.dev), int(k.max())                                          # host-known max_k


# ------------------------------------------------------------------------- attention
def attend_torch(q4, k_rows, v_rows, mask):
    """q4 [B, H, G, D] against per-(b, h) key rows [B, H, L, D] with mask [B, H, L]."""
    return torch.nn.functional.scaled_dot_product_attention(q4, k_rows, v_rows, attn_mask=mask[:, :, None, :])


def selected_kv_index(run, cache, sel_idx):
    """Flattened [slots*Hkv] row index of every selected token, [bs, Hkv, Kmax*P], and its mask."""
    P, H = cache.P, run.Hkv
    tok = (sel_idx.long()[..., None] * P + torch.arange(P, device=run.dev)).flatten(2)
    valid = (tok >= 0) & (tok < cache.seq_dev[:, None, None])
    slot = cache.req_to_token.gather(1, tok.clamp(min=0).flatten(1)).view_as(tok)
    return slot * H + torch.arange(H, device=run.dev)[None, :, None], valid


class Attention:
    """Dense and sparse decode attention, FlashInfer when available, else torch gather + SDPA."""

    def __init__(self, run):
        self.run, self.fi = run, None
        if run.dev.type == "cuda":
            try:
                import flashinfer
                ws = torch.empty(256 << 20, dtype=torch.uint8, device=run.dev)
                self.fi_dense = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
                ws2 = torch.empty(256 << 20, dtype=torch.uint8, device=run.dev)
                self.fi_sparse = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws2, "NHD", use_tensor_cores=True)
                self.fi = flashinfer
                run.env["flashinfer"] = flashinfer.__version__
            except Exception as e:  # noqa: BLE001 - any import/JIT failure means the fallback
                run.env["flashinfer"] = f"unavailable ({type(e).__name__}: {str(e)[:120]})"
        self.kind = "flashinfer" if self.fi else "torch gather+SDPA"

    def dense_plan(self, cache, q):
        """FlashInfer plans once per step for all layers (SGLang does so), so it is timed apart."""
        run, P = self.run, cache.P
        if self.fi:
            valid = torch.arange(cache.page_ids.shape[1], device=run.dev) < cache.n_dev[:, None]
            indptr = torch.nn.functional.pad(cache.n_dev.cumsum(0), (1, 0)).int()
            last = (cache.seq_dev - (cache.n_dev - 1) * P).int()
            self.fi_dense.plan(indptr, cache.page_ids[valid].int(), last, run.Hq, run.Hkv, run.D, P,
                               q_data_type=q.dtype, kv_data_type=q.dtype)

    def dense(self, cache, q):
        run, P = self.run, cache.P
        if self.fi:
            kv = (cache.k.view(-1, P, run.Hkv, run.D), cache.v.view(-1, P, run.Hkv, run.D))
            return self.fi_dense.run(q, kv)
        L = cache.req_to_token.shape[1]
        slots = cache.req_to_token                                               # [bs, L]
        k = cache.k[slots].transpose(1, 2)                                       # [bs, Hkv, L, D]
        v = cache.v[slots].transpose(1, 2)
        mask = (torch.arange(L, device=run.dev) < cache.seq_dev[:, None])[:, None, :].expand(-1, run.Hkv, -1)
        return attend_torch(q.view(cache.bs, run.Hkv, -1, run.D), k, v, mask).reshape(q.shape)

    def sparse_attend(self, cache, q, sel_idx):
        run, D = self.run, self.run.D
        kv_idx, valid = selected_kv_index(run, cache, sel_idx)
        G = run.Hq // run.Hkv
        if self.fi:
            rows = valid.flatten(0, 1)
            indptr = torch.nn.functional.pad(rows.sum(-1).cumsum(0), (1, 0)).int()
            last = torch.ones(rows.shape[0], dtype=torch.int32, device=run.dev)
            self.fi_sparse.plan(indptr, kv_idx.flatten(0, 1)[rows].int(), last, G, 1, D, 1,
                                q_data_type=q.dtype, kv_data_type=q.dtype)
            kv = (cache.k.view(-1, 1, 1, D), cache.v.view(-1, 1, 1, D))
            return self.fi_sparse.run(q.reshape(-1, G, D), kv).reshape(q.shape)
        k = cache.k.view(-1, D)[kv_idx.clamp(min=0)]                             # [bs, Hkv, Kmax*P, D]
        v = cache.v.view(-1, D)[kv_idx.clamp(min=0)]
        return attend_torch(q.view(cache.bs, run.Hkv, G, D), k, v, valid).reshape(q.shape)


def sparse_decode(run, attn, cache, q, k_dev, max_k):
    q4 = q.view(cache.bs, run.Hkv, -1, run.D)
    scores = run.scores(q4, cache.kmin, cache.kmax, cache.page_ids, cache.n_dev)
    sel_idx, _ = run.select(scores, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k)
    return attn.sparse_attend(cache, q, sel_idx)


# ------------------------------------------------------------------------- (a) kernel checks
def kernel_checks(run):
    bs, ctx = run.batches[-1], run.contexts[-1]
    cache = Cache(run, bs, ctx)
    P, dev = cache.P, run.dev
    # metadata: the cache built it with run.update; rebuild with the torch reference and compare
    lo, hi = torch.empty_like(cache.kmin), torch.empty_like(cache.kmax)
    K.update_page_minmax_torch(cache.k[cache.locs], cache.locs, lo, hi, P)
    used = cache.page_ids[torch.arange(cache.page_ids.shape[1], device=dev) < cache.n_dev[:, None]]
    ok = torch.equal(lo[used], cache.kmin[used]) and torch.equal(hi[used], cache.kmax[used])
    run.check(f"update_page_minmax == torch ref (extend of {cache.locs.numel()} tokens)", ok)
    dec = cache.req_to_token[torch.arange(bs, device=dev), cache.seq_dev - 1]   # one decode token each
    knew = torch.randn(bs, run.Hkv, run.D, dtype=torch.bfloat16, device=dev)
    a = (cache.kmin.clone(), cache.kmax.clone())
    b = (cache.kmin.clone(), cache.kmax.clone())
    run.update(knew, dec, *a, P)
    K.update_page_minmax_torch(knew, dec, *b, P)
    run.check("update_page_minmax == torch ref (decode)", torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    ext = cache.locs[5:5 + min(8192, cache.locs.numel() - 5)]
    kext = cache.k[ext]
    run.timed(f"update_page_minmax decode n={bs}", lambda: run.update(knew, dec, *a, P),
              lambda: K.update_page_minmax_torch(knew, dec, *b, P))
    run.timed(f"update_page_minmax extend n={ext.numel()}", lambda: run.update(kext, ext, *a, P),
              lambda: K.update_page_minmax_torch(kext, ext, *b, P))

    q4 = torch.randn(bs, run.Hkv, run.Hq // run.Hkv, run.D, dtype=torch.bfloat16, device=dev)
    args = (q4, cache.kmin, cache.kmax, cache.page_ids, cache.n_dev)
    s, s_ref = run.scores(*args), K.quest_scores_torch(*args)
    err = float((s - s_ref).nan_to_num(0, 0, 0).abs().max())
    run.check("quest_scores == torch ref", torch.allclose(s, s_ref, rtol=1e-4, atol=1e-3), f"max abs err {err:.2e}")
    run.timed(f"quest_scores bs={bs} pages={s.shape[-1]}", lambda: run.scores(*args),
              lambda: K.quest_scores_torch(*args))

    k_dev, max_k = k_pages_for(run, cache, run.args.budget)
    k_dev = k_dev.expand(bs, run.Hkv).contiguous()
    k_dev[0, 0] = int(cache.n_pages[0])                                          # one dense head
    max_k = max(max_k, int(cache.n_pages[0]))
    sel, cnt = run.select(s, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k)
    expect = S.select_pages(s, cache.n_dev[:, None].expand(bs, run.Hkv), k_dev, SINK, RECENT)
    got = torch.zeros(*sel.shape[:2], s.shape[-1] + 1, dtype=torch.bool, device=dev)
    got = got.scatter(-1, torch.where(sel < 0, s.shape[-1], sel).long(), True)[..., :-1]
    run.check("select_topk_pages == selection.select_pages", torch.equal(got, expect) and torch.equal(cnt.long(), k_dev))
    ref = K.select_topk_pages_torch(s, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k)
    run.check("select_topk_pages == select_topk_pages_torch", torch.equal(sel, ref[0]))
    run.timed(f"select_topk_pages bs={bs} pages={s.shape[-1]} max_k={max_k}",
              lambda: run.select(s, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k),
              lambda: K.select_topk_pages_torch(s, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k))
    run.timed("selection.select_pages (argsort reference)",
              lambda: S.select_pages(s, cache.n_dev[:, None].expand(bs, run.Hkv), k_dev, SINK, RECENT))


# ------------------------------------------------------------------------- (b) attention timing
def attention_bench(run):
    attn = Attention(run)
    run.env["attention"] = attn.kind
    for ctx in run.contexts:
        for bs in run.batches:
            if run.elapsed() > run.args.time_limit:
                run.notes.append(f"skipped ctx={ctx} bs={bs}: past --time-limit")
                continue
            cache = Cache(run, bs, ctx)
            q = torch.randn(bs, run.Hq, run.D, dtype=torch.bfloat16, device=run.dev)
            k_all, max_all = k_pages_for(run, cache, 1.0)
            k_all = k_all.expand(bs, run.Hkv).contiguous()
            try:
                attn.dense_plan(cache, q)
                dense, full = attn.dense(cache, q), sparse_decode(run, attn, cache, q, k_all, max_all)
            except Exception as e:  # noqa: BLE001 - FlashInfer JIT/plan trouble: measure with the fallback
                if not attn.fi:
                    raise
                traceback.print_exc()
                attn.fi, attn.kind = None, "torch gather+SDPA"
                run.env["attention"] = f"{attn.kind} (flashinfer failed: {type(e).__name__}: {str(e)[:120]})"
                attn.dense_plan(cache, q)
                dense, full = attn.dense(cache, q), sparse_decode(run, attn, cache, q, k_all, max_all)
            rel = float((full.float() - dense.float()).abs().max() / dense.float().abs().max())
            run.check(f"sparse@100% == dense (ctx={ctx} bs={bs})", rel < 2e-2, f"max rel err {rel:.2e}")
            k_dev, max_k = k_pages_for(run, cache, run.args.budget)
            k_dev = k_dev.expand(bs, run.Hkv).contiguous()
            q4 = q.view(bs, run.Hkv, -1, run.D)
            scores = run.scores(q4, cache.kmin, cache.kmax, cache.page_ids, cache.n_dev)
            sel, _ = run.select(scores, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k)
            row = {"ctx": ctx, "bs": bs, "kv_read_frac": float(k_dev.sum() * cache.P / (cache.seq_lens.sum() * run.Hkv)),
                   "dense_ms": run.time_ms(lambda: attn.dense(cache, q)),
                   "dense_plan_ms": run.time_ms(lambda: attn.dense_plan(cache, q)),
                   "score_ms": run.time_ms(lambda: run.scores(q4, cache.kmin, cache.kmax, cache.page_ids, cache.n_dev)),
                   "select_ms": run.time_ms(lambda: run.select(scores, cache.n_dev, k_dev, SINK, RECENT, max_k=max_k)),
                   "attend_ms": run.time_ms(lambda: attn.sparse_attend(cache, q, sel)),
                   "sparse_ms": run.time_ms(lambda: sparse_decode(run, attn, cache, q, k_dev, max_k))}
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
            run.attn.append(row)
            print(f"ctx={ctx} bs={bs}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("ctx", "bs")), flush=True)
            del cache
            if run.dev.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------- report
def report(run, out: Path):
    ok = all(c["ok"] for c in run.checks)
    lines = [f"# GPU check ({'dry run, CPU' if run.args.dry_run else run.env.get('gpu')})", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in run.env.items()), "",
             f"Kernels: {run.impl}; Hq/Hkv/D = {run.Hq}/{run.Hkv}/{run.D}, page {run.args.page_size}, "
             f"sink {SINK}, recent {RECENT}, mean budget {run.args.budget:.0%} (per-head 0.5x..1.5x). "
             f"Total {run.elapsed():.0f} s. Overall: {'PASS' if ok else 'FAIL'}", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in run.checks]
    lines += ["", "| op | ms | torch ref ms |", "|---|---|---|"]
    lines += [f"| {t['op']} | {t['ms']:.4f} | {t.get('torch_ref_ms', float('nan')):.4f} |" for t in run.timings]
    lines += ["", f"Decode attention per layer ({run.env.get('attention')}). dense = attention only (its "
              "FlashInfer plan() is shared by all layers: 'dense plan'); sparse = scores + select + attend, "
              "where attend includes building the token index and, with FlashInfer, its per-layer plan().", "",
              "| ctx | bs | KV read | dense ms | dense plan ms | score ms | select ms | attend ms | sparse ms "
              "| dense/sparse |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ctx']} | {r['bs']} | {r['kv_read_frac']:.1%} | {r['dense_ms']:.4f} | "
              f"{r['dense_plan_ms']:.4f} | {r['score_ms']:.4f} | "
              f"{r['select_ms']:.4f} | {r['attend_ms']:.4f} | {r['sparse_ms']:.4f} | {r['speedup']:.2f}x |" for r in run.attn]
    lines += [""] + [f"Note: {n}" for n in run.notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"env": run.env, "impl": run.impl, "ok": ok, "checks": run.checks, "timings": run.timings,
         "attention": run.attn, "notes": run.notes, "seconds": run.elapsed()}, indent=1))
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return ok


def main() -> int:
    args = parse_args()
    default = Path(tempfile.gettempdir()) / "gpu_check.dry-run.md" if args.dry_run else ROOT / "benchmark/results/gpu_check.md"
    out = Path(args.out) if args.out else default
    torch.manual_seed(0)
    run = Run(args)
    try:
        import triton
        run.env["triton"] = triton.__version__
    except ImportError:
        run.env["triton"] = "not installed"
    run.env.update(torch=torch.__version__, python=sys.version.split()[0],
                   gpu=torch.cuda.get_device_name() if run.dev.type == "cuda" else "none (CPU)")
    for stage in (kernel_checks, attention_bench, prefill_check):
        try:
            stage(run)
        except Exception as e:  # noqa: BLE001 - record and keep going so the report is written
            traceback.print_exc()
            run.check(f"{stage.__name__} raised", False, f"{type(e).__name__}: {str(e)[:300]}")
    return 0 if report(run, out) else 1


if __name__ == "__main__":
    sys.exit(main())
