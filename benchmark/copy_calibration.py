"""Issue 33: calibrate the per-head budgets on copying as well as on prose (DuoAttention's idea: find the heads
retrieval needs on synthetic copy data, not on the tasks that are scored).

The shipped profile measures each head's recovery curves on two Canterbury windows of prose. A retrieval answer
copies a span from thousands of tokens back, and the heads that do that may need more pages there than prose shows.
This study profiles the same windows twice: as they are, and as a copy probe whose second half (where the profile
samples its queries) alternates CHUNK tokens of the window's own prose with CHUNK-token copies of random spans of
its first half. The four windows' curves are averaged (profile.run_profile, unchanged), and `budget.py`'s default
allocation (optimal, max-min) turns them into decode and prefill budgets at the same mean. Nothing here reads a
gate task: the probe is made from the calibration text alone.

    OMP_NUM_THREADS=1 python benchmark/copy_calibration.py --out /tmp/copycal [--serve [--forms F ...] [--no-run]]
writes copycal.profile.safetensors (reused when there: ~10 min to make), the budgets files copycal.json and
shipped.json (decode and prefill) and *.decode.json (decode only, for needle_attribution.py --budgets), and
results/copy_calibration.md: each layer's mean budget per phase, shipped vs copy-calibrated, then with --serve the
served table (rows: raw/copy_calibration.json, keyed by the budgets file's checksum as well as the code).
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmark")]

from common import committed_profile, write_result  # noqa: E402
from retrieval import (MAX_TOKENS, RESULTS, build_tasks, canonical, flags_code, form_table, kept_baseline,  # noqa: E402
                       run_variant)
from rows import Rows  # noqa: E402

from sglang_shplb import profile as prof_mod  # noqa: E402
from sglang_shplb.models import prepare_model  # noqa: E402

DEFAULT = "recipe+optimal@0.1"     # retrieval.py's name of the default recipe, whose rows are the baseline
CHUNK = 128      # tokens: a copied span, about a retrieval answer's context (a needle sentence and its neighbours)


def copy_probe(ids: torch.Tensor, chunk: int, seed: int) -> torch.Tensor:
    """The window with every other CHUNK of its second half replaced by a copy of a random CHUNK of its first."""
    g = torch.Generator().manual_seed(seed)
    out, half = ids.clone(), len(ids) // 2
    for start in range(half, len(ids) - chunk + 1, 2 * chunk):
        src = int(torch.randint(0, half - chunk, (1,), generator=g))
        out[start:start + chunk] = ids[src:src + chunk]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the profile and budgets files")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--windows", type=int, default=2, help="prose windows (each profiled as prose and as a copy probe)")
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--mean-budget", type=float, default=0.1)
    p.add_argument("--serve", action="store_true", help="serve NAME.json on retrieval.py's kept forms (rows kept)")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--forms", nargs="+", help="only these kept forms (family/level/context), e.g. to split a run")
    p.add_argument("--no-run", action="store_true", help="with --serve: render the stored rows only")
    p.add_argument("--table", default=str(RESULTS / "copy_calibration.md"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "copycal.profile.safetensors"
    if not path.exists():    # profiling takes ~10 min on 2 cores; an existing one is reused
        profile_prose_and_copy(args).save(path)
    where = "the kept forms " + ", ".join(args.forms) if args.forms else "every kept form"
    lines = write_budgets(out, {"copycal": prof_mod.Profile.load(path), "shipped": committed_profile()},
                          args.mean_budget)
    if args.serve:
        lines += [""] + serve(args, out / "copycal.json")
    write_result(args.table, "Budgets calibrated on copying as well as prose",
                 f"The default recipe's allocation (optimal, decode and prefill at {args.mean_budget}) made from a "
                 "profile of the shipped profile's prose windows plus their copy probes (module docstring), against "
                 "the shipped profile's: each layer's mean budget per phase" + (
                     f"; then served on {where} "
                     f"of retrieval.py ({args.seeds} seeds per form) next to its stored "
                     "dense and default rows of the same prompts (goal, issue 33: no kept form loses more than 1)"
                     if args.serve else "") + ".", lines,
                 "python benchmark/copy_calibration.py " + " ".join(sys.argv[1:]))


def profile_prose_and_copy(args) -> "prof_mod.Profile":
    """The shipped profiler (run_profile, unchanged) over the prose windows and their copy probes."""
    torch.set_num_threads(1)
    plain = prof_mod.token_windows

    def prose_and_copy(tokenizer, files, context_len, windows):
        texts = plain(tokenizer, files, context_len, windows)
        return texts + [copy_probe(t, args.chunk, seed=i) for i, t in enumerate(texts)]

    prof_mod.token_windows = prose_and_copy
    try:
        prof = prof_mod.run_profile(prepare_model(), context_len=args.context, windows=args.windows)
    finally:
        prof_mod.token_windows = plain
    prof.meta["windows"] = 2 * args.windows
    prof.meta["calibration"] = (f"{args.windows} prose windows and the same as copy probes (every other "
                                f"{args.chunk} tokens of the second half a copy of a random span of the first): "
                                "benchmark/copy_calibration.py")
    return prof


def write_budgets(out: Path, profiles: dict, mean: float) -> list[str]:
    """NAME.json (decode and prefill budgets, as the default recipe's) and NAME.decode.json (decode only, for
    needle_attribution.py) per profile, at the same mean. Returns a table of each layer's mean budget per phase."""
    from sglang_shplb.artifacts import write_json
    from sglang_shplb.budget import make_budgets

    bodies = {}
    for name, profile in profiles.items():
        bodies[name] = make_budgets(profile, mean, "optimal", "kv", prefill_mean=mean)
        write_json(out / f"{name}.json", "budget", bodies[name])
        write_json(out / f"{name}.decode.json", "budget", make_budgets(profile, mean, "optimal", "kv"))
    lines = ["| layer | decode: shipped | decode: copy-calibrated | prefill: shipped | prefill: copy-calibrated |",
             "|---|---|---|---|---|"]
    phases = ("budgets", "prefill_budgets")
    t = {(n, key): torch.tensor(bodies[n][key]).mean(-1) for n in bodies for key in phases}
    for layer in range(len(t["shipped", "budgets"])):
        cells = [f"{float(t[n, key][layer]):.3f}" for key in phases for n in ("shipped", "copycal")]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return lines


