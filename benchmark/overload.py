"""Overload: far more concurrent long requests than the CPU server can hold. It must answer every
request with a clear status quickly (served, or 503 "The request queue is full."), keep /health
answering, and not grow without bound.

    python benchmark/overload.py [--requests 256] [--min-prompt-tokens 512] [--max-prompt-tokens 1024]
        [--max-tokens 16] [--seed 0] [--out benchmark/results/load.md]

Starts our launcher with a plan (as load.py; the launcher's CPU default --max-queued-requests 64
applies) and fires all --requests at once (chat and completions, streamed and not, prompts cut
from the corpus). A /health probe runs every second throughout. Writes the `overload` section of --out.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
import load  # noqa: E402
from common import machine_line  # noqa: E402
from harness import Server  # noqa: E402


def probe_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            ok = requests.get(url + "/health", timeout=30).status_code == 200
        except requests.RequestException:
            ok = False
        latencies.append(time.perf_counter() - t0 if ok else float("inf"))
        stop.wait(1.0)


def classify(result: load.Result) -> str:
    """A refusal is HTTP 503, or for a stream whose 200 header is already out, an error event."""
    if result.ok:
        return "served"
    if "queue is full" in result.error:
        return "refused: HTTP 503 queue full" if result.error.startswith("HTTP 503") else \
            "refused: stream error event, queue full"
    return result.error[:80] or "failed"


def run(args, url: str, pid: int | None) -> tuple[list[str], Counter]:
    from transformers import AutoTokenizer

    from sglang_shplb.models import prepare_model

    tok = AutoTokenizer.from_pretrained(prepare_model())
    ids, rng = load.corpus_ids(tok), random.Random(args.seed)
    jobs = []
    for _ in range(args.requests):  # long prompts only: the point is to exceed the KV pool and the queue
        n = rng.randint(args.min_prompt_tokens, args.max_prompt_tokens)
        start = rng.randrange(0, len(ids) - n)
        jobs.append(load.Job(rng.choice(["chat", "completions"]), rng.random() < 0.5,
                             tok.decode(ids[start:start + n]), n))
    lengths = [j.prompt_tokens for j in jobs]
    rss0 = load.tree_rss_mb(pid) if pid else None
    stop, health = threading.Event(), []
    prober = threading.Thread(target=probe_health, args=(url, stop, health), daemon=True)
    prober.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        results = list(pool.map(lambda j: load.send(url, j, args.max_tokens, args.timeout), jobs))
    wall = time.perf_counter() - t0
    stop.set()
    prober.join()
    rss1 = load.tree_rss_mb(pid) if pid else None
    kinds = Counter(classify(r) for r in results)
    by = {k: sorted(r.latency for r in results if classify(r) == k) for k in kinds}
    rows = ["<!-- load:overload -->", "## Overload", "", f"{machine_line()} · server `--shplb-plan plan.json` "
            "with the launcher's CPU defaults (`--max-queued-requests 64`, `--max-total-tokens 32768`)", "",
            f"Reproduce: `python benchmark/overload.py --requests {args.requests} --min-prompt-tokens "
            f"{args.min_prompt_tokens} --max-prompt-tokens {args.max_prompt_tokens} --max-tokens {args.max_tokens} "
            f"--seed {args.seed}`", "",
            f"{args.requests} requests sent at once, prompts {min(lengths)}–{max(lengths)} tokens, "
            f"{args.max_tokens} output tokens each; all answered in {wall:.0f} s.", "",
            "| outcome | requests | latency p50 s | max s |", "|---|---|---|---|"]
    for k, lat in sorted(by.items(), key=lambda kv: -len(kv[1])):
        rows.append(f"| {k} | {len(lat)} | {statistics.median(lat):.2f} | {lat[-1]:.2f} |")
    finite = [h for h in health if h != float("inf")]
    rows += ["", f"/health during the burst: {len(health)} probes, {len(health) - len(finite)} failed, "
             f"slowest {max(finite):.2f} s." if finite else "/health never answered during the burst."]
    if rss0:
        rows.append(f"Server process-tree RSS: {rss0:.0f} MB before, {rss1:.0f} MB after.")
    rows.append("<!-- /load:overload -->")
    return rows, kinds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--min-prompt-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmark/results/load.md")
    args = p.parse_args(argv)
    from sglang_shplb.models import prepare_model

    with tempfile.TemporaryDirectory(prefix="shplb-overload-") as tmp:
        plan = load.make_plan(1, Path(tmp), prepare_model())
        server = Server(["--shplb-plan", str(plan)], Path(tmp) / "server.log").wait_ready()
        try:
            rows, kinds = run(args, server.url, server.proc.pid)
            alive = server.proc.poll() is None
        finally:
            server.stop()
    load.write_section(args.out, rows, "overload")
    print("\n".join(rows))
    other = sum(v for k, v in kinds.items() if k != "served" and not k.startswith("refused"))
    return 0 if alive and not other else 1


if __name__ == "__main__":
    sys.exit(main())
