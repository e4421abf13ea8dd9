"""Load test of the CPU server with S-HPLB on (a plan applied): failures, latency, tokens/s and
whether the server's memory settles across rounds.

    python benchmark/load.py [--requests 500] [--concurrency 32] [--rounds 5] [--tp 1|3]
        [--max-prompt-tokens 6000] [--max-tokens 16] [--seed 0] [--url URL] [--out benchmark/results/load.md]

Makes budgets (optimal, mean 0.1, committed profile) and a plan for --tp with the project CLIs,
starts our launcher with `--shplb-plan` (or uses --url), and sends --requests requests split over
--rounds rounds, --concurrency at a time: prompts cut from the Canterbury corpus at seeded offsets
(75% short chat of 8-256 tokens, 20% 256-1024, 5% 1024 up to --max-prompt-tokens), chat and
completions, streaming and not, greedy with `ignore_eos` so every answer has exactly --max-tokens
tokens. Every response is checked for shape (and every stream for chunks, finish and usage).
Per round: failures, p50/p99 latency, output tokens/s, and the RSS of the server's whole process
tree (end of round and peak). Writes/updates the `tp N` section of --out.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import PROFILE, machine_line  # noqa: E402
from harness import Server  # noqa: E402

# (share, min, max tokens): mostly chat, some documents. Prefill runs at ~250 tok/s on 2 cores
# (serve_cpu.md: 2k tokens in 7.8 s, 8k in 60 s), so this mix (mean ~400 tokens) keeps 500
# requests near 15 min; a 6k prompt alone takes ~30 s.
LENGTH_MIX = ((0.75, 8, 256), (0.2, 256, 1024), (0.05, 1024, None))
CHAT_SHARE, STREAM_SHARE = 0.7, 0.5


# ------------------------------------------------------------------ workload
@dataclass
class Job:
    kind: str      # "chat" | "completions"
    stream: bool
    text: str
    prompt_tokens: int


_corpus_ids: dict[str, list[int]] = {}


def corpus_ids(tokenizer) -> list[int]:
    """The Canterbury texts as one token list (cached: tokenizing 1.2 MB takes seconds)."""
    from sglang_shplb.models import corpus_files

    key = tokenizer.name_or_path
    if key not in _corpus_ids:
        _corpus_ids[key] = [t for f in corpus_files("canterbury")
                            for t in tokenizer(f.read_text(errors="replace")).input_ids]
    return _corpus_ids[key]


def make_jobs(n: int, seed: int, max_prompt_tokens: int, tokenizer) -> list[Job]:
    """Seeded prompts: token windows of the corpus, decoded back to text."""
    ids = corpus_ids(tokenizer)
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        share_roll, acc = rng.random(), 0.0
        for share, lo, hi in LENGTH_MIX:
            acc += share
            if share_roll <= acc:
                break
        hi = min(hi or max_prompt_tokens, max_prompt_tokens)
        length = rng.randint(min(lo, hi), hi)
        start = rng.randrange(0, len(ids) - length)
        jobs.append(Job("chat" if rng.random() < CHAT_SHARE else "completions", rng.random() < STREAM_SHARE,
                        tokenizer.decode(ids[start:start + length]), length))
    return jobs


# ------------------------------------------------------------------ one request
@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    error: str = ""


def _body(job: Job, max_tokens: int) -> tuple[str, dict]:
    common = {"model": "default", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
              "stream": job.stream}
    if job.stream:
        common["stream_options"] = {"include_usage": True}
    if job.kind == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": job.text}]}
    return "/v1/completions", {**common, "prompt": job.text}


def check_reply(job: Job, reply: dict, max_tokens: int) -> str:
    """'' when the non-streamed reply is well-formed, else what is wrong."""
    want = "chat.completion" if job.kind == "chat" else "text_completion"
    choice = (reply.get("choices") or [{}])[0]
    text = choice.get("message", {}).get("content") if job.kind == "chat" else choice.get("text")
    if reply.get("object") != want or not isinstance(text, str) or not text:
        return f"bad shape: {str(reply)[:200]}"
    if choice.get("finish_reason") not in ("length", "stop"):
        return f"finish_reason {choice.get('finish_reason')!r}"
    if reply.get("usage", {}).get("completion_tokens") != max_tokens:
        return f"usage {reply.get('usage')} != {max_tokens} tokens"
    return ""


def read_stream(job: Job, r: requests.Response, t0: float, max_tokens: int) -> tuple[str, float | None, int]:
    """Check a server-sent-event stream; returns (problem, ttft, completion tokens)."""
    want = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    ttft, text, finish, usage, done = None, "", None, None, False
    for line in r.iter_lines():
        if not line:
            continue
        if line == b"data: [DONE]":
            done = True
            continue
        if not line.startswith(b"data: "):
            return f"not an SSE line: {line[:100]!r}", ttft, 0
        chunk = json.loads(line[6:])
        if "error" in chunk or chunk.get("object") != want:
            return f"bad chunk: {str(chunk)[:200]}", ttft, 0
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            piece = c.get("delta", {}).get("content") if job.kind == "chat" else c.get("text")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += piece
            finish = c.get("finish_reason") or finish
    tokens = (usage or {}).get("completion_tokens", 0)
    if not done or not text or finish not in ("length", "stop") or tokens != max_tokens:
        return f"stream incomplete: done={done} text={len(text)} finish={finish} tokens={tokens}", ttft, tokens
    return "", ttft, tokens


_local = threading.local()


def send(url: str, job: Job, max_tokens: int, timeout: float) -> Result:
    session = getattr(_local, "session", None) or requests.Session()
    _local.session = session
    path, body = _body(job, max_tokens)
    t0 = time.perf_counter()
    try:
        with session.post(url + path, json=body, stream=job.stream, timeout=timeout) as r:
            if r.status_code != 200:
                return Result(False, time.perf_counter() - t0, error=f"HTTP {r.status_code}: {r.text[:200]}")
            if job.stream:
                problem, ttft, tokens = read_stream(job, r, t0, max_tokens)
            else:
                problem, ttft, tokens = check_reply(job, r.json(), max_tokens), None, max_tokens
    except (requests.RequestException, ValueError) as e:
        return Result(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:200])
    return Result(not problem, time.perf_counter() - t0, ttft, tokens if not problem else 0, problem)


# ------------------------------------------------------------------ rounds and memory
def tree_rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@dataclass
class Round:
    results: list[Result]
    wall: float
    rss_end: float
    rss_peak: float
    errors: list[str] = field(default_factory=list)


def run_round(url: str, jobs: list[Job], concurrency: int, max_tokens: int, pid: int | None,
              timeout: float = 900) -> Round:
    peak, stop = [0.0], threading.Event()

    def sample():  # the peak between end-of-round readings
        while not stop.wait(1.0):
            peak[0] = max(peak[0], tree_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    if pid:
        sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda j: send(url, j, max_tokens, timeout), jobs))
    wall = time.perf_counter() - t0
    stop.set()
    end = tree_rss_mb(pid) if pid else 0.0
    return Round(results, wall, end, max(peak[0], end), [r.error for r in results if not r.ok])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(rounds: list[Round]) -> dict:
    res = [r for rd in rounds for r in rd.results]
    ok = [r for r in res if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    settled = [rd.rss_end for rd in rounds[1:]] or [rounds[0].rss_end]
    return {"requests": len(res), "failures": len(res) - len(ok),
            "p50": pct([r.latency for r in ok], 0.5), "p99": pct([r.latency for r in ok], 0.99),
            "ttft_p50": pct(ttfts, 0.5), "tok_s": sum(r.tokens for r in ok) / sum(rd.wall for rd in rounds),
            "rss_growth": (settled[-1] - settled[0]) / settled[0] if settled[0] else 0.0}


# ------------------------------------------------------------------ server and report
def make_plan(tp: int, out_dir: Path, model_path: Path) -> Path:
    """Budgets and plan through the project CLIs, exactly as a user would."""
    def cli(*args):
        subprocess.run([sys.executable, "-m", *map(str, args)], check=True, capture_output=True, timeout=300)

    cli("sglang_shplb.budget", "--profile", PROFILE, "--mean-budget", "0.1", "--out", out_dir / "budgets.json")
    cli("sglang_shplb.plan", "--budgets", out_dir / "budgets.json", "--tp", tp, "--model", model_path,
        "--out", out_dir / "plan.json")
    return out_dir / "plan.json"


def section(args, rounds: list[Round], s: dict, server_args: str, prompt_tokens: list[int]) -> list[str]:
    rows = [f"<!-- load:tp{args.tp} -->", f"## tp {args.tp}", "",
            f"{machine_line()} · server `{server_args}`", "",
            f"Reproduce: `python benchmark/load.py --tp {args.tp} --requests {args.requests} --concurrency "
            f"{args.concurrency} --rounds {args.rounds} --max-prompt-tokens {args.max_prompt_tokens} "
            f"--max-tokens {args.max_tokens} --seed {args.seed}`", "",
            f"Prompts: {len(prompt_tokens)} from {min(prompt_tokens)} to {max(prompt_tokens)} tokens "
            f"(mean {statistics.mean(prompt_tokens):.0f}); {args.max_tokens} output tokens each.", "",
            f"**{s['requests']} requests, {s['failures']} failures**; latency p50 {s['p50']:.2f} s, p99 "
            f"{s['p99']:.2f} s; first token p50 {s['ttft_p50']:.2f} s (streams); {s['tok_s']:.1f} output tok/s; "
            f"server RSS change from round 2 to the last: {100 * s['rss_growth']:+.1f}%", "",
            "| round | requests | failures | p50 s | p99 s | output tok/s | wall s | tree RSS end MB | peak MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, rd in enumerate(rounds, 1):
        lat = [r.latency for r in rd.results if r.ok]
        rows.append(f"| {i} | {len(rd.results)} | {len(rd.errors)} | {pct(lat, .5):.2f} | {pct(lat, .99):.2f} | "
                    f"{sum(r.tokens for r in rd.results) / rd.wall:.1f} | {rd.wall:.0f} | {rd.rss_end:.0f} | "
                    f"{rd.rss_peak:.0f} |")
    errors = sorted({e for rd in rounds for e in rd.errors})
    rows += ["", *(f"- failure: `{e}`" for e in errors[:10])] if errors else []
    return rows + [f"<!-- /load:tp{args.tp} -->"]


def write_section(path: Path, rows: list[str], key: str) -> None:
    """Replace section `key` (e.g. tp1, overload) of the results file, keeping its other complete sections; the
    head is always this code's (a file's old head may describe runs it no longer holds)."""
    head = ["# Load: S-HPLB CPU server (plan applied)", "",
            "Written by `benchmark/load.py`; one section per --tp. RSS is the sum over the server's "
            "process tree (launcher supervisor, SGLang main, scheduler(s), detokenizer). Latencies depend on what "
            "else shared the machine's cores; failures and memory are what to read."]
    old = path.read_text() if path.exists() else ""
    sections = {m.group(1): m.group(0) for m in re.finditer(r"<!-- load:(\S+) -->.*?<!-- /load:\1 -->", old, re.S)}
    sections[key] = "\n".join(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head) + "\n\n" + "\n\n".join(sections.values()) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-prompt-tokens", type=int, default=6000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="use this running server instead of starting one (no RSS then)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmark/results/load.md")
    return p.parse_args(argv)


def run(args, url: str, pid: int | None, server_args: str) -> dict:
    from transformers import AutoTokenizer

    from sglang_shplb.models import prepare_model

    tok = AutoTokenizer.from_pretrained(prepare_model())
    jobs = make_jobs(args.requests, args.seed, args.max_prompt_tokens, tok)
    per = -(-len(jobs) // args.rounds)
    rounds = []
    for i in range(args.rounds):
        rd = run_round(url, jobs[i * per:(i + 1) * per], args.concurrency, args.max_tokens, pid)
        rounds.append(rd)
        print(f"round {i + 1}/{args.rounds}: {len(rd.results)} requests, {len(rd.errors)} failures, "
              f"{rd.wall:.0f} s, tree RSS {rd.rss_end:.0f} MB (peak {rd.rss_peak:.0f})", flush=True)
    s = summarize(rounds)
    write_section(args.out, section(args, rounds, s, server_args, [j.prompt_tokens for j in jobs]), f"tp{args.tp}")
    print(f"wrote {args.out}: {s['failures']}/{s['requests']} failures, p50 {s['p50']:.2f} s, "
          f"p99 {s['p99']:.2f} s, {s['tok_s']:.1f} tok/s, RSS {100 * s['rss_growth']:+.1f}%")
    return {**s, "rounds": rounds}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.url:
        return 1 if run(args, args.url.rstrip("/"), None, f"--url {args.url}")["failures"] else 0
    from sglang_shplb.models import prepare_model

    with tempfile.TemporaryDirectory(prefix="shplb-load-") as tmp:
        plan = make_plan(args.tp, Path(tmp), prepare_model())
        server_args = ["--tp", str(args.tp), "--shplb-plan", str(plan)]
        server = Server(server_args, Path(tmp) / "server.log").wait_ready()
        try:
            s = run(args, server.url, server.proc.pid, " ".join(["--tp", str(args.tp), "--shplb-plan", "plan.json"]))
            tracebacks = server.log().count("Traceback")
            print(f"server log: {tracebacks} tracebacks")
        finally:
            server.stop()
    return 1 if s["failures"] or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
