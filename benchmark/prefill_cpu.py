"""Prefill on CPU: shplb block-sparse (10% budget) vs SGLang's torch_native dense, side by side in one run.

    OMP_NUM_THREADS=1 python benchmark/prefill_cpu.py [--budget 0.1] [--contexts 4096 8192]
        [--ttft-contexts 4096 8000] [--repeats 5] [--skip-ttft] [--dense-kv-len 2048]

(1) Attention per layer, SmolLM2 shapes (3 KV heads x 3 query heads, head_dim 64, fp32, page 16,
    scrambled pages), one thread. Dense: TorchNativeAttnBackend._run_sdpa_forward_extend. Sparse:
    fold the chunk's keys into the page metadata + sparse_prefill (select + blockwise attention).
    Rows "one chunk" (the whole prompt at once) and "served" (chunks of --chunk tokens after a
    cached prefix, what the server does with SGLang's default chunked prefill on this machine).
(2) Time to first token via real servers (our launcher, fp32, 1 OpenMP thread): dense (--shplb-dense) vs the
    default recipe (no flag; --ttft-variant uniform: --shplb-uniform-prefill-budget and --shplb-prefill-dense-kv-len);
    fresh corpus text per request (no radix hits), max_new_tokens 1.
Times are medians of interleaved repeats; ratios are what to read (the machine is shared).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import write_result  # noqa: E402

from sglang_shplb.config import PREFILL_DENSE_KV_LEN  # noqa: E402

from sglang_shplb.sparse_attention import new_page_metadata, update_page_minmax  # noqa: E402
from sglang_shplb.sparse_prefill import DEFAULT_ESTIMATE, DENSE_TAIL, sparse_prefill  # noqa: E402

HKV, G, D, P = 3, 3, 64, 16
LAYERS = 30   # SmolLM2's layers


def build_pool(ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages = ctx // P
    perm = torch.randperm(pages, generator=g)
    k_buf, v_buf = torch.randn(pages * P, HKV, D, generator=g), torch.randn(pages * P, HKV, D, generator=g)
    req_to_token = (perm.view(pages, 1) * P + torch.arange(P)).view(1, ctx)
    q = torch.randn(ctx, HKV * G, D, generator=g)
    return q, k_buf, v_buf, req_to_token


def attention_pair(ctx, chunk, budget):
    """(dense, sparse) callables running every chunk of one ctx-token prompt through one layer."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    q, k_buf, v_buf, req_to_token = build_pool(ctx)
    kmin, kmax = new_page_metadata(k_buf.shape[0], HKV, D, P, "cpu")
    chunks = [(s, min(s + chunk, ctx)) for s in range(0, ctx, chunk)]
    budgets, rows, scale = torch.full((HKV,), budget), torch.tensor([0]), D ** -0.5

    def dense():
        for s, e in chunks:
            out = torch.empty(e - s, HKV * G, D)
            TorchNativeAttnBackend._run_sdpa_forward_extend(
                None, q[s:e], out, k_buf, v_buf, req_to_token, rows, torch.tensor([e]), torch.tensor([s]),
                torch.tensor([e - s]), scaling=scale, enable_gqa=True, causal=True)

    def sparse():
        for s, e in chunks:
            update_page_minmax(kmin, kmax, req_to_token[0, s:e], k_buf[req_to_token[0, s:e]], P)
            sparse_prefill(q[s:e].view(-1, HKV, G, D), k_buf, v_buf, kmin, kmax, req_to_token, rows, [s], [e - s],
                           budgets, P, 1, 2, scale)
    return dense, sparse


def interleaved(fns, repeats):
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def attention_rows(args):
    """Dense and the sparse path, interleaved: (table rows, {context: (dense s, sparse s) per layer as served})."""
    rows = ["| context | chunks | dense ms | shplb ms | speed-up |", "|---|---|---|---|---|"]
    served = {}
    for ctx in args.contexts:
        for label, chunk in (("one chunk", ctx), (f"served ({args.chunk})", args.chunk)):
            if chunk >= ctx and label != "one chunk":
                continue
            d, s = interleaved(list(attention_pair(ctx, chunk, args.budget)), args.repeats)
            served[ctx] = (d, s)    # the served row (chunked) comes last and stays
            rows.append(f"| {ctx} | {label} | {d * 1e3:.0f} | {s * 1e3:.0f} | {d / s:.2f}x |")
            print(rows[-1], flush=True)
    return rows, served


