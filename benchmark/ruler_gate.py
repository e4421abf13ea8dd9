"""The public quality gate: lm-evaluation-harness's offline RULER tasks through the served endpoint, dense vs variants.

    python benchmark/ruler_gate.py [--tasks niah_single_1 niah_multikey_3 ...] [--lengths 2048 4096 8192]
        [--limit 20] [--variants default mean@0.05] [--out benchmark/results/ruler_gate.md]

Tasks the project never tuned to (lm-eval 0.4.13's RULER generators, no download): niah_single_1,
niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe. lm-eval runs in its own venv
(--lmeval-venv, made on first use; never the serving venv) against the completions API of a real server started
through our launcher, one lm_eval call per task and length, greedy, the first --limit prompts lm-eval generates.
Dense runs first; a variant runs only where dense answers >= 50% (a gate) unless --all. Variants: `dense`
(--shplb-dense), `default` (the launcher with no S-HPLB flag: what `make serve` serves), `mean@B` (the default
recipe at mean budget B), or `NAME=FLAGS` (any launcher flags, quoted).

Every prompt's answer is kept in --raw (`rows.Rows`) under its configuration (lm-eval version, the variant's
flags, task, length, limit) and stamped with the code hash and commit that made it; a row is reused only when its
code is the current one (an edit to the selection code re-runs the sparse rows, not dense's). --no-run renders
what is stored, marking rows of older code with their commit.
The report gives per task and length: dense and variant scores, prompts lost and gained, and a paired 95%
bootstrap interval of the difference; a task/length is a gate where dense answers >= 50% of it; pooled over gates.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import write_result  # noqa: E402
from harness import Server  # noqa: E402
from rows import Rows, code_hash, ran_at, scope_of  # noqa: E402

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
LMEVAL = "lm-eval[api,ruler]==0.4.13"


def variant_flags(name: str) -> list[str]:
    if name == "dense":
        return ["--shplb-dense"]
    if name == "default":
        return []
    if name.startswith("mean@"):
        return ["--shplb-mean-budget", name[5:]]
    if "=" in name:
        return shlex.split(name.split("=", 1)[1])
    raise SystemExit(f"unknown variant {name!r}: dense, default, mean@B or NAME=FLAGS")


def lmeval_python(venv: Path) -> Path:
    """lm-eval's own interpreter, installing it into `venv` on first use."""
    py = venv / "bin" / "python"
    if not (venv / "bin" / "lm_eval").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", LMEVAL, "transformers"], check=True)
    return py


class Refused(Exception):
    """The server refused one of a cell's prompts as bad input (e.g. prompt + max_gen_toks over the model's
    context): no variant can answer it, so the cell is recorded as refused, not retried, and is no gate."""


