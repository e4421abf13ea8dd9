"""Device check of the GPU serving path: runs the SHIPPING objects (sglang_shplb.gpu_decode.GpuSparseDecode
and the kernels it launches; the block-sparse prefill kernel) on one GPU in < 8 min, prints one table.

    python benchmark/gpu_check.py [--budget 0.1] [--out benchmark/results/gpu_check.md]
    python benchmark/gpu_check.py --dry-run     # same objects, tiny sizes, CPU, TRITON_INTERPRET=1

Needs torch + triton and this repository (no install, no sglang, no flashinfer, no network).
(a) correctness vs the CPU serving path (sparse_attention.py, same --selector: the server's default
    label selector unless told, with fixed random channels) at 10% and 100% budget (float32 page metadata:
    identical selection), and with the served bf16 metadata: the CPU path selecting on that same metadata;
(b) host syncs per decode step (torch.cuda.set_sync_debug_mode) in the per-layer part and in the plan;
(c) Triton compiles during warm-up and recompiles afterwards (changing lengths and batch sizes);
(d) per-stage time (plan, fold, coarse score, the whole selection, attend) and selected bytes/s (KV +
    metadata) against measured copy bandwidth, sparse vs dense (the same fused kernel over all pages, and
    torch SDPA -- flash backend -- over contiguous unpaged K/V, the strongest dense baseline available) at
    8k/32k/128k x batch 1/8/32 at --budget; (e) block-sparse prefill (gpu_prefill_check.py).
Exit 1 when a check fails. Markdown to --out, JSON next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmark"), str(ROOT / "python")]
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")       # before the kernels are imported

import torch  # noqa: E402
from paged_sim import PagedCache, import_kernels  # noqa: E402

K = import_kernels()
from gpu_prefill_check import prefill_check  # noqa: E402
from sglang_shplb import selection as S  # noqa: E402
from sglang_shplb import sparse_attention as cpu  # noqa: E402
from sglang_shplb.gpu_decode import DecodeShape, GpuSparseDecode, gpu_selectors  # noqa: E402

SINK, RECENT = 1, 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="markdown path (default benchmark/results/gpu_check.md; dry run: a temp file)")
    p.add_argument("--budget", type=float, default=0.10, help="per-head decode budget (fraction)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--selector", default=S.DEFAULT_SELECTOR, choices=gpu_selectors(),
                   help="decode selector (default: the server's, selection.DEFAULT_SELECTOR)")
    p.add_argument("--time-limit", type=float, default=420, help="seconds; later configs are skipped past it")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    return p.parse_args()


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        gpu = torch.cuda.is_available() and not args.dry_run
        if not gpu and not args.dry_run:
            sys.exit("no CUDA device: use --dry-run")
        self.dev = torch.device("cuda" if gpu else "cpu")
        self.impl = "triton"
        self.update = K.fold_page_minmax
        self.Hq, self.Hkv, self.D = (32, 8, 128) if gpu else (4, 2, 32)
        self.dtype = torch.bfloat16 if gpu else torch.float32
        self.iters = 20 if gpu else 1
        self.checks, self.timings, self.rows, self.notes = [], [], [], []

    def elapsed(self):
        return time.time() - self.t0

    def check(self, name, ok, detail=""):
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn):
        for _ in range(2 if self.dev.type == "cuda" else 0):
            fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(self.iters):
            fn()
        self.sync()
        return (time.perf_counter() - t) * 1e3 / self.iters

    def timed(self, name, fn):
        self.timings.append({"op": name, "ms": self.time_ms(fn)})


def label_channels(layers: int, kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """[layers, kv_heads, min(LABEL_RANK, D)] label channels as a calibration might give them (any fixed set
    serves for correctness and timing; the server's come from the profile)."""
    g = torch.Generator().manual_seed(seed)
    r = min(S.LABEL_RANK, head_dim)
    return torch.stack([torch.stack([torch.randperm(head_dim, generator=g)[:r] for _ in range(kv_heads)])
                        for _ in range(layers)])


def selectors(run) -> list[str]:
    """The served default (or --selector) and the fallback served without calibrated label channels."""
    return list(dict.fromkeys([run.args.selector, S.UNCALIBRATED_SELECTOR]))


def _decoder(run, cache, budgets, meta_dtype, selector=None, carry_rows=None):
    shape = DecodeShape(budgets.shape[0], run.Hkv, run.Hq // run.Hkv, run.D, run.D, run.args.page_size, SINK, RECENT,
                        cache.req_to_token.shape[1])
    dec = GpuSparseDecode(shape, budgets, run.dev, meta_dtype=meta_dtype, num_slots=cache.k[0].shape[0],
                          selector=selector or run.args.selector,
                          channels=label_channels(budgets.shape[0], run.Hkv, run.D), carry_rows=carry_rows)
    locs = cache.prefill_locs.to(run.dev)
    for layer in range(shape.num_layers):
        dec.fold(layer, cache.k_dev[layer][locs], locs)
    return dec


def correctness(run):
    """(a) + (b) for each served selector."""
    for selector in selectors(run):
        correctness_of(run, selector)


def correctness_of(run, selector):
    """(a) + (b): the decode objects vs the CPU path, and host syncs per step."""
    P = run.args.page_size
    seq = [3000, 517, 8191, 40] if run.dev.type == "cuda" else [150, 17, 300]
    budgets = torch.tensor([[run.args.budget] * run.Hkv, [1.0] * run.Hkv], dtype=torch.float64)
    cache = PagedCache(seq, 2, run.Hkv, run.D, P, 8192 + 64, dtype=run.dtype, device=run.dev, seed=0)
    for meta_dtype in (torch.float32, torch.bfloat16):
        dec = _decoder(run, cache, budgets, meta_dtype, selector)
        rule = S.get_selector(selector)
        sub = rule.sub
        slots = cache.k[0].shape[0]
        chans = label_channels(2, run.Hkv, run.D)[..., : rule.keys] if rule.label else None
        ref_labels = [cpu.new_label_cache(slots, chans[l], P, torch.float32, "cpu")
                      for l in range(2)] if rule.label else None
        ref_meta = [cpu.new_page_metadata(slots, run.Hkv, run.D, P, "cpu") for _ in range(2)]
        ref_fine = [cpu.new_page_metadata(slots, run.Hkv, run.D, sub, "cpu") for _ in range(2)] if sub else None
        for layer in range(2):
            cpu.update_page_minmax(*ref_meta[layer], cache.prefill_locs, cache.k[layer][cache.prefill_locs], P)
            if sub:
                cpu.update_page_minmax(*ref_fine[layer], cache.prefill_locs, cache.k[layer][cache.prefill_locs], sub)
            if ref_labels:
                cpu.fold_labels(ref_labels[layer], chans[layer], cache.prefill_locs, cache.k[layer][cache.prefill_locs])
        locs, k_new = cache.step()
        dec.plan(cache.bs, cache.seq_lens, cache.seq_lens_dev)
        syncs = {}
        for layer in range(2):
            cpu.update_page_minmax(*ref_meta[layer], locs.cpu(), k_new[layer].cpu(), P)
            if sub:
                cpu.update_page_minmax(*ref_fine[layer], locs.cpu(), k_new[layer].cpu(), sub)
            if ref_labels:
                cpu.fold_labels(ref_labels[layer], chans[layer], locs.cpu(), k_new[layer].cpu())
        q = cache.query(run.Hq)
        if run.dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            dec.prepare(cache.seq_lens_dev)
            outs = []
            for layer in range(2):
                dec.fold(layer, k_new[layer], locs)
                outs.append(dec.decode(layer, q, cache.k_dev[layer], cache.v_dev[layer], cache.req_to_token_dev,
                                       cache.req_pool_indices_dev, cache.seq_lens_dev, run.D ** -0.5))
        if run.dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        syncs["per-layer"] = sum("synchroniz" in str(x.message).lower() for x in w)
        qg = q.view(cache.bs, run.Hkv, -1, run.D).cpu()
        for layer, budget in enumerate(("budget", "100%")):
            name = f"{run.args.budget:.0%}" if budget == "budget" else budget
            if meta_dtype == torch.float32:   # the CPU serving path on its own (float32) metadata
                meta, fine = ref_meta[layer], (ref_fine[layer] if sub else None)
                labels = ref_labels[layer] if ref_labels else None
                label = f"decode {name} == CPU serving path ({selector}, f32 metadata)"
            else:                             # the CPU path selecting on the kernels' bf16 (widened) metadata
                meta = tuple(t.cpu().float() for t in dec.meta[layer])
                fine = tuple(t.cpu().float() for t in dec.fine[layer]) if dec.fine is not None else None
                labels = dec.labels[layer].cpu().float() if dec.labels is not None else None
                label = f"decode {name} == CPU serving path on the same bf16 metadata ({selector})"
            chosen = cpu.select_decode_tokens(qg.float(), *meta, cache.req_to_token, cache.req_pool_indices,
                                              cache.seq_lens, budgets[layer], P, SINK, RECENT,
                                              selector=selector, fine=fine,
                                              labels=None if labels is None else (labels, chans[layer]))
            want = cpu.attend_selected(qg.float(), cache.k[layer].float(), cache.v[layer].float(), chosen,
                                       run.D ** -0.5)
            err = float((outs[layer].float().cpu().view_as(want) - want).abs().max())
            run.check(label, err < (3e-2 if run.dtype != torch.float32 else 2e-4), f"max abs err {err:.2e}")
        run.check(f"host syncs per decode step, per-layer part ({selector}, {meta_dtype})", syncs["per-layer"] == 0,
                  f"{syncs['per-layer']} (set_sync_debug_mode)" if run.dev.type == "cuda" else "(CPU: not measured)")


class Graph:
    """A CUDA graph of `body` (eager calls on CPU: the dry run has no graphs, same buffers and calls)."""

    def __init__(self, run, body):
        self.body, self.graph = body, None
        if run.dev.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()                                   # compile every kernel before capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outs = body()
        else:
            self.outs = body()

    def replay(self) -> str | None:
        """Run the step; the host sync it attempted, if any (raised under set_sync_debug_mode("error"))."""
        if self.graph is None:
            self.outs = self.body()
            return None
        torch.cuda.set_sync_debug_mode("error")
        try:
            self.graph.replay()
        except RuntimeError as e:
            return str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return None


def graph_replay(run):
    """(c) The shipping decode as SGLang runs it: one decoder per process with buffers reserved for the
    captured batch size, the step captured once into a CUDA graph (prepare + every layer's fold and decode),
    then replayed at growing lengths with only the host plan between replays. Checks: replays raise no host
    sync (set_sync_debug_mode("error")), compile nothing new, and the last replay equals eager decode."""
    for selector in selectors(run):
        graph_replay_of(run, selector)


def graph_replay_of(run, selector):
    gpu, P = run.dev.type == "cuda", run.args.page_size
    seq = [4000, 1500, 77] if gpu else [150, 40]
    steps = 80 if gpu else 6
    budgets = torch.tensor([[run.args.budget] * run.Hkv, [1.0] * run.Hkv], dtype=torch.float64)
    cache = PagedCache(seq, 2, run.Hkv, run.D, P, max(seq) + steps + 64, dtype=run.dtype, device=run.dev, seed=2)
    dec = _decoder(run, cache, budgets, torch.bfloat16, selector, carry_rows=cache.req_to_token.shape[0])
    gbs, bs = len(seq) + 1, len(seq)                 # captured size: the real rows + one padded row
    dec.reserve(gbs)
    seq_s = torch.ones(gbs, dtype=torch.int64, device=run.dev)    # SGLang's static inputs, fill value 1
    rpi_s = torch.zeros(gbs, dtype=torch.int64, device=run.dev)
    locs_s = torch.zeros(gbs, dtype=torch.int64, device=run.dev)
    q_s = torch.zeros(gbs, run.Hq * run.D, dtype=run.dtype, device=run.dev)
    kn_s = [torch.zeros(gbs, run.Hkv, run.D, dtype=run.dtype, device=run.dev) for _ in range(2)]

    def body():
        dec.prepare(seq_s)
        outs = []
        for layer in range(2):
            dec.fold(layer, kn_s[layer], locs_s)
            outs.append(dec.decode(layer, q_s, cache.k_dev[layer], cache.v_dev[layer], cache.req_to_token_dev,
                                   rpi_s, seq_s, run.D ** -0.5))
        return outs

    dec.plan(gbs, seq_s.cpu(), seq_s, static=True)
    graph = Graph(run, body)
    before, synced = _kernel_cache_sizes(), None
    carried = None
    for _ in range(steps):
        locs, k_new = cache.step()
        seq_s[:bs], rpi_s[:bs], locs_s[:bs] = cache.seq_lens_dev, cache.req_pool_indices_dev, locs
        q = cache.query(run.Hq)
        q_s[:bs] = q
        for layer in range(2):
            kn_s[layer][:bs] = k_new[layer]
        seq_host = torch.ones(gbs, dtype=torch.int64)
        seq_host[:bs] = cache.seq_lens
        dec.plan(gbs, seq_host, seq_s, real_bs=bs, static=True)     # host work between replays
        carried = None if dec.carry is None else dec.carry.clone()  # what this step starts from (eager below)
        synced = graph.replay() or synced
    run.sync()
    extra = {k: v - before.get(k, 0) for k, v in _kernel_cache_sizes().items() if v - before.get(k, 0)}
    grown = f"{steps} replays, lengths {seq} -> {cache.seq_lens.tolist()}"
    run.check(f"CUDA graph replays: no host sync ({selector})", synced is None,
              synced or grown + (" under set_sync_debug_mode('error')" if gpu else " (CPU: eager, not measured)"))
    run.check(f"CUDA graph replays: no recompiles ({selector})", not extra or not gpu,
              f"new variants {extra}" if extra else "none")
    got = [o[:bs].float().clone() for o in graph.outs]
    if carried is not None:   # the replays carried pages from step to step; eager starts where the last one did
        run.check(f"CUDA graph replays carry pages between steps ({selector})",
                  bool((dec.carry[:, cache.req_pool_indices_dev] >= 0).any()), "")
        dec.carry.copy_(carried)
    dec.plan(bs, cache.seq_lens, cache.seq_lens_dev)                  # eager, the same step
    dec.prepare(cache.seq_lens_dev)
    qg = q_s[:bs]
    for layer in range(2):
        want = dec.decode(layer, qg, cache.k_dev[layer], cache.v_dev[layer], cache.req_to_token_dev,
                          cache.req_pool_indices_dev, cache.seq_lens_dev, run.D ** -0.5).float()
        err = float((got[layer] - want).abs().max())
        run.check(f"CUDA graph replay == eager decode, layer {layer} ({selector})", err < 1e-2,
                  f"max abs err {err:.2e}")


def _kernel_cache_sizes():
    sizes = {}
    import sglang_shplb_kernels.page_meta as pm
    import sglang_shplb_kernels.sparse_decode as sd
    import sglang_shplb_kernels.fine_score as fs
    import sglang_shplb_kernels.label_score as ls
    import sglang_shplb_kernels.topk_select as ts
    for fn in (pm._fold_kernel, sd._score_kernel, sd._attend_kernel, sd._combine_kernel, ts._select_kernel,
               fs._fine_kernel, ls._label_kernel):
        try:   # JITFunction.device_caches: {device: (compiled kernels, ...)} in Triton 3.x
            sizes[fn.fn.__name__] = sum(len(c[0]) for c in fn.device_caches.values())
        except (AttributeError, TypeError, IndexError):
            sizes[getattr(fn, "__name__", str(fn))] = -1
    return sizes


def bench(run):
    """(c) + (d): per-stage timing and recompiles at serving shapes (one layer)."""
    P, gpu = run.args.page_size, run.dev.type == "cuda"
    contexts = (8192, 32768, 131072) if gpu else (256,)
    batches = (1, 8, 32) if gpu else (2,)
    bw = None
    if gpu:
        x = torch.empty(1 << 30, dtype=torch.uint8, device=run.dev)
        y = torch.empty_like(x)
        ms = run.time_ms(lambda: y.copy_(x))
        bw = 2 * x.numel() / (ms / 1e3)                      # read + write bytes/s
        run.notes.append(f"measured device copy bandwidth {bw / 1e12:.2f} TB/s (the roofline below)")
        del x, y
    compiled_after_warmup = None
    for ctx in contexts:
        for bs in batches:
            if run.elapsed() > run.args.time_limit:
                run.notes.append(f"skipped ctx={ctx} bs={bs}: past --time-limit")
                continue
            if gpu and 3 * bs * ctx * run.Hkv * run.D * 2 * 2 > 0.6 * torch.cuda.mem_get_info()[0]:   # 3 layers of K+V
                run.notes.append(f"skipped ctx={ctx} bs={bs}: KV does not fit")
                continue
            seq = [ctx - 7 * r for r in range(bs)]
            budgets = torch.full((2, run.Hkv), run.args.budget, dtype=torch.float64)
            budgets[1] = 1.0                                            # layer 1: dense through the same kernel
            cache = PagedCache(seq, 2, run.Hkv, run.D, P, ctx + 64, dtype=run.dtype, device=run.dev, seed=1)
            dec = _decoder(run, cache, budgets, torch.bfloat16)
            locs, k_new = cache.step()
            q = cache.query(run.Hq)
            args = (cache.req_to_token_dev, cache.req_pool_indices_dev, cache.seq_lens_dev)
            qg = q.view(bs, run.Hkv, -1, run.D)

            def plan():
                dec.plan(bs, cache.seq_lens, cache.seq_lens_dev)
                dec.prepare(cache.seq_lens_dev)
            plan()
            row = {"ctx": ctx, "bs": bs, "budget": run.args.budget}
            row["plan_ms"] = run.time_ms(plan)
            row["fold_ms"] = run.time_ms(lambda: dec.fold(0, k_new[0], locs))
            kmin, kmax = dec.meta[0]
            row["score_ms"] = run.time_ms(lambda: K.page_scores(qg, kmin, kmax, *args[:2], dec.buf.n_pages, P,
                                                                dec.buf.scores, dec.agg, grid_pages=dec.grid_pages))
            # the whole selector (coarse score, top-k; two-stage: shortlist, sub-page or label re-score, top-k)
            row["select_ms"] = run.time_ms(lambda: dec.select(0, qg, *args[:3]))
            sparse_ms = run.time_ms(lambda: dec.decode(0, q, cache.k_dev[0], cache.v_dev[0], *args, run.D ** -0.5))
            dense_ms = run.time_ms(lambda: dec.decode(1, q, cache.k_dev[1], cache.v_dev[1], *args, run.D ** -0.5))
            row["attend_ms"] = sparse_ms - row["select_ms"]
            row["sparse_layer_ms"], row["dense_layer_ms"] = sparse_ms, dense_ms
            n = (cache.seq_lens + P - 1) // P
            k = S.pages_for_budget(torch.tensor(run.args.budget, dtype=torch.float64), n.double(), SINK + RECENT)
            kv_bytes = int((k * P).sum()) * run.Hkv * 2 * run.D * cache.k[0].element_size()
            meta_bytes = int(n.sum()) * run.Hkv * 2 * run.D * 2                 # coarse bf16 min/max, every page
            if dec.sub:   # sub-page bf16 min/max of the shortlisted pages
                c = dec.buf.c_pages[0, :bs].long().cpu()
                meta_bytes += int(c.sum()) * (P // dec.sub) * 2 * run.D * 2
            if dec.labels is not None:   # bf16 label rows (r channels) of the shortlisted pages' tokens
                c = dec.buf.c_pages[0, :bs].long().cpu()
                meta_bytes += int(c.sum()) * P * dec.channels.shape[-1] * 2
            row["selected_GBps"] = (kv_bytes + meta_bytes) / (sparse_ms / 1e3) / 1e9
            row["roofline_pct"] = 100 * (kv_bytes + meta_bytes) / (sparse_ms / 1e3) / bw if bw else None
            row["speedup_vs_dense"] = dense_ms / sparse_ms
            # the strongest dense baseline torch has: SDPA (flash backend on GPU) over contiguous, unpaged K/V
            kc = torch.randn(bs, run.Hkv, ctx, run.D, dtype=run.dtype, device=run.dev)
            vc = torch.randn_like(kc)
            qd = q.view(bs, run.Hq, 1, run.D)
            row["sdpa_dense_ms"] = run.time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                qd, kc, vc, enable_gqa=True))
            row["speedup_vs_sdpa"] = row["sdpa_dense_ms"] / sparse_ms
            del kc, vc
            row["flashinfer_dense_ms"] = flashinfer_dense_ms(run, cache, q)
            dense_bytes = int(cache.seq_lens.sum()) * run.Hkv * 2 * run.D * cache.k[0].element_size()
            row["bound_sparse_ms"] = (kv_bytes + meta_bytes) / bw * 1e3 if bw else None
            row["bound_dense_ms"] = dense_bytes / bw * 1e3 if bw else None
            run.rows.append(row)
            print(json.dumps(row), flush=True)
            if compiled_after_warmup is None:
                compiled_after_warmup = _kernel_cache_sizes()
            del cache, dec
            if gpu:
                torch.cuda.empty_cache()
    if compiled_after_warmup is not None:   # a new decoder per config: its top-k width differs, serving's never does
        run.notes.append(f"compiled variants after the first config: {compiled_after_warmup}; after all configs "
                         f"(one decoder each, so per-width top-k variants): {_kernel_cache_sizes()}; serving's "
                         "recompile check is the graph replay's")