def attention_bound(dense_ttft: float, ctx: int, served: dict) -> str:
    """The TTFT speed-up if only attention changed: dense TTFT with each layer's attention time replaced by the
    sparse path's, from the served attention row at the smallest timed context >= ctx (an upper bound on the
    saving: that context is longer). Prefill on this CPU is compute-bound, so the model is time, not bytes."""
    longer = [c for c in served if c >= ctx]
    if not longer:
        return "—"
    d, s = served[min(longer)]
    rest = dense_ttft - LAYERS * (d - s)
    return f"{dense_ttft / rest:.2f}x" if rest > 0 else "—"


def ttft(server, ids):
    import requests

    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
    t0 = time.perf_counter()
    r = requests.post(f"{server.url}/generate", json=body, timeout=3600)
    r.raise_for_status()
    return time.perf_counter() - t0


def ttft_rows(args, served: dict):
    from harness import Server
    from transformers import AutoTokenizer

    from sglang_shplb.models import prepare_corpus, prepare_model

    ids = AutoTokenizer.from_pretrained(prepare_model())((prepare_corpus() / "lcet10.txt").read_text()).input_ids
    common = ["--dtype", "float32", "--max-total-tokens", "20000"]
    shplb = ["--shplb-uniform-prefill-budget", str(args.budget), "--shplb-prefill-dense-kv-len", str(args.dense_kv_len)]
    if args.ttft_variant == "default":   # what `make serve` serves: the default recipe, no flag
        shplb = []
    flags = {"dense": ["--shplb-dense"], "shplb": shplb}
    servers = {}
    rows = ["| prompt tokens | dense TTFT s | shplb TTFT s | speed-up | bound × (attention alone) |",
            "|---|---|---|---|---|"]
    try:
        for name, f in flags.items():
            servers[name] = Server(common + f, Path("/tmp") / f"bench-prefill-{name}.log").wait_ready()
        offset = 0
        for ctx in args.ttft_contexts:
            times = {name: [] for name in servers}
            for _ in range(args.ttft_repeats):            # new text each time: no radix-cache hits
                prompt = ids[offset: offset + ctx]
                offset = (offset + ctx) % max(1, len(ids) - ctx)
                for name, srv in servers.items():
                    times[name].append(ttft(srv, prompt))
            d, s = statistics.median(times["dense"]), statistics.median(times["shplb"])
            rows.append(f"| {ctx} | {d:.1f} | {s:.1f} | {d / s:.2f}x | {attention_bound(d, ctx, served)} |")
            print(rows[-1], flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--chunk", type=int, default=4096, help="SGLang's chunked prefill size on this machine")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ttft-contexts", type=int, nargs="+", default=[4096, 8000])
    p.add_argument("--ttft-repeats", type=int, default=2)
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument("--ttft-variant", choices=("default", "uniform"), default="default",
                   help="the shplb TTFT server: the default recipe as `make serve` serves it (per-head decode and "
                        "prefill budgets), or --budget/--dense-kv-len as one uniform prefill budget")
    p.add_argument("--dense-kv-len", type=int, default=PREFILL_DENSE_KV_LEN,
                   help="the shplb server's --shplb-prefill-dense-kv-len (prompts this short prefill densely; 0: "
                        "none). The attention table always runs the sparse path")
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "prefill_cpu.md"))
    args = p.parse_args()
    if not 0 < args.budget <= 1:
        p.error("--budget must be in (0, 1]")
    torch.set_num_threads(1)
    attention, served = attention_rows(args)
    rows = ["## Attention per layer (one thread)", ""] + attention
    if not args.skip_ttft:
        rows += ["", "## Time to first token, real servers", ""] + ttft_rows(args, served)
    ttft_servers = ("the default recipe as served (no flag)" if args.ttft_variant == "default"
                    else "the uniform prefill budget above")
    write_result(args.out, "Prefill on CPU: shplb block-sparse vs torch_native dense",
                 f"SmolLM2-135M shapes/model, fp32, prefill budget {args.budget} per KV head (page {P}, "
                 f"64-query blocks, sink 1 page, window = own pages + 1; page estimate {DEFAULT_ESTIMATE}; the blocks "
                 f"holding each chunk's last {DENSE_TAIL} queries dense: all the served defaults; the shplb "
                 f"server's --shplb-prefill-dense-kv-len {args.dense_kv_len}, served default {PREFILL_DENSE_KV_LEN}). "
                 f"TTFT servers: {ttft_servers} "
                 "vs --shplb-dense. TTFT bound: dense TTFT with its attention time (30 layers of the served "
                 "attention row at the next timed context) replaced by the sparse path's, the speed-up if only "
                 "attention changed (prefill is compute-bound here: a time model, not bytes). "
                 "Goals: attention >= 4x and TTFT >= 1.5x at 8k.", rows,
                 "OMP_NUM_THREADS=1 python benchmark/prefill_cpu.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
