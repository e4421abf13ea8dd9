"""RULER-style retrieval through the real server's OpenAI API: dense vs sparse variants.

    python benchmark/retrieval.py [--contexts 2048 4096 8000] [--seeds 4]
        [--variants dense uniform@0.05 optimal@0.05 uniform@0.1 shift@0.1 optimal@0.1 bubbles@0.1]

Tasks come from `ruler_tasks.py` (corpus haystacks, seeded needles). Each variant is one server
started through our launcher (SmolLM2 fp32, CPU); every task goes to `/v1/chat/completions`
greedy, with the answer prefix as an assistant turn the model continues (SGLang's
`continue_final_message`), and is scored exactly (`Task.score`). Dense runs first; a task form
whose dense score is under --keep is reported but not run sparse (the model cannot do it at all).

Variants: `dense`; `METHOD@MEAN` with METHOD uniform (Quest-style), shift (the paper), optimal
(ours), bubbles (ours + fill-bubbles of a tp-3 plan: more budget at the same step time) for
decode; `prefill@B` (uniform prefill budget B, dense decode) and `prefill+METHOD@MEAN` (prefill
budget = MEAN plus that decode method); `recipe+METHOD@MEAN` (the default recipe: one budgets file with
per-head decode AND per-head prefill budgets, both METHOD at MEAN, from the committed profile; `recipeP+METHOD@MEAN`
the same with the per-head prefill budgets at mean P, e.g. `recipe0.2+optimal@0.1`); METHOD:floorK (e.g.
`optimal:floor8@0.1`) makes the budgets with every KV group at >= K pages at the profile's context (`budget
--floor-pages K`; the server's always-kept pages stay sink + recent; a variant without :floorK is named and run
with the default floor, `budget.default_floor_pages`); `VARIANT/SELECTOR` runs VARIANT with
`--shplb-selector SELECTOR` (without it, the server's default selector).

Every prompt's answer is a row in --raw (`rows.Rows`) under its configuration (variant, flags, task, seed, max
tokens), stamped with the code hash and commit that made it; a row is reused only when its code is the current
one (an edit to the selection code re-runs the sparse rows, not dense's). Rows are stored as they arrive, so a
run stopped at any point resumes where it stopped, in a later session too: the full gate (4 variants x 240
prompts) takes longer than one. --no-run renders what is stored; a column names the commits its rows ran at and
says how many of its prompts are missing or made by older code.
"""
import argparse
import json
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import committed_profile, kv_budgets, mean_of, write_result  # noqa: E402
from harness import Server  # noqa: E402
from rows import Rows, code_hash, ran_at, scope_of  # noqa: E402
from ruler_tasks import FAMILIES, make_task, sentences  # noqa: E402

from sglang_shplb.models import prepare_corpus, prepare_model  # noqa: E402

LEVELS = {"single_needle": 0, "multi_key": 1, "multi_value": 1, "variable_track": 0}
MAX_TOKENS = 32
SAVE_LOCK = threading.Lock()  # variants may run side by side (--parallel); one writer at a time
RESULTS = ROOT / "benchmark" / "results"


def corpus_pieces() -> list[str]:
    pieces = []
    for f in sorted(prepare_corpus().glob("*.txt")):
        pieces += sentences(f.read_text(errors="replace"))
    return pieces


def build_tasks(tok, contexts, seeds, families=FAMILIES) -> dict:
    pieces = corpus_pieces()
    keys = [f"{fam}/L{LEVELS[fam]}/{ctx}/{seed}" for ctx in contexts for fam in families for seed in range(seeds)]
    return {key: task_of(tok, key, pieces) for key in keys}


def task_of(tok, key: str, pieces: list[str] | None = None):
    """One prompt by its key, family/level/context/seed, exactly as build_tasks makes it."""
    fam, level, ctx, seed = key.split("/")
    if LEVELS.get(fam) is None or level != f"L{LEVELS[fam]}":
        raise SystemExit(f"{key} is not a retrieval prompt: the families and their levels are {LEVELS}")
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    return make_task(fam, LEVELS[fam], pieces or corpus_pieces(), count, int(ctx), int(seed))


def method_of(spec: str) -> str | None:
    """The decode budget method of a variant spec (PREFIX+METHOD or METHOD); None for `prefill` alone."""
    return spec.split("+", 1)[1] if "+" in spec else (None if spec.startswith("prefill") else spec)


