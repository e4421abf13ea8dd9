"""The public quality gate: lm-evaluation-harness's offline RULER tasks through the served endpoint, dense vs variants.

    python benchmark/ruler_gate.py [--tasks niah_single_1 niah_multikey_3 ...] [--lengths 2048 4096 8192]
        [--limit 20] [--variants default mean@0.05] [--out benchmark/results/ruler_gate.md]

Tasks the project never tuned to (lm-eval 0.4.13's RULER generators, no download): niah_single_1,
niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe. lm-eval runs in its own venv
(--lmeval-venv, made on first use; never the serving venv) against the completions API of a real server started
through our launcher, one lm_eval call per task and length, greedy, the first --limit prompts lm-eval generates.
Variants: `dense` (always run: --shplb-dense), `default` (the launcher with no S-HPLB flag: what `make serve`
serves), `mean@B` (the default recipe at mean budget B), or `NAME=FLAGS` (any launcher flags, quoted).

Every prompt's answer is kept in --raw with what made it: the package's code hash, the variant's flags, the task,
length and limit; a row is reused only when all of them match (so an edit to the package re-runs its rows).
The report gives per task and length: dense and variant scores, prompts lost and gained, and a paired 95%
bootstrap interval of the difference; a task/length is a gate where dense answers >= 50% of it; pooled over gates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmark")]
from common import write_result  # noqa: E402
from conftest import Server  # noqa: E402  (the launcher wrapper the tests use)

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
LMEVAL = "lm-eval[api,ruler]==0.4.13"


def code_hash() -> str:
    """sha256 over the package and kernels (what decides an answer), not over benchmarks or tests."""
    h = hashlib.sha256()
    for base in ("python/sglang_shplb", "kernels"):
        for f in sorted((ROOT / base).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".safetensors", ".json"):
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


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


def collect(args, raw: dict, key_of) -> None:
    """Run every (variant, task, length) whose rows are missing or stale; one server per variant."""
    from sglang_shplb.models import prepare_model

    ckpt, venv = prepare_model(), Path(args.lmeval_venv)
    lmeval_python(venv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for name in ["dense", *args.variants]:
        todo = [(t, n) for t in args.tasks for n in args.lengths if key_of(name, t, n) not in raw]
        if not todo:
            continue
        srv = Server(variant_flags(name), Path(args.work) / f"{name.replace('/', '_')}.log").wait_ready()
        try:
            for task, n in todo:
                rows = run_lmeval(venv, srv.url, ckpt, task, n, args.limit, Path(args.work) / name / f"{task}-{n}")
                raw[key_of(name, task, n)] = {"variant": name, "task": task, "length": n, "rows": rows}
                Path(args.raw).write_text(json.dumps(raw, indent=1))
                print(f"{name} {task}@{n}: {sum(r['score'] for r in rows):.0f}/{len(rows)}", flush=True)
        finally:
            srv.stop()


def report(args, raw: dict, key_of) -> list[str]:
    lines = ["| variant | task | length | dense | variant | lost | gained | Δ pt, 95% paired interval | gate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.variants:
        pool_d, pool_v = [], []
        for task in args.tasks:
            for n in args.lengths:
                d, v = raw[key_of("dense", task, n)]["rows"], raw[key_of(name, task, n)]["rows"]
                ds, vs = [r["score"] for r in d], [r["score"] for r in v]
                gate = sum(ds) >= 0.5 * len(ds)
                lost, gained, lo, hi = paired(ds, vs)
                if gate:
                    pool_d += ds
                    pool_v += vs
                lines.append(f"| {name} | {task} | {n} | {sum(ds):.0f}/{len(ds)} | {sum(vs):.0f}/{len(vs)} | {lost} | "
                             f"{gained} | {lo:+.1f} … {hi:+.1f} | {'yes' if gate else 'no (dense < 50%)'} |")
        if pool_d:
            lost, gained, lo, hi = paired(pool_d, pool_v)
            lines.append(f"| **{name}** | **all gates** | | {sum(pool_d):.0f}/{len(pool_d)} | {sum(pool_v):.0f}/"
                         f"{len(pool_v)} | {lost} | {gained} | {lo:+.1f} … {hi:+.1f} | net loss "
                         f"{100 * (lost - gained) / len(pool_d):.1f}% |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--limit", type=int, default=20, help="the first N prompts lm-eval generates per task and length")
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--raw", default=str(ROOT / "benchmark/results/raw/ruler_gate.json"))
    p.add_argument("--work", default="/tmp/ruler_gate", help="server logs and lm-eval outputs")
    p.add_argument("--lmeval-venv", default=str(Path(os.environ.get("SGLANG_SHPLB_HOME", Path.home() / ".cache" /
                                                                     "sglang_shplb")) / "lmeval-venv"))
    p.add_argument("--out", default=str(ROOT / "benchmark/results/ruler_gate.md"))
    args = p.parse_args()
    code = code_hash()

    def key_of(name: str, task: str, n: int) -> str:
        return json.dumps([code, variant_flags(name), task, n, args.limit])

    raw = json.loads(Path(args.raw).read_text()) if Path(args.raw).is_file() else {}
    raw = {k: v for k, v in raw.items() if json.loads(k)[0] == code}     # rows of other code are stale
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    collect(args, raw, key_of)
    command = "python benchmark/ruler_gate.py " + " ".join(sys.argv[1:])
    write_result(args.out, "Public gate: lm-eval RULER through the server, dense vs variants",
                 f"lm-eval 0.4.13 offline RULER tasks, completions API, greedy, the first {args.limit} prompts per "
                 f"task and length; package code {code}. Δ: variant minus dense in points, paired over prompts.",
                 report(args, raw, key_of), command)


if __name__ == "__main__":
    main()
