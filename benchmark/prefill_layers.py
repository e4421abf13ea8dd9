"""Issue 33, item 2: which layers' sparse prefill loses the answers the default loses at 8k? Through the server.

The default (`recipe+optimal@0.1`: per-head decode and prefill budgets at 10%) loses prompts that dense answers, and
at 8k the same decode budgets with dense prefill do not (`retrieval_attribution.md`). This study takes those prompts
(the default scores lower than dense, from retrieval.py's stored rows) and serves the default's budgets file with
the prefill budgets of one group of layers set to 1.0, so that group prefills densely (the backend runs a layer
whose prefill budgets are all 1.0 dense) and every other layer, and decode, stays as served. A prompt comes back
when it scores what dense scores. A group `^a-b` is the complement: every layer but a..b prefills densely, so a
loss that a..b's sparse prefill causes on its own shows up there.

    python benchmark/prefill_layers.py --forms single_needle/L0/8000 variable_track/L0/8000 multi_value/L1/8000 \
        --groups 0-4 5-9 10-14 15-19 20-24 25-29 ^0-9 ^10-19 ^20-29 [--parallel 2]

Every answer is a row in --raw (`rows.Rows`), stamped with the code hash and commit, reused only at the same code.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import committed_profile, write_result  # noqa: E402
from retrieval import MAX_TOKENS, RESULTS, build_tasks, canonical, flags_code, form, run_variant, stored  # noqa: E402
from rows import Rows  # noqa: E402

from sglang_shplb.models import prepare_model  # noqa: E402

DEFAULT = "recipe+optimal@0.1"
DECODE_ONLY = "optimal@0.1"   # the default's decode budgets with dense prefill


def layer_set(group: str, num_layers: int) -> list[int]:
    """The layers that prefill densely: a group "a-b" (inclusive) or "a", or every other layer for "^a-b"."""
    complement = group.startswith("^")
    lo, _, hi = group.removeprefix("^").partition("-")
    inside = set(range(int(lo), int(hi or lo) + 1))
    if not inside <= set(range(num_layers)):
        raise SystemExit(f"group {group} is outside the model's layers 0-{num_layers - 1}")
    return sorted(set(range(num_layers)) - inside if complement else inside)


def variant_body(dense_layers: list[int]) -> dict:
    """The default's budgets file with the prefill budgets of `dense_layers` at 1.0 (those layers prefill densely)."""
    from sglang_shplb.budget import make_budgets

    body = make_budgets(committed_profile(), 0.1, "optimal", "kv", prefill_mean=0.1)
    for layer in dense_layers:
        body["prefill_budgets"][layer] = [1.0] * len(body["prefill_budgets"][layer])
    return body


def variant_flags(name: str, dense_layers: list[int], tmp: Path) -> list[str]:
    from sglang_shplb.artifacts import write_json

    path = tmp / f"prefill-layers-{name}.json"
    write_json(path, "budget", variant_body(dense_layers))
    return ["--shplb-budgets", str(path)]


def config(name: str, key: str, flags: list[str]) -> dict:
    return {"bench": "prefill_layers", "variant": name, "flags": flags, "task": key, "max_tokens": MAX_TOKENS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", nargs="+", required=True, help="family/level/context, e.g. single_needle/L0/8000")
    p.add_argument("--groups", nargs="+", required=True, help="layers that prefill densely: a-b, a, or ^a-b (all "
                   "but a..b)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--no-run", action="store_true")
    p.add_argument("--raw", default=str(RESULTS / "raw" / "prefill_layers.json"))
    p.add_argument("--out", default=str(RESULTS / "prefill_layers.md"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    families = sorted({f.split("/")[0] for f in args.forms})
    contexts = sorted({int(f.split("/")[2]) for f in args.forms})
    tasks = build_tasks(AutoTokenizer.from_pretrained(prepare_model()), contexts, args.seeds, families)
    tasks = {k: t for k, t in tasks.items() if form(k) in args.forms}
    if set(args.forms) - {form(k) for k in tasks}:
        raise SystemExit(f"not retrieval.py forms: {sorted(set(args.forms) - {form(k) for k in tasks})}")
    default, decode_only = canonical(DEFAULT), canonical(DECODE_ONLY)
    base, _ = stored(Rows(RESULTS / "raw" / "retrieval.json"), ["dense", default, decode_only], tasks, Path("/tmp"))
    lost = [k for k in tasks if k in base[default] and base[default][k]["score"] < base["dense"][k]["score"]]
    num_layers = committed_profile().meta["num_layers"]
    variants = {f"dense-{g}".replace("dense-^", "sparse-only-"): layer_set(g, num_layers) for g in args.groups}
    rows, tmp = Rows(args.raw), Path("/tmp")
    flags = {n: variant_flags(n, layers, tmp) for n, layers in variants.items()}
    if not args.no_run:
        with ThreadPoolExecutor(args.parallel) as pool:
            lost_tasks = {k: tasks[k] for k in lost}
            for f in [pool.submit(run_variant, n, lost_tasks, rows, tmp, flags[n], config) for n in variants]:
                f.result()
    render(args, variants, flags, lost, base, default, decode_only, rows)


def render(args, variants, flags, lost, base, default, decode_only, rows):
    got = {n: {k: rows.get(config(n, k, flags[n]), flags_code(tuple(flags[n]))) for k in lost} for n in variants}
    head = "| prompt (form/seed) | dense | default | decode-only | " + " | ".join(f"{n} ({len(v)} layers dense)"
                                                                   for n, v in variants.items()) + " |"
    lines = [head, "|" + "---|" * (len(variants) + 4)]
    score = lambda name, k: "—" if k not in base.get(name, {}) else f"{base[name][k]['score']:.2f}"   # noqa: E731
    for k in lost:
        cells = ["—" if got[n][k] is None else f"{got[n][k]['score']:.2f}" for n in variants]
        lines.append(f"| {k} | {score('dense', k)} | {score(default, k)} | {score(decode_only, k)} | "
                     + " | ".join(cells) + " |")
    for ctx in sorted({k.split("/")[2] for k in lost}, key=int):
        keys = [k for k in lost if k.split("/")[2] == ctx]
        back = {n: sum(got[n][k] is not None and got[n][k]["score"] >= base["dense"][k]["score"] for k in keys)
                for n in variants}
        ran = {n: sum(got[n][k] is not None for k in keys) for n in variants}
        only = sum(k in base.get(decode_only, {}) and base[decode_only][k]["score"] >= base["dense"][k]["score"]
                   for k in keys)
        lines.append(f"| **back to dense's score at {ctx}** (of {len(keys)}) | — | 0 | {only} | " + " | ".join(
            f"{back[n]}" + ("" if ran[n] == len(keys) else f" ({ran[n]} run)") for n in variants) + " |")
    intro = (f"The prompts of {', '.join(args.forms)} (seeds 0–{args.seeds - 1}) that the default "
             f"({default}) scores lower than dense, served with the default's budgets file but some layers' prefill "
             "dense (their prefill budgets at 1.0; decode and every other layer as served): `dense-a-b` prefills "
             "layers a..b densely, `sparse-only-a-b` every layer but a..b; `decode-only` is the same decode budgets "
             f"with every layer's prefill dense ({decode_only}, stored by retrieval.py): a prompt it loses too is "
             "lost in decode, which no prefill layer brings back. "
             "A score per prompt (1.00 = every answer right); `back`: prompts scoring what dense scores. "
             "Rows: raw/prefill_layers.json; dense and default from raw/retrieval.json.")
    write_result(args.out, "Which layers' sparse prefill loses the default's answers", intro, lines,
                 "python benchmark/prefill_layers.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