def canonical(name: str) -> str:
    """The variant's name with its budgets' floor spelled out (METHOD:floorK@MEAN) wherever a budgets file
    depends on it, so raw rows made under another default floor are never reused for this one. Rows named
    without a floor in raw files older than 2026-12-02 were made at sink + recent (3 pages), the default then."""
    base, slash, selector = name.partition("/")
    if base == "dense" or ":floor" in base:
        return name
    spec, mean = base.rsplit("@", 1)
    method = method_of(spec)
    if method in (None, "uniform"):
        return name
    from sglang_shplb.budget import default_floor_pages

    return f"{spec}:floor{default_floor_pages(committed_profile().meta, float(mean))}@{mean}{slash}{selector}"


def variant_flags(name: str, tmp: Path) -> tuple[list[str], float, float]:
    """(launcher flags, decode mean budget, prefill budget) of a variant name."""
    if "/" in name:  # VARIANT/SELECTOR: the same with --shplb-selector SELECTOR
        name, selector = name.split("/", 1)
        flags, decode, prefill = variant_flags(name, tmp)
        return flags + ["--shplb-selector", selector], decode, prefill
    if name == "dense":
        return ["--shplb-dense"], 1.0, 1.0
    spec, mean = name.rsplit("@", 1)
    mean = float(mean)
    spec, _, floor = spec.partition(":floor")   # METHOD:floorK: budgets made with every group >= K pages
    floor = int(floor) if floor else None
    if spec.startswith("recipe"):   # per-head prefill budgets travel in the budgets file, like decode's
        from sglang_shplb.artifacts import write_json
        from sglang_shplb.budget import make_budgets

        prefix, method = spec.split("+", 1)
        prefill_mean = float(prefix.removeprefix("recipe") or mean)   # recipeP+: the prefill budgets' own mean
        body = make_budgets(committed_profile(), mean, method, "kv", floor_pages=floor, prefill_mean=prefill_mean)
        path = tmp / f"retrieval-{spec}-floor{floor}-{mean}.json"
        write_json(path, "budget", body)
        return ["--shplb-budgets", str(path)], mean_of(body), mean_of({"budgets": body["prefill_budgets"]})
    prefill = spec.startswith("prefill")
    flags = ["--shplb-uniform-prefill-budget", str(mean)] if prefill else []
    method = method_of(spec)
    if method is None:
        return flags, 1.0, mean
    if method == "uniform":
        return flags + ["--shplb-uniform-budget", str(mean)], mean, mean if prefill else 1.0
    from sglang_shplb.artifacts import write_json

    body = kv_budgets(method, mean, floor_pages=floor)
    path = tmp / f"retrieval-{method}-floor{floor}-{mean}.json"
    write_json(path, "budget", body)
    return flags + ["--shplb-budgets", str(path)], mean_of(body), mean if prefill else 1.0


