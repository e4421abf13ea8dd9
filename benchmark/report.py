"""Run the short version of every benchmark and write `results/SUMMARY.md`.

    python benchmark/report.py [--only placement quality ...] [--skip retrieval ...]

Each benchmark runs as its own process with small sizes, writing its table under
`results/short/` (not committed); SUMMARY.md collects those tables with the machine, date and commit, and links
the full runs committed beside it. Ratios are measured side by side within each script, so they
hold on a noisy machine; absolute times do not. Takes ~20 min on the 2-core CPU machine.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import machine_line  # noqa: E402

RESULTS = ROOT / "benchmark" / "results"
SHORT = RESULTS / "short"
# name -> (script, short arguments, what the headline ratio means)
BENCHMARKS = {
    "budget_methods": ("budget_methods.py", [], "predicted worst-head recovery per budget method"),
    "placement": ("placement.py", [], "max/mean rank load per placement method (1.00 = perfectly balanced)"),
    "balance": ("balance.py", ["--no-timing"], "budgets at equal step time: step time vs uniform and predicted "
                "worst / mean recovery of uniform, optimal+place (today) and the joint solver"),
    "attention_cpu": ("attention_cpu.py", ["--contexts", "8192", "--batches", "1", "8", "--repeats", "5"],
                      "decode attention per layer, shplb 10% vs torch_native dense"),
    "prefill_cpu": ("prefill_cpu.py", ["--contexts", "8192", "--repeats", "2", "--ttft-contexts", "8000",
                                       "--ttft-repeats", "1"],
                    "prefill attention and time to first token, sparse prefill 10% vs dense"),
    "serve_cpu": ("serve_cpu.py", ["--contexts", "8000", "--new-tokens", "32"],
                  "server decode tok/s, shplb 10% vs dense"),
    "quality": ("quality.py", ["--contexts", "1024", "--means", "0.1", "--methods", "uniform", "optimal", "bubbles"],
                "perplexity and top-1 agreement vs dense under decode-time page selection"),
    "selector": ("selector.py", ["--contexts", "2048", "--texts", "1", "--queries", "8", "--needle-contexts",
                                 "--selectors", "quest_sum", "quest_max", "two_stage4"],
                 "recall of the oracle's attention mass per page selector at equal pages read"),
    "retrieval": ("retrieval.py", ["--contexts", "1024", "--seeds", "2", "--parallel", "2", "--variants", "dense",
                                   "uniform@0.1", "optimal@0.1"],
                  "RULER-style retrieval via the server, score vs dense"),
    "load": ("load.py", ["--requests", "48", "--concurrency", "8", "--rounds", "2", "--max-prompt-tokens", "2000"],
             "requests under load: failures, latency, memory"),
}


def run_one(name: str) -> tuple[bool, float]:
    script, args, _ = BENCHMARKS[name]
    out = SHORT / f"{name}.md"
    extra = ["--raw", str(SHORT / f"{name}_raw.json")] if name in ("retrieval", "selector") else []
    cmd = [sys.executable, str(ROOT / "benchmark" / script), *args, *extra, "--out", str(out)]
    print(f"[report] {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
    return ok, time.time() - t


def section(name: str, ok: bool, seconds: float) -> list[str]:
    script, args, what = BENCHMARKS[name]
    lines = [f"## {name} — {what}", "",
             f"`python benchmark/{script} {' '.join(args)}` ({seconds / 60:.1f} min; full run: "
             f"[results/{name}.md]({name}.md))", ""]
    out = SHORT / f"{name}.md"
    if not ok or not out.exists():
        return lines + ["**FAILED** — see the script's output; no table was written.", ""]
    table = [ln for ln in out.read_text().splitlines() if ln.startswith("|")]
    return lines + table + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS))
    p.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[])
    p.add_argument("--out", default=str(RESULTS / "SUMMARY.md"))
    args = p.parse_args()
    SHORT.mkdir(parents=True, exist_ok=True)
    for cache in SHORT.glob("*.json"):  # quality/retrieval resume from these: a report measures afresh
        cache.unlink()
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    body, load = [], [os.getloadavg()[0]]
    for name in names:
        body += section(name, *run_one(name))
        load.append(os.getloadavg()[0])
    text = ["# Benchmark summary (short runs)", "",
            "Every ratio below was measured side by side in one run of its script on this machine "
            "(shared and noisy: absolute times mean little). No GPU was available to these runs; "
            "`benchmark/gpu_check.py` holds the GPU checks.", "", machine_line(),
            f"1-min load average during the runs: {min(load):.1f}–{max(load):.1f} (2 cores; above 2 means other "
            "processes shared the machine and the timing ratios are noisier).", "",
            f"Reproduce: `python benchmark/report.py{' --only ' + ' '.join(names) if args.only else ''}`", "", *body]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))
    failed = [ln for ln in body if ln.startswith("**FAILED**")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
