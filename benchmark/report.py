"""One report, current by construction: run what is stale at HEAD and write `results/SUMMARY.md`.

    python benchmark/report.py [--only recipe quality speed balance reliability] [--no-run]

Each section runs benchmark scripts with fixed arguments (`SECTIONS`). Every row the summary shows is stored with
the code that made it (`rows.py`: package + kernels hash, and the script's own hash) and its configuration; a row
is reused only when both still match HEAD, so a second run with nothing changed reuses everything and an edit to
the package re-runs what it touches. ruler_gate.py and e2e_serving.py keep their own rows per variant (a dense row
survives an edit to the sparse code); the other scripts are one row per run. --no-run renders what is stored,
each step saying the commit its numbers come from and whether that code is still HEAD's. Run times are printed
per step; a full run at new code takes hours on the 2-core CPU machine (the 8k gates most of it).
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import machine_line  # noqa: E402
from rows import Rows, code_hash, commit, ran_at  # noqa: E402

RESULTS = ROOT / "benchmark" / "results"
# Result files of the studies that chose the default (not re-run by the report; each names its own commit).
STUDIES = {"needle_attribution.md": "why the old default lost a needle mid-answer (the carry-seed fix's evidence)",
           "retrieval_attribution.md": "which half of the default flips retrieval prompts at 4k/8k: decode-only "
                                       "budgets and a 20% prefill budget beside the default, same prompts",
           "prefill_layers.md": "which layers' sparse prefill loses the default's 4k/8k answers: the default with "
                                "some layers' prefill dense, on the prompts it loses",
           "decode_top_p.md": "the decode half's losses against the oracle's mass-adaptive (top-p) budget per step, "
                              "the served selector's own estimated top-p, and the default at larger means",
           "near_ties.md": "how near a tie dense's own answer is on the forms the default loses 2 on, and the lead "
                           "of each prompt the default loses",
           "prefill_needle_8k.md": "the default's two single_needle 8000 losses in-process: the served prefill "
                                   "estimate against the oracle's pages, at the 10% and a 20% prefill budget",
           "copy_calibration.md": "budgets from a profile of prose plus copy probes (DuoAttention-style), served "
                                  "on the forms the default loses 2 on",
           "attention_cpu_means.md": "decode attention at 8k at the default's allocation at means 0.1-0.2 (what a "
                                     "larger default mean costs)",
           "layer_sensitivity_prefill_copy.md": "how far each layer's sparse prefill moves the output on the "
                                                "profile's texts, copy probe (layer_weighted.py's prefill weights)",
           "layer_sensitivity_decode_copy.md": "the same for sparse decode (layer_weighted.py's decode weights)",
           "layer_weighted.md": "budgets weighted by each layer's measured amplification, at the default's mean, "
                                "on retrieval's forms",
           "selector.md": "recall of the oracle's attention mass per page selector at equal pages read",
           "prefill_recall.md": "recall per prefill estimate (the served `centre` and the oracle)",
           "budget_methods.md": "predicted worst-head recovery per budget method",
           "placement.md": "max/mean rank load per placement method",
           "balance.md": "budgets at equal step time under tensor parallelism",
           "compile_check.md": "offline sm_80/sm_90 compiles of every kernel: registers and spills"}


@dataclass
class Step:
    script: str
    args: list[str]
    out: str                    # the committed result file (benchmark/results/OUT)
    what: str
    own_rows: bool = False      # the script stores rows per variant itself (always invoked; --no-run passed on)
    fresh_raw: bool = False     # the script resumes from a name-keyed --raw cache: give it an empty one
    pngs: list[str] = field(default_factory=list)
    scope: str = "sparse"       # the code its rows depend on (rows.py): `all` where the API edge is measured


GATE_TASKS = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe"]
SECTIONS = {
    "recipe": [Step("served_recipe.py", [], "served_recipe.md",
                    "what `make serve` serves: the default recipe at tp 1 and tp 3, reads per step, plan balance")],
    "quality": [
        Step("ruler_gate.py", ["--tasks", "niah_single_1", "--lengths", "4096", "8192", "--limit", "50",
                               "--variants", "default", "mean@0.05"], "ruler_gate_niah.md",
             "public gate, niah_single_1 at 4k and 8k, first 50 prompts: dense vs the default and the 5% setting",
             own_rows=True),
        Step("ruler_gate.py", ["--tasks", *GATE_TASKS, "--lengths", "2048", "4096", "8192", "--limit", "20",
                               "--exclude", "niah_single_1@4096", "niah_single_1@8192",
                               "--variants", "default", "mean@0.05"], "ruler_gate.md",
             "public gate, every RULER task at 2k/4k/8k, first 20 prompts (a gate where dense >= 50%)",
             own_rows=True),
        Step("retrieval.py", ["--contexts", "2048", "4096", "8000", "--seeds", "20", "--variants", "dense",
                              "recipe+optimal@0.1", "recipe+optimal@0.05", "uniform@0.1"], "retrieval.md",
             "the project's own retrieval forms, 20 prompts per form: dense vs the default recipe "
             "(recipe+optimal@0.1), its 5% setting and uniform budgets at the same mean", own_rows=True,
             pngs=["retrieval.png"]),
        Step("quality.py", ["--text", "pydoc", "--contexts", "4096", "--means", "0.05", "0.1", "0.2",
                            "--methods", "uniform", "optimal"], "quality_heldout.md",
             "held-out perplexity (pydoc, never profiled or tuned on) vs mean budget: uniform vs per-head",
             fresh_raw=True, pngs=["quality_heldout.png"]),
    ],
    "speed": [
        Step("e2e_serving.py", ["--scenarios", "1x2000", "1x4000", "1x8000", "8x7000"], "e2e_serving.md",
             "end to end through the server (SGLang's bench_serving): dense vs the default", own_rows=True,
             pngs=["e2e_ttft.png", "e2e_tpot.png"]),
        Step("attention_cpu.py", ["--contexts", "8192", "--batches", "1", "8", "--repeats", "45"],
             "attention_cpu.md", "decode attention per layer at 8k, the default's per-head budgets vs dense"),
        Step("prefill_cpu.py", ["--contexts", "8192", "--repeats", "3", "--ttft-contexts", "8000",
                                "--ttft-repeats", "2"], "prefill_cpu.md", "prefill attention and TTFT at 8k"),
    ],
    "balance": [Step("balance_server.py", [], "balance_server.md",
                     "tp 3 through the server: the plan's predicted and the measured per-rank reads")],
    "reliability": [
        Step("fuzz.py", ["--cases", "2000", "--seed", "3"], "fuzz.md", "malformed and hostile requests",
             scope="all"),
        Step("load.py", ["--tp", "1", "--requests", "500", "--concurrency", "32", "--rounds", "5",
                         "--max-prompt-tokens", "6000", "--max-tokens", "16", "--seed", "0"], "load.md",
             "requests under load: failures, latency, memory", scope="all"),
    ],
}


def step_code(step: Step) -> str:
    """The code a one-row step ran: the package and kernels, plus the script itself and the shared helpers."""
    h = hashlib.sha256(code_hash(step.scope).encode())
    for f in (step.script, "common.py", "plots.py", "rows.py"):
        h.update((ROOT / "benchmark" / f).read_bytes())
    return h.hexdigest()[:16]


def step_config(step: Step) -> dict:
    return {"bench": step.script, "args": step.args}


def run_script(step: Step, extra: list[str], results: Path) -> float:
    cmd = [sys.executable, str(ROOT / "benchmark" / step.script), *step.args, *extra, "--out", str(results / step.out)]
    print(f"[report] {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"[report] {step.script} failed; nothing of it is in the summary (see its output above)")
    return time.time() - t


def run_step(step: Step, rows: Rows, no_run: bool, results: Path) -> tuple[str, str, float | None]:
    """(the result file's text, where its rows came from, seconds it took here or None if reused)."""
    out = results / step.out
    if step.own_rows:
        seconds = run_script(step, ["--no-run"] if no_run else [], results)
        return out.read_text(), "each row's commit, in its table", None if no_run else seconds
    code, cfg = step_code(step), step_config(step)
    if rows.get(cfg, code) is None and not no_run:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run_script(step, ["--raw", f"{tmp}/raw.json"] if step.fresh_raw else [], results)
        rows.put(cfg, code, {"text": out.read_text(), "seconds": seconds})
        return out.read_text(), ran_at(rows.latest(cfg), code), seconds
    entry = rows.latest(cfg)
    if entry is None:
        return "", "not run at any commit with these arguments", None
    out.write_text(entry["row"]["text"])
    return entry["row"]["text"], ran_at(entry, code), None


def study_line(f: str, what: str) -> str:
    """A study's summary line: its file, and the picture its script draws beside it, if any (every result file is
    linked from the summary)."""
    png = Path(f).with_suffix(".png").name
    return f"- [{f}]({f}): {what}" + (f" ([plot]({png}))" if (RESULTS / png).is_file() else "")


def tables(text: str) -> list[str]:
    """The markdown tables of a result file, a blank line between two tables."""
    out, last = [], False
    for ln in text.splitlines():
        row = ln.startswith("|")
        if row and not last and out:
            out.append("")
        if row:
            out.append(ln)
        last = row
    return out


def render_step(step: Step, text: str, origin: str, seconds: float | None, results: Path) -> list[str]:
    took = "" if not text else " · reused" if seconds is None else f" · ran now in {seconds / 60:.1f} min"
    lines = [f"### {step.what}", "", f"[{step.out}]({step.out}) · `python benchmark/{step.script} "
             f"{' '.join(step.args)}` · rows from: {origin}{took}", ""]
    if not text:
        return lines + ["**Not run.** Run `python benchmark/report.py` to make it.", ""]
    lines += tables(text) + [""]
    return lines + [f"![{png}]({png})" for png in step.pngs if (results / png).is_file()] + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scripts = sorted({step.script for steps in SECTIONS.values() for step in steps})
    p.add_argument("--only", nargs="+", choices=[*SECTIONS, *scripts], metavar="SECTION|SCRIPT",
                   help=f"run these sections or steps (the rest are rendered): {', '.join([*SECTIONS, *scripts])}")
    p.add_argument("--no-run", action="store_true", help="render what is stored; run nothing")
    p.add_argument("--results", default=str(RESULTS), help="where result files and SUMMARY.md are written")
    p.add_argument("--rows", default=str(RESULTS / "raw" / "report.json"), help="the one-row steps' rows")
    args = p.parse_args()
    results = Path(args.results)
    rows, body = Rows(args.rows), []
    for name, steps in SECTIONS.items():
        t = time.time()
        body += [f"## {name}", ""]
        for step in steps:
            no_run = args.no_run or (args.only is not None and not {name, step.script} & set(args.only))
            body += render_step(step, *run_step(step, rows, no_run, results), results)
        print(f"[report] section {name}: {(time.time() - t) / 60:.1f} min", flush=True)
    body += ["## studies behind the default", "", "Not re-run by the report; each file names the commit it ran at.",
             ""] + [study_line(f, what) for f, what in STUDIES.items() if (RESULTS / f).is_file()] + [""]
    head = ["# Benchmark summary", "",
            "Generated by `python benchmark/report.py` (`make bench`); do not edit by hand. Every table below is a "
            "result file's table, every row stamped with the commit it ran at; `(stale: older code)` marks a row "
            "whose code is no longer HEAD's (the report re-runs it unless told `--no-run`). Ratios were measured "
            "side by side within one run of one script on this shared 2-core CPU machine; absolute times mean "
            "little. No GPU ran any of this (`benchmark/gpu_first_run.sh` is the device check). The stored rows, "
            "each with its configuration, code hash and commit, are in [raw/](raw/).", "",
            f"Package code {code_hash('sparse')} (dense scope {code_hash('dense')}; "
            f"with the API edge {code_hash('all')})"
            f"{' with uncommitted package edits' if commit().endswith('+edits') else ''} · " + machine_line(), ""]
    (results / "SUMMARY.md").write_text("\n".join(head + body))
    print(f"[report] wrote {results / 'SUMMARY.md'} ({len(head + body)} lines)")


if __name__ == "__main__":
    main()
