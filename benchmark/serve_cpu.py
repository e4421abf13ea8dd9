"""Server decode speed and greedy agreement: shplb (10% mean budget) vs dense torch_native, on CPU.

    python benchmark/serve_cpu.py [--budget 0.1] [--contexts 2048 4096 8000] [--new-tokens 64]

Starts three real servers (SmolLM2, fp32, our launcher): dense torch_native, shplb with a uniform
budget, and shplb with per-head `optimal` budgets from the committed profile at the same mean.
Sends the same long corpus prompts to each in turn (streaming /generate, greedy) and reports
decode tokens/s (time after the first token), the number of tokens generated before the first
difference from dense, and the share equal position by position. Takes ~15 min here.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import write_result  # noqa: E402
from harness import Server  # noqa: E402

from sglang_shplb.models import prepare_corpus, prepare_model  # noqa: E402


def stream_generate(server, ids, n):
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    t0, stamps, out = time.perf_counter(), [], []
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                stamps.append(time.perf_counter())
                out = chunk.get("output_ids", out)
    decode_s = stamps[-1] - stamps[0]
    return {"ttft": stamps[0] - t0, "decode_tps": (len(stamps) - 1) / decode_s, "ids": out}


def agreement(a, b):
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def optimal_budgets(mean: float, path: Path) -> Path:
    from sglang_shplb.artifacts import write_json
    from sglang_shplb.budget import make_budgets
    from sglang_shplb.profile import Profile

    prof = Profile.load(ROOT / "python/sglang_shplb/data/smollm2-135m.profile.safetensors")
    write_json(path, "budget", make_budgets(prof, mean, "optimal", "kv"))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "serve_cpu.md"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    model = prepare_model()
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok((prepare_corpus() / "lcet10.txt").read_text()).input_ids
    logs = Path("/tmp")
    common = ["--dtype", "float32", "--max-total-tokens", "20000"]
    variants = {
        "dense": ["--attention-backend", "torch_native"],
        "uniform": ["--shplb-uniform-budget", str(args.budget)],
        "optimal": ["--shplb-budgets", str(optimal_budgets(args.budget, logs / "bench-optimal.json"))],
    }
    servers = {}
    rows = ["| prompt tokens | shplb budgets | dense tok/s | shplb tok/s | speed-up | tokens before first "
            "difference | positions equal | TTFT dense / shplb s |", "|---|---|---|---|---|---|---|---|"]
    try:
        for name, flags in variants.items():
            servers[name] = Server(common + flags, logs / f"bench-{name}.log").wait_ready()
        for i, ctx in enumerate(args.contexts):
            prompt = ids[i * 9000: i * 9000 + ctx]
            res = {name: stream_generate(srv, prompt, args.new_tokens) for name, srv in servers.items()}
            d = res["dense"]
            for name in ("uniform", "optimal"):
                s = res[name]
                rows.append(f"| {ctx} | {name} | {d['decode_tps']:.2f} | {s['decode_tps']:.2f} | "
                            f"{s['decode_tps'] / d['decode_tps']:.2f}x | {first_difference(s['ids'], d['ids'])} | "
                            f"{agreement(s['ids'], d['ids']):.2f} | {d['ttft']:.1f} / {s['ttft']:.1f} |")
                print(rows[-1], flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    write_result(args.out, "Server decode on CPU: shplb vs dense torch_native",
                 f"SmolLM2-135M fp32, one request at a time, {args.new_tokens} greedy tokens after a prompt of "
                 f"lcet10.txt; shplb mean budget {args.budget} (page 16, sink 1, recent 2), uniform or optimal per "
                 "KV group. Goal: >= 1.5x at 8k. "
                 "Prefill is dense in both (TTFT should match).", rows, "python benchmark/serve_cpu.py")


if __name__ == "__main__":
    main()