def flashinfer_dense_ms(run, cache, q):
    """FlashInfer's paged dense decode over the same pages (page table from req_to_token), when importable."""
    try:
        import flashinfer
    except ImportError:
        if "flashinfer" not in " ".join(run.notes):
            run.notes.append("flashinfer not importable here: its dense decode is not timed")
        return None
    P, bs = run.args.page_size, cache.bs
    n = ((cache.seq_lens + P - 1) // P).tolist()
    rows = cache.req_to_token[cache.req_pool_indices]
    pages = torch.cat([rows[r, : n[r] * P: P] // P for r in range(bs)]).int().to(run.dev)
    indptr = torch.tensor([0] + n, dtype=torch.int32).cumsum(0).int().to(run.dev)
    last = (cache.seq_lens - (torch.tensor(n) - 1) * P).int().to(run.dev)
    try:
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=run.dev)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(indptr, pages, last, run.Hq, run.Hkv, run.D, P, q_data_type=run.dtype, kv_data_type=run.dtype)
        k = cache.k_dev[0].view(-1, P, run.Hkv, run.D)
        v = cache.v_dev[0].view(-1, P, run.Hkv, run.D)
        qh = q.view(bs, run.Hq, run.D)
        return run.time_ms(lambda: w.run(qh, (k, v)))
    except Exception as e:  # noqa: BLE001 - an API or JIT problem is reported, never hidden
        run.notes.append(f"flashinfer {getattr(flashinfer, '__version__', '?')} dense decode failed: "
                         f"{type(e).__name__}: {str(e)[:200]}")
        return None


def report(run):
    lines = [f"# gpu_check ({torch.cuda.get_device_name() if run.dev.type == 'cuda' else 'dry run, CPU interpreter'})",
             "", f"torch {torch.__version__}, triton {__import__('triton').__version__}, budget {run.args.budget}, "
             f"selector {run.args.selector}", "",
             "| ctx | bs | plan ms | fold ms | coarse score ms | select ms (all stages) | attend ms | "
             "sparse layer ms | bound ms (bytes/bw) | dense layer ms | dense bound ms | dense/sparse | SDPA dense ms | "
             "SDPA/sparse | FlashInfer dense ms | FlashInfer/sparse | selected GB/s | % roofline |",
             "|" + "---|" * 18]
    for r in run.rows:
        pct = "" if r["roofline_pct"] is None else f"{r['roofline_pct']:.0f}"
        fi = r.get("flashinfer_dense_ms")
        fi_ratio = "" if fi is None else f"{fi / r['sparse_layer_ms']:.2f}"
        lines.append(f"| {r['ctx']} | {r['bs']} | {r['plan_ms']:.3f} | {r['fold_ms']:.3f} | {r['score_ms']:.3f} | "
                     f"{r['select_ms']:.3f} | {r['attend_ms']:.3f} | {r['sparse_layer_ms']:.3f} | "
                     f"{_ms(r.get('bound_sparse_ms'))} | {r['dense_layer_ms']:.3f} | {_ms(r.get('bound_dense_ms'))} "
                     f"| {r['speedup_vs_dense']:.2f} | {r['sdpa_dense_ms']:.3f} | {r['speedup_vs_sdpa']:.2f} "
                     f"| {_ms(fi)} | {fi_ratio} "
                     f"| {r['selected_GBps']:.1f} | {pct} |")
    lines += ["", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in run.checks]
    lines += ["", "| other timing | ms |", "|---|---|"] + [f"| {t['op']} | {t['ms']:.3f} |" for t in run.timings]
    lines += [""] + [f"- {n}" for n in run.notes]
    return "\n".join(lines) + "\n"


def _ms(x) -> str:
    return "" if x is None else f"{x:.3f}"


def main():
    args = parse_args()
    run = Run(args)
    for stage in (correctness, graph_replay, bench, prefill_check):
        stage(run)
    text = report(run)
    print(text)
    out = Path(args.out) if args.out else (Path("/tmp/gpu_check_dry.md") if args.dry_run else
                                           ROOT / "benchmark" / "results" / "gpu_check.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": run.rows, "checks": run.checks, "timings": run.timings,
                                                    "notes": run.notes}, indent=1))
    sys.exit(0 if all(c["ok"] for c in run.checks) else 1)


if __name__ == "__main__":
    main()