def decode_read(name: str, ctx: int, page: int = 16) -> float:
    """Share of the KV one decode step reads at a prompt of ctx tokens: the shipping page-count rule
    (`selection.pages_for_budget`) on the variant's budgets, so a table says what each column really read."""
    import torch

    from sglang_shplb import selection as sel
    from sglang_shplb.config import ShplbConfig

    flags = variant_flags(name, Path("/tmp"))[0]
    n = torch.tensor(float(-(-ctx // page)))
    if "--shplb-budgets" in flags:
        body = json.loads(Path(flags[flags.index("--shplb-budgets") + 1]).read_text())
        table = torch.tensor(body["budgets"], dtype=torch.float64)
        ref = sel.BudgetRef.of(table, -(-body["context_len"] // body["page_size"]))
        k = sel.pages_for_budget(table, n, body["sink_pages"] + body["recent_pages"], ref)   # the server's floor
    elif "--shplb-uniform-budget" in flags:
        cfg = ShplbConfig()
        k = sel.pages_for_budget(torch.tensor(float(flags[flags.index("--shplb-uniform-budget") + 1])), n,
                                 cfg.sink_pages + cfg.recent_pages)
    else:
        return 1.0
    return float(k.double().mean() / n)


def ask(server: Server, task) -> str:
    body = {"model": "default", "temperature": 0, "max_tokens": MAX_TOKENS, "continue_final_message": True,
            "messages": task.messages}
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=900)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"] or ""


@cache
def flags_code(flags: tuple[str, ...]) -> str:
    """The code hash a variant's rows are stamped with, read once per process: a run's servers run the code it
    started with, and the package is not re-read for every variant and render."""
    return code_hash(scope_of(list(flags)))


def row_config(name: str, key: str, flags: list[str]) -> dict:
    """A prompt's row key: the variant, its launcher flags, the task (family/level/context/seed), the answer cap."""
    return {"bench": "retrieval", "variant": name, "flags": flags, "task": key, "max_tokens": MAX_TOKENS}


def run_variant(name: str, tasks: dict, rows: Rows, tmp: Path, flags: list[str] | None = None,
                config=row_config) -> None:
    """Ask a variant's server every task whose row is missing at the current code. `flags` (default: the variant
    name's) and `config` (the row key) let a study serve its own budgets files under its own rows."""
    flags = variant_flags(name, tmp)[0] if flags is None else flags
    code = flags_code(tuple(flags))
    todo = [k for k in tasks if rows.get(config(name, k, flags), code) is None]
    if not todo:
        return
    server = Server(["--max-total-tokens", "20000", *flags],
                    tmp / f"retrieval-{name.replace('/', '-')}.log").wait_ready()
    try:
        t0 = time.time()
        for i, key in enumerate(todo):
            out = ask(server, tasks[key])
            row = {"output": out, "score": tasks[key].score(out)}
            with SAVE_LOCK:
                rows.put(config(name, key, flags), code, row)  # resumable: nothing lost on a crash
            print(f"  {name} {i + 1}/{len(todo)} {key}: {row['score']:.2f} "
                  f"({time.time() - t0:.0f}s) {out[:50]!r}", flush=True)
    finally:
        server.stop()


def stored(rows: Rows, names: list[str], tasks: dict, tmp: Path, kept: dict | None = None) -> tuple[dict, dict]:
    """({variant: {task key: row}} of the stored rows, whatever their code; {variant: where they ran}): a
    column's commits, and its prompts not stored or made by older code. A sparse column is owed only the `kept`
    prompts (forms dense can do; default: all): a dropped form's prompts are not counted as missing."""
    raw, origin = {}, {}
    for name in names:
        flags = variant_flags(name, tmp)[0]
        code = flags_code(tuple(flags))
        entries = {k: rows.latest(row_config(name, k, flags)) for k in tasks}
        raw[name] = {k: e["row"] for k, e in entries.items() if e}
        at = sorted({ran_at(e, code) for e in entries.values() if e})
        owed = tasks if name == "dense" or kept is None else kept
        missing = sum(entries[k] is None for k in owed)
        stale = sum(e is not None and e["code"] != code for e in entries.values())
        notes = [f"{missing} of {len(owed)} not run"] * bool(missing) + [f"{stale} from older code"] * bool(stale)
        origin[name] = "; ".join([", ".join(at)] * bool(at) + notes)
    return raw, origin


def form(key: str) -> str:
    return key.rsplit("/", 1)[0]  # family/level/context


def scores_by_form(raw: dict, name: str, tasks: dict) -> dict:
    by = {}
    for key in tasks:
        if key in raw.get(name, {}):
            by.setdefault(form(key), []).append(raw[name][key]["score"])
    return {f: 100 * sum(v) / len(v) for f, v in by.items()}


def paired(raw: dict, name: str, f: str, tasks: dict) -> tuple[int, int, float, float]:
    """Variant `name` vs dense on form f, prompt by prompt: (prompts scoring lower, higher, and the 95% interval
    of the mean Δ in pt from a paired bootstrap over the prompts). A form's Δ moves in steps of one prompt, so
    the interval says which gaps the seeds can tell from the model's own prompt-to-prompt noise."""
    return paired_keys(raw, name, [k for k in tasks if form(k) == f])


def kept_baseline(tasks: dict, default: str, keep: float = 50.0, forms: list[str] | None = None):
    """For a study served beside retrieval.py's stored rows: ({"dense", default: {task key: row}}, the forms dense
    answers >= keep % of (only those in `forms`, if given), {task key: task} of those forms)."""
    base, _ = stored(Rows(RESULTS / "raw" / "retrieval.json"), ["dense", default], tasks, Path("/tmp"))
    by_form = {}
    for k, row in base["dense"].items():
        by_form.setdefault(form(k), []).append(row["score"])
    kept = [f for f, v in by_form.items() if 100 * sum(v) / len(v) >= keep and (not forms or f in forms)]
    return base, kept, {k: t for k, t in tasks.items() if form(k) in kept}


def form_table(raw: dict, names: list[str], kept: list[str], todo: dict) -> list[str]:
    """Per kept form: dense's score, then each variant's score (−lost +gained against dense); a last row pooled over
    the prompts every variant ran, with the paired 95% interval of the mean Δ."""
    lines = ["| form | dense | " + " | ".join(f"{n} (−lost +gained)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for f in sorted(kept, key=lambda f: (int(f.rsplit("/", 1)[1]), f)):
        keys = [k for k in todo if form(k) == f]
        cells = []
        for n in ("dense", *names):
            have = [k for k in keys if k in raw[n]]
            score = 100 * sum(raw[n][k]["score"] for k in have) / max(1, len(have))
            flips = "" if n == "dense" else " (−{} +{})".format(*paired_keys(raw, n, have)[:2])
            cells.append(f"{score:.0f}{flips}" + ("" if len(have) == len(keys) else f" ({len(have)} of {len(keys)})"))
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    ran = [k for k in todo if all(k in raw[n] for n in names)]
    lines.append(f"| **pooled over the {len(ran)} prompts every column ran**: −lost +gained; Δ 95% paired "
                 "interval (pt) | | " + " | ".join("−{} +{}; [{:+.1f}, {:+.1f}]".format(*paired_keys(raw, n, ran))
                                                    for n in names) + " |")
    return lines


def paired_keys(raw: dict, name: str, keys: list[str]) -> tuple[int, int, float, float]:
    """`paired` over any set of prompts (a form, or every kept form pooled); prompts either side lacks are left out."""
    keys = [k for k in keys if k in raw.get(name, {}) and k in raw["dense"]]
    d = [raw[name][k]["score"] - raw["dense"][k]["score"] for k in keys]
    rng = random.Random(0)   # fixed: the same raw outputs always print the same interval
    means = sorted(100 * sum(rng.choices(d, k=len(d))) / len(d) for _ in range(2000))
    return sum(x < 0 for x in d), sum(x > 0 for x in d), means[49], means[1949]


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # `kill` runs the finally blocks: no orphaned server
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="task families to run")
    p.add_argument("--variants", nargs="+", default=["dense", "uniform@0.05", "optimal@0.05", "uniform@0.1",
                                                     "shift@0.1", "optimal@0.1", "bubbles@0.1"])
    p.add_argument("--parallel", type=int, default=1, help="variant servers run side by side (scores do not "
                   "depend on it; use 2 on a 2-core machine)")
    p.add_argument("--keep", type=float, default=50.0, help="dense score (%%) a task form needs to be run sparse")
    p.add_argument("--raw", default=str(RESULTS / "raw" / "retrieval.json"))
    p.add_argument("--no-run", action="store_true", help="only render the stored rows")
    p.add_argument("--skip-dense", action="store_true", help="do not run dense: compare with the dense rows stored "
                   "(a `--variants dense` run beside this one fills them; pair it with --keep 0 while it runs)")
    p.add_argument("--out", default=str(RESULTS / "retrieval.md"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    tasks = build_tasks(AutoTokenizer.from_pretrained(prepare_model()), args.contexts, args.seeds, args.families)
    rows, tmp = Rows(args.raw), Path("/tmp")
    names = ["dense"] + list(dict.fromkeys(canonical(v) for v in args.variants if v != "dense"))
    if not (args.no_run or args.skip_dense):
        run_variant("dense", tasks, rows, tmp)
    dense = scores_by_form(stored(rows, ["dense"], tasks, tmp)[0], "dense", tasks)
    kept = {k: t for k, t in tasks.items() if dense.get(form(k), 0.0) >= args.keep}
    if not args.no_run:
        with ThreadPoolExecutor(args.parallel) as pool:
            for f in [pool.submit(run_variant, name, kept, rows, tmp) for name in names[1:]]:
                f.result()
    raw, origin = stored(rows, names, tasks, tmp, kept)
    if not raw["dense"]:
        write_result(args.out, "Retrieval (RULER-style) through the server's OpenAI API", "No rows stored yet.",
                     ["| rows stored | prompts asked |", "|---|---|", f"| none | {len(tasks)} per variant |"],
                     "python benchmark/retrieval.py " + " ".join(sys.argv[1:]))
        return
    write_tables(args, names, tasks, raw, dense, origin)


def partial(raw: dict, name: str, f: str, tasks: dict) -> str:
    """' (k of n prompts)' when a form's column is not complete (a run stopped part-way): its score is of those."""
    n = sum(form(k) == f for k in tasks)
    k = sum(form(key) == f and key in raw.get(name, {}) for key in tasks)
    return "" if k == n else f" ({k} of {n} prompts)"


def write_tables(args, names, tasks, raw, dense, origin):
    from plots import line_plot

    table = {n: scores_by_form(raw, n, tasks) for n in names}
    meta = {n: variant_flags(n, Path("/tmp"))[1:] for n in names}
    head = "| task form (family/level/context) | " + " | ".join(
        n if n == "dense" else f"{n} (decode {meta[n][0]:.3f}, prefill {meta[n][1]:.2f})" for n in names) + " |"
    rows = [head, "|" + "---|" * (len(names) + 1)]
    pairs = {(n, f): paired(raw, n, f, tasks) for n in names[1:] for f in table[n] if f in dense}   # once per cell
    for f in sorted(dense, key=lambda f: (int(f.rsplit("/", 1)[1]), f)):
        flips = {n: " (-{} +{})".format(*pairs[n, f][:2]) for n in names[1:] if f in table[n]}
        cells = [f"{table[n][f]:.0f}{flips.get(n, '')}{partial(raw, n, f, tasks)}" if f in table[n] else
                 ("dropped" if dense[f] < args.keep else "—") for n in names]
        rows.append(f"| {f} | " + " | ".join(cells) + " |")
    kept = [f for f in dense if dense[f] >= args.keep]
    worst = {n: min((table[n][f] - dense[f] for f in kept if f in table[n]), default=float("nan")) for n in names}
    avg = {n: sum(table[n][f] - dense[f] for f in kept if f in table[n]) / max(1, sum(f in table[n] for f in kept))
           for n in names}
    rows.append("| **mean Δ vs dense (pt, kept forms)** | " + " | ".join(f"{avg[n]:+.1f}" for n in names) + " |")
    rows.append("| **worst Δ vs dense (pt)** | " + " | ".join(f"{worst[n]:+.1f}" for n in names) + " |")
    ci = {n: paired(raw, n, min((f for f in kept if f in table[n]), key=lambda f: table[n][f] - dense[f]), tasks)
          for n in names[1:] if any(f in table[n] for f in kept)}
    rows.append("| worst form's Δ, 95% paired-bootstrap interval (pt) | — | " + " | ".join(
        f"[{ci[n][2]:+.1f}, {ci[n][3]:+.1f}]" if n in ci else "—" for n in names[1:]) + " |")
    lost = {n: {f: pairs[n, f][0] for f in kept if f in table[n]} for n in names[1:]}
    most = {n: max(lost[n].values()) for n in names[1:] if lost[n]}
    rows.append("| **most prompts lost on one kept form** (goal: ≤ 1) | — | " + " | ".join(
        f"{most[n]} ({', '.join(f for f, k in lost[n].items() if k == most[n])})" if n in most else "—"
        for n in names[1:]) + " |")
    pooled = {n: paired_keys(raw, n, [k for k in tasks if form(k) in lost[n]]) for n in names[1:] if lost[n]}
    rows.append("| kept forms pooled: −lost +gained; Δ 95% paired-bootstrap interval (pt) | — | " + " | ".join(
        "−{} +{}; [{:+.1f}, {:+.1f}]".format(*pooled[n]) if n in pooled else "—" for n in names[1:]) + " |")
    rows.append("| ran at | " + " | ".join(origin[n] or "not run" for n in names) + " |")
    for ctx in args.contexts:
        rows.append(f"| decode KV read at {ctx} (%) | " + " | ".join(f"{100 * decode_read(n, ctx):.1f}" for n in names)
                    + " |")
    series = {}
    for n in names[1:]:
        method, rest = n.rsplit("@", 1)
        series.setdefault(method + ("/" + rest.split("/", 1)[1] if "/" in rest else ""), []).append(
            (float(rest.split("/", 1)[0]), avg[n]))
    line_plot(Path(args.out).with_suffix(".png"), series, "nominal mean budget", "retrieval score Δ vs dense (pt)",
              "RULER-style retrieval via the server (SmolLM2-135M, CPU)")
    write_result(args.out, "Retrieval (RULER-style) through the server's OpenAI API",
                 f"SmolLM2-135M fp32 on CPU, greedy, {args.seeds} seeds per task form, contexts {args.contexts}, "
                 f"max {MAX_TOKENS} new tokens. Scores in % (exact string match of every answer, 0 if a "
                 f"distractor is named). Task forms with dense score < {args.keep:.0f} are dropped. Decode-only "
                 "variants keep prefill dense, so the first answer token is computed densely; `prefill` variants "
                 "make prefill sparse too. Goal (issue 33): at the default (recipe+optimal@0.1) no kept form loses "
                 "more than 1 prompt that dense answers. A sparse cell's (-a +b): prompts it scores lower / higher "
                 f"than dense. Rows: {Path(args.raw).name}.", rows,
                 "python benchmark/retrieval.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