def run_lmeval(venv: Path, url: str, ckpt: Path, task: str, length: int, limit: int, out: Path) -> list[dict]:
    """One lm_eval call: [{doc_id, target, answer, score}] for the first `limit` prompts."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = (f"model=default,base_url={url}/v1/completions,tokenizer={ckpt},num_concurrent=1,max_retries=2,"
            "tokenized_requests=False,timeout=3600")
    cmd = [str(venv / "bin" / "lm_eval"), "run", "--model", "local-completions", "--model_args", args,
           "--tasks", task, "--metadata", json.dumps({"max_seq_lengths": [length]}), "--limit", str(limit),
           "--output_path", str(out), "--log_samples"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "lmeval.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 and "400 Client Error" in p.stderr:
        raise Refused(f"the server refused a prompt (HTTP 400) and lm-eval stopped the cell; see {out / 'lmeval.log'}")
    if p.returncode != 0:
        raise RuntimeError(f"lm_eval failed for {task}@{length} (see {out / 'lmeval.log'}): {p.stderr[-500:]}")
    (samples,) = sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1:]
    rows = []
    for line in samples.read_text().splitlines():
        d = json.loads(line)
        rows.append({"doc_id": int(d["doc_id"]), "target": d["target"], "answer": d["filtered_resps"][0],
                     "score": float(d[str(length)])})
    samples.rename(samples.with_suffix(".done"))     # the next call's glob finds only its own
    return sorted(rows, key=lambda r: r["doc_id"])


def paired(dense: list[float], variant: list[float]) -> tuple[int, int, float, float]:
    """(lost, gained, 95% paired-bootstrap interval of the mean difference in points)."""
    d = [v - x for x, v in zip(dense, variant)]
    rng = random.Random(0)
    means = sorted(100 * sum(rng.choices(d, k=len(d))) / len(d) for _ in range(4000))
    return sum(x < 0 for x in d), sum(x > 0 for x in d), means[99], means[3899]


def config(name: str, task: str, n: int, limit: int) -> dict:
    return {"bench": "ruler_gate", "lm_eval": LMEVAL, "flags": variant_flags(name), "task": task, "length": n,
            "limit": limit}


def collect(args, rows: Rows) -> None:
    """Run every (variant, task, length) whose row is missing or stale; one server per variant."""
    from sglang_shplb.models import prepare_model

    ckpt, venv = prepare_model(), Path(args.lmeval_venv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for name in ["dense", *args.variants]:
        code = code_hash(scope_of(variant_flags(name)))
        todo = [(t, n) for t, n in cells(args)
                if rows.get(config(name, t, n, args.limit), code) is None and (name == "dense" or args.all
                                                                                or is_gate(rows, t, n, args.limit))]
        if not todo:
            continue
        lmeval_python(venv)
        srv = Server(variant_flags(name), Path(args.work) / f"{name.replace('/', '_')}.log").wait_ready()
        try:
            for task, n in todo:
                try:
                    answers = run_lmeval(venv, srv.url, ckpt, task, n, args.limit,
                                         Path(args.work) / name / f"{task}-{n}")
                except Refused as e:
                    answers = {"refused": str(e)}
                rows.put(config(name, task, n, args.limit), code, answers)
                print(f"{name} {task}@{n}: {score(rows.latest(config(name, task, n, args.limit)))}", flush=True)
        finally:
            srv.stop()


def cells(args) -> list[tuple[str, int]]:
    """Every (task, length) asked for, less those --exclude names (TASK@LENGTH)."""
    return [(t, n) for t in args.tasks for n in args.lengths if f"{t}@{n}" not in args.exclude]


def is_gate(rows: Rows, task: str, n: int, limit: int) -> bool:
    """Dense answers at least half of this task and length (a sparse variant can be judged on it)."""
    entry = rows.latest(config("dense", task, n, limit))
    return entry is not None and not refused(entry) and \
        sum(r["score"] for r in entry["row"]) >= 0.5 * len(entry["row"])


def refused(entry: dict) -> bool:
    return isinstance(entry["row"], dict)


def score(entry: dict | None) -> str:
    if entry is None or refused(entry):
        return "—" if entry is None else "refused (HTTP 400)"
    return f"{sum(r['score'] for r in entry['row']):.0f}/{len(entry['row'])}"


def report(args, rows: Rows) -> list[str]:
    """One row per task and length: dense, then each variant's score (prompts lost and gained against dense, the
    paired 95% interval of the difference in points); pooled over the gates at the end."""
    head = "| task | length | dense | " + " | ".join(f"{v} (−lost +gained; Δ pt 95%)" for v in args.variants)
    lines = [head + " | gate | ran at |", "|---|---|---|" + "---|" * len(args.variants) + "---|---|"]
    pools = {v: ([], []) for v in args.variants}
    codes = {scope: code_hash(scope) for scope in ("dense", "sparse")}     # read the package once, not per cell

    def at_(entry: dict) -> str:
        return ran_at(entry, codes[scope_of(entry["config"]["flags"])])
    for task, n in cells(args):
        de = rows.latest(config("dense", task, n, args.limit))
        gate = de is not None and is_gate(rows, task, n, args.limit)
        cols, at = [], set() if de is None else {at_(de)}
        for name in args.variants:
            ve = rows.latest(config(name, task, n, args.limit))
            if not (gate or args.all):   # variants run only on gates: a row left from an older gate set is not shown
                cols.append("—")
                continue
            if de is None or ve is None or refused(de) or refused(ve):
                cols.append("—" if ve is None else score(ve))
                continue
            ds, vs = [r["score"] for r in de["row"]], [r["score"] for r in ve["row"]]
            lost, gained, lo, hi = paired(ds, vs)
            cols.append(f"{score(ve)} (−{lost} +{gained}; {lo:+.1f} … {hi:+.1f})")
            at.add(at_(ve))
            if gate:
                pools[name][0].extend(ds)
                pools[name][1].extend(vs)
        why = "yes" if gate else "not run" if de is None else \
            "no (the server refused a prompt: HTTP 400)" if refused(de) else "no (dense < 50%)"
        lines.append(f"| {task} | {n} | {score(de)} | {' | '.join(cols)} | {why} | {', '.join(sorted(at))} |")
    for name, (ds, vs) in pools.items():
        if ds:
            lost, gained, lo, hi = paired(ds, vs)
            lines.append(f"| **all gates, {name}** | | {sum(ds):.0f}/{len(ds)} | {sum(vs):.0f}/{len(vs)} (−{lost} "
                         f"+{gained}; {lo:+.1f} … {hi:+.1f}); net loss {100 * (lost - gained) / len(ds):.1f}% of "
                         f"prompts |" + " |" * (len(args.variants) - 1) + " | |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--exclude", nargs="+", default=[], metavar="TASK@LENGTH", help="leave these cells out")
    p.add_argument("--limit", type=int, default=20, help="the first N prompts lm-eval generates per task and length")
    p.add_argument("--variants", nargs="*", default=["default"])
    p.add_argument("--raw", default=str(ROOT / "benchmark/results/raw/ruler_gate.json"))
    p.add_argument("--no-run", action="store_true", help="only render the stored rows")
    p.add_argument("--all", action="store_true", help="run variants where dense is under 50%% too (not gates)")
    p.add_argument("--work", default="/tmp/ruler_gate", help="server logs and lm-eval outputs")
    p.add_argument("--lmeval-venv", default=str(Path(os.environ.get("SGLANG_SHPLB_HOME", Path.home() / ".cache" /
                                                                     "sglang_shplb")) / "lmeval-venv"))
    p.add_argument("--out", default=str(ROOT / "benchmark/results/ruler_gate.md"))
    args = p.parse_args()
    rows = Rows(args.raw)
    if not args.no_run:
        collect(args, rows)
    command = "python benchmark/ruler_gate.py " + " ".join(a for a in sys.argv[1:] if a != "--no-run")
    write_result(args.out, "Public gate: lm-eval RULER through the server, dense vs variants",
                 f"lm-eval 0.4.13 offline RULER tasks, completions API, greedy, the first {args.limit} prompts per "
                 "task and length. Δ: variant minus dense in points, paired over prompts. Ran at: the commit of the "
                 "rows (dense and variant).", report(args, rows), command)


if __name__ == "__main__":
    main()
