"""End-to-end serving speed with SGLang's own client: dense vs the default recipe, side by side in one run.

    OMP_NUM_THREADS=1 python benchmark/e2e_serving.py [--scenarios 1x8000 8x7000] [--output-len 64]
        [--variants default] [--seed 1] [--out benchmark/results/e2e_serving.md]

For each variant one real server starts through our launcher (`dense` = --shplb-dense, always run; `default` = no
S-HPLB flag, what `make serve` serves; `mean@B`; `NAME=FLAGS`, as benchmark/ruler_gate.py), and `python -m
sglang.bench_serving --backend sglang --dataset-name random-ids --tokenize-prompt` runs every scenario BxN against
it: B prompts of exactly N random token ids (sent as ids), all in flight at once (--max-concurrency B), --output-len
tokens each with EOS ignored, the prefix cache flushed after the client's warm-up request. Reported per scenario:
median time to first token (TTFT), time per output token (TPOT), inter-token latency (ITL) and output tokens/s,
dense and the variant, and dense / variant. Next to the ITL ratio: the bound a bytes-per-decode-step model gives
(`step_bytes`: the weights, plus the K/V every KV head reads, plus the selector's page metadata; at the context
half-way through the output), from the budgets the server solved (its recipe file, resolved as a worker does).

Rows live in --raw (`rows.Rows`) under their configuration (the client's arguments, the variant's flags, the
scenario, output length and seed), stamped with the code hash and commit that made them; a row is reused only when
its code is the current one (dense rows hash only the code a dense server runs), and only together with the other
rows of its scenario measured in the same run (ratios are read between rows measured side by side). --no-run renders
what is stored.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import write_result  # noqa: E402
from harness import Server  # noqa: E402
from rows import Rows, code_hash, ran_at, scope_of  # noqa: E402
from ruler_gate import variant_flags  # noqa: E402

METRICS = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "output_throughput")
CLIENT = "sglang.bench_serving --backend sglang --dataset-name random-ids --tokenize-prompt --flush-cache"


def scenario(text: str) -> tuple[int, int]:
    b, _, n = text.partition("x")
    if not (b.isdigit() and n.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: want BxN, B prompts of N tokens (e.g. 8x7000)")
    return int(b), int(n)


def bench(url: str, model: Path, batch: int, n: int, out_len: int, seed: int) -> dict:
    """One bench_serving run -> its JSON result (the METRICS and the rest)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.jsonl"
        cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url,
               "--model", str(model), "--tokenizer", str(model), "--dataset-name", "random-ids",
               "--random-input-len", str(n), "--random-output-len", str(out_len), "--random-range-ratio", "1.0",
               "--num-prompts", str(batch), "--max-concurrency", str(batch), "--seed", str(seed),
               "--tokenize-prompt", "--flush-cache", "--disable-tqdm", "--output-file", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0 or not out.is_file():
            raise SystemExit(f"bench_serving failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        row = json.loads(out.read_text().strip().splitlines()[-1])
    # a request the server refuses streams its error and may still count as completed: no first token then
    if row.get("completed") != batch or not row.get("median_ttft_ms") or not row.get("median_itl_ms"):
        raise SystemExit(f"bench_serving: {row.get('completed')} of {batch} requests completed, median TTFT "
                         f"{row.get('median_ttft_ms')} ms, ITL {row.get('median_itl_ms')} ms (a refused request?)")
    return row


def served_budgets(log: str) -> Path | None:
    """The budgets artifact the launcher's recipe line names (None: dense, or budgets given by flag)."""
    for line in log.splitlines():
        if "S-HPLB default recipe" in line and "artifact " in line:
            return Path(line.split("artifact ", 1)[1].split(" (--shplb-", 1)[0])
    return None


def step_bytes(budgets_file: Path | None, batch: int, ctx: int, weights: int) -> float:
    """Bytes one decode step moves: the weights, the K/V each (request, KV head) reads at context ctx, and its
    page metadata (selection.Selector.metadata_bytes), fp32. budgets_file None: dense."""
    import torch

    from sglang_shplb import selection as sel
    from sglang_shplb.config import ShplbConfig
    from sglang_shplb.serving import resolve

    L, Hkv, D, elem = 30, 3, 64, 4                                  # SmolLM2-135M, fp32 KV
    if budgets_file is None:
        return weights + batch * L * Hkv * 2 * D * elem * ctx
    cfg = ShplbConfig(budgets=str(budgets_file))
    rank = resolve(cfg, L, Hkv, 1, 0)
    P, floor = cfg.page_size, cfg.sink_pages + cfg.recent_pages
    n = -(-ctx // P)
    k = sel.pages_for_budget(rank.decode.double(), torch.tensor(float(n)), floor, rank.budget_ref(P))
    rule = sel.get_selector(rank.selector)
    kv = sum(min(int(x) * P, ctx) * 2 * D * elem for x in k.flatten())
    meta = sum(rule.metadata_bytes(n, int(x), P, D, elem) for x in k.flatten() if int(x) < n)
    return weights + batch * (kv + meta)


def config(name: str, sc: tuple[int, int], args) -> dict:
    return {"bench": "e2e_serving", "client": CLIENT, "flags": variant_flags(name), "batch": sc[0], "input": sc[1],
            "output_len": args.output_len, "seed": args.seed}


@cache
def variant_code(name: str) -> str:
    """The code a variant's rows are stamped with; the package is read once per variant, not once per row."""
    return code_hash(scope_of(variant_flags(name)))


def needs_run(args, rows: Rows, sc: tuple[int, int]) -> bool:
    """A scenario runs again, dense and every variant, when any of its rows is missing or stale, or when they were
    not measured in one run: a speed ratio is only read between rows measured side by side."""
    names = ["dense", *args.variants]
    got = [rows.get(config(n, sc, args), variant_code(n)) for n in names]
    return any(r is None for r in got) or len({r.get("run") for r in got}) > 1


def collect(args, rows: Rows, model: Path, weights: int) -> None:
    """Run every scenario that needs_run, dense and every variant; one server per variant."""
    todo = [s for s in args.scenarios if needs_run(args, rows, s)]
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    for name in ["dense", *args.variants] if todo else []:
        code = variant_code(name)
        srv = Server(variant_flags(name), Path(args.work) / f"e2e-{name}.log").wait_ready()
        try:
            budgets = served_budgets(srv.log())
            for batch, n in todo:
                result = bench(srv.url, model, batch, n, args.output_len, args.seed)   # one run per row
                row = {m: result[m] for m in METRICS}
                row["step_bytes"] = step_bytes(budgets, batch, n + args.output_len // 2, weights)
                rows.put(config(name, (batch, n), args), code, {**row, "run": run})
                print(f"{name} {batch}x{n}: " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS), flush=True)
        finally:
            srv.stop()


def report(args, rows: Rows) -> list[str]:
    out = ["| variant | scenario | TTFT s dense → variant (×) | TPOT ms (×) | ITL ms (×) | ITL bound × (bytes/step) "
           "| output tok/s (×) | ran at |", "|---|---|---|---|---|---|---|---|"]
    for name in args.variants:
        for batch, n in args.scenarios:
            de, ve = (rows.latest(config(x, (batch, n), args)) for x in ("dense", name))
            if de is None or ve is None:
                out.append(f"| {name} | {batch} × {n} | not run | | | | | |")
                continue
            d, v = de["row"], ve["row"]
            ttft, tpot, itl, tps = (d[m] / v[m] if v[m] else float("nan") for m in METRICS)
            at = sorted({ran_at(de, variant_code("dense")), ran_at(ve, variant_code(name))})
            out.append(f"| {name} | {batch} × {n} | {d['median_ttft_ms'] / 1e3:.1f} → {v['median_ttft_ms'] / 1e3:.1f} "
                       f"({ttft:.2f}×) | {d['median_tpot_ms']:.0f} → {v['median_tpot_ms']:.0f} ({tpot:.2f}×) | "
                       f"{d['median_itl_ms']:.0f} → {v['median_itl_ms']:.0f} ({itl:.2f}×) | "
                       f"{d['step_bytes'] / v['step_bytes']:.2f}× | {d['output_throughput']:.1f} → "
                       f"{v['output_throughput']:.1f} ({1 / tps:.2f}×) | {', '.join(at)} |")
    return out


def plot(args, rows: Rows) -> None:
    """TTFT and TPOT against prompt length at batch 1, dense and each variant: e2e_ttft.png, e2e_tpot.png."""
    from plots import line_plot

    single = sorted(n for b, n in args.scenarios if b == 1)
    for metric, scale, what in (("median_ttft_ms", 1e-3, "median TTFT (s)"), ("median_tpot_ms", 1, "median TPOT (ms)")):
        series = {}
        for name in ["dense", *args.variants]:
            pts = [(n, e["row"][metric] * scale) for n in single
                   if (e := rows.latest(config(name, (1, n), args))) is not None]
            if pts:
                series[name] = pts
        if len(series) > 1:
            line_plot(Path(args.out).with_name(f"e2e_{metric.split('_')[1]}.png"), series, "prompt tokens (batch 1)",
                      what, "End to end through the server (SmolLM2-135M, CPU)", hline=None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", type=scenario, nargs="+", default=[(1, 8000), (8, 7000)],
                   help="BxN: B prompts of N tokens; N + --output-len must fit the model's context (8192)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--raw", default=str(ROOT / "benchmark/results/raw/e2e_serving.json"))
    p.add_argument("--no-run", action="store_true", help="only render the stored rows")
    p.add_argument("--work", default="/tmp/e2e_serving", help="server logs")
    p.add_argument("--out", default=str(ROOT / "benchmark/results/e2e_serving.md"))
    args = p.parse_args()
    from sglang_shplb.models import prepare_model

    model = prepare_model()
    context = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    too_long = [f"{b}x{n}" for b, n in args.scenarios if n + args.output_len > context]
    if too_long:
        p.error(f"scenarios {too_long}: prompt + {args.output_len} output tokens exceed the model's context "
                f"({context}); use a shorter N")
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    rows = Rows(args.raw)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if not args.no_run:
        collect(args, rows, model, weights)
    write_result(args.out, "End to end: SGLang's bench_serving through the server, dense vs the default",
                 f"SmolLM2-135M, one server at a time on this machine (OMP_NUM_THREADS=1), random-ids prompts, "
                 f"{args.output_len} output tokens, EOS ignored, seed {args.seed}. Medians over requests (TTFT, "
                 "TPOT) and over inter-token gaps (ITL); × = dense / variant (output tok/s: variant / dense). ITL "
                 "bound: the bytes-per-step model's dense / variant at the context half-way through the output. "
                 "Ran at: the commit of the rows (dense and variant).", report(args, rows),
                 "OMP_NUM_THREADS=1 python benchmark/e2e_serving.py " + " ".join(a for a in sys.argv[1:]
                                                                                 if a != "--no-run"))
    plot(args, rows)


if __name__ == "__main__":
    main()
