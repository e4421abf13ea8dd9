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

Rows are cached in --raw, keyed by the package code hash (ruler_gate.code_hash), the variant's flags, the
scenario, the output length and the seed; a row is reused only when all of them match.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmark")]
from common import write_result  # noqa: E402
from conftest import Server  # noqa: E402
from ruler_gate import code_hash, variant_flags  # noqa: E402

METRICS = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "output_throughput")


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


def collect(args, raw: dict, key_of, model: Path) -> dict:
    """Run every (variant, scenario) whose row is missing; remember each variant's budgets file."""
    files = {}
    for name in ["dense", *args.variants]:
        todo = [s for s in args.scenarios if key_of(name, s) not in raw]
        if not todo:
            files[name] = raw.get(f"budgets {name}")
            continue
        srv = Server(variant_flags(name), Path(args.work) / f"e2e-{name}.log").wait_ready()
        try:
            path = served_budgets(srv.log())
            files[name] = str(path) if path else None
            raw[f"budgets {name}"] = files[name]
            for batch, n in todo:
                row = bench(srv.url, model, batch, n, args.output_len, args.seed)
                raw[key_of(name, (batch, n))] = {m: row[m] for m in METRICS}
                Path(args.raw).write_text(json.dumps(raw, indent=1))
                print(f"{name} {batch}x{n}: " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS), flush=True)
        finally:
            srv.stop()
    return files


def report(args, raw: dict, key_of, files: dict, weights: int) -> list[str]:
    rows = ["| variant | scenario | TTFT s dense → variant (×) | TPOT ms (×) | ITL ms (×) | ITL bound × (bytes/step) "
            "| output tok/s (×) |", "|---|---|---|---|---|---|---|"]
    for name in args.variants:
        for batch, n in args.scenarios:
            d, v = raw[key_of("dense", (batch, n))], raw[key_of(name, (batch, n))]
            ctx = n + args.output_len // 2
            f = files.get(name)
            bound = step_bytes(None, batch, ctx, weights) / step_bytes(Path(f) if f else None, batch, ctx, weights)
            ttft, tpot, itl, tps = (d[m] / v[m] if v[m] else float("nan") for m in METRICS)
            rows.append(f"| {name} | {batch} × {n} | {d['median_ttft_ms'] / 1e3:.1f} → {v['median_ttft_ms'] / 1e3:.1f} "
                        f"({ttft:.2f}×) | {d['median_tpot_ms']:.0f} → {v['median_tpot_ms']:.0f} ({tpot:.2f}×) | "
                        f"{d['median_itl_ms']:.0f} → {v['median_itl_ms']:.0f} ({itl:.2f}×) | {bound:.2f}× | "
                        f"{d['output_throughput']:.1f} → {v['output_throughput']:.1f} ({1 / tps:.2f}×) |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", type=scenario, nargs="+", default=[(1, 8000), (8, 7000)],
                   help="BxN: B prompts of N tokens; N + --output-len must fit the model's context (8192)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--raw", default=str(ROOT / "benchmark/results/raw/e2e_serving.json"))
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
    code = code_hash()

    def key_of(name: str, sc: tuple[int, int]) -> str:
        return json.dumps([code, variant_flags(name), list(sc), args.output_len, args.seed])

    raw = json.loads(Path(args.raw).read_text()) if Path(args.raw).is_file() else {}
    raw = {k: v for k, v in raw.items() if k.startswith("budgets ") or json.loads(k)[0] == code}
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    files = collect(args, raw, key_of, model)
    Path(args.raw).write_text(json.dumps(raw, indent=1))
    write_result(args.out, "End to end: SGLang's bench_serving through the server, dense vs the default",
                 f"SmolLM2-135M, one server at a time on this machine (OMP_NUM_THREADS=1), random-ids prompts, "
                 f"{args.output_len} output tokens, EOS ignored, seed {args.seed}; package code {code}. Medians over "
                 "requests (TTFT, TPOT) and over inter-token gaps (ITL); × = dense / variant (output tok/s: variant "
                 "/ dense). ITL bound: the bytes-per-step model's dense / variant at the context half-way through "
                 "the output.", report(args, raw, key_of, files, weights),
                 "OMP_NUM_THREADS=1 python benchmark/e2e_serving.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