def config(name: str, key: str, flags: list[str], checksum: str) -> dict:
    return {"bench": "copy_calibration", "variant": name, "flags": flags, "budgets": checksum, "task": key,
            "max_tokens": MAX_TOKENS}


def serve(args, budgets: Path) -> list[str]:
    """The copy-calibrated budgets file through the server on retrieval.py's kept forms, next to retrieval.py's
    stored dense and default rows (the same prompts), one table: per form, score and lost/gained against dense."""
    import json

    from transformers import AutoTokenizer

    name, flags = f"copycal@{args.mean_budget}", ["--shplb-budgets", str(budgets)]
    checksum = json.loads(budgets.read_text())["checksum"]
    tasks = build_tasks(AutoTokenizer.from_pretrained(prepare_model()), args.contexts, args.seeds)
    default = canonical(DEFAULT)
    base, kept, todo = kept_baseline(tasks, default, forms=args.forms)
    rows = Rows(RESULTS / "raw" / "copy_calibration.json")
    if not args.no_run:
        run_variant(name, todo, rows, Path("/tmp"), flags, lambda n, k, f: config(n, k, f, checksum))
    got = {k: rows.get(config(name, k, flags, checksum), flags_code(tuple(flags))) for k in todo}
    raw = {"dense": base["dense"], default: base[default], name: {k: r for k, r in got.items() if r is not None}}
    return form_table(raw, [default, name], kept, todo)


if __name__ == "__main__":
    main()
