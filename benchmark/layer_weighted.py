"""Issue 33: budgets weighted by how far each layer's attention error carries to the output.

The default allocates budgets by max-min recovery over every KV group of every layer, as if a unit of attention
mass lost in layer 3 cost what it costs in layer 27. It does not: prefill_layers.md found the default's lost
answers spread over the middle layers' sparse prefill. Here each layer gets an amplification per phase

    a_l = KL(dense || only layer l sparse) / lost mass of layer l (1 - its groups' mean predicted recovery)

from layer_sensitivity.py's copy probe on the profile's own Canterbury windows (never a retrieval prompt), and
that phase's budgets are re-allocated at the same mean by weighted max-min: the smallest eps such that every
group's a_l (1 - recovery) <= eps fits the total, then what is left by a_l times marginal recovery (a_l = 1
everywhere is budget.optimal). `^P` weights by a_l ** P. The weighted budgets file is served on retrieval.py's
kept forms and prompts, next to its stored dense and default rows; the same mean means the same step time.

    python benchmark/layer_weighted.py [--variants prefill+decode prefill+decode^0.5] [--contexts 2048 4096 8000] \
        [--seeds 20] [--parallel 2] [--no-run]

Rows: raw/layer_weighted.json, keyed by the budgets file's checksum as well as the code.
"""
import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import committed_profile, write_result  # noqa: E402
from retrieval import (MAX_TOKENS, RESULTS, build_tasks, canonical, flags_code, form_table, kept_baseline,  # noqa: E402
                       run_variant)
from rows import Rows  # noqa: E402

from sglang_shplb.budget import _spend_leftover, eval_curves, invert_curves, make_budgets  # noqa: E402
from sglang_shplb.models import prepare_model  # noqa: E402

DEFAULT = "recipe+optimal@0.1"
MEAN = 0.1


PHASES = {   # phase -> (the profile's curves, the budgets file's budgets / predicted recovery / floor keys)
    "prefill": ("prefill", "prefill_budgets", "prefill_predicted_recovery", "prefill_floor_pages"),
    "decode": ("runtime", "budgets", "predicted_recovery", "floor_pages"),
}


def amplification(windows: list[dict], recovery: list) -> torch.Tensor:
    """a_l [L]: layer_sensitivity's KL with only layer l sparse (over the probe's copy span, mean over windows) per
    unit of the mass layer l loses at the default's budgets (1 - its groups' mean predicted recovery)."""
    L = len(recovery)
    kl = torch.tensor([sum(w[f"alone/{layer}"][1] for w in windows) / len(windows) for layer in range(L)])
    lost = 1 - torch.tensor(recovery, dtype=torch.float64).mean(1)
    return kl.double() / lost.clamp(min=1e-6)


def weighted_optimal(curves, grid, mean, floor_frac, step, w):
    """Weighted max-min over units: the smallest eps with sum of budgets (recovery >= 1 - eps / w) <= total,
    then the leftover by w x marginal recovery. curves [U, G], w [U] -> budgets [U]."""
    total = mean * len(curves)
    floor = torch.full(curves.shape[:1], floor_frac, dtype=torch.float64)

    def cost(eps):
        return torch.maximum(invert_curves(curves, grid, (1 - eps / w).clamp(min=0.0)), floor)

    lo, hi = 0.0, float((w * (1 - eval_curves(curves, grid, floor))).max())
    if cost(lo).sum() <= total:
        hi = lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid).sum() <= total else (mid, hi)
    b = cost(hi)
    weighted = curves.double() * w.view(-1, 1)   # marginal gain x w: _spend_leftover on scaled curves
    return _spend_leftover(weighted, grid, b, total - float(b.sum()), step)


def weighted_body(sensitivity: dict[str, list[dict]], power: float = 1.0) -> tuple[dict, dict]:
    """The default's budgets file with each phase in `sensitivity` re-allocated by weighted max-min at the same
    mean, weights a_l ** power (power < 1 tempers a spread measured on two windows); and {phase: weights}."""
    prof = committed_profile()
    body = make_budgets(prof, MEAN, "optimal", "kv", prefill_mean=MEAN)
    step = body["page_size"] / body["context_len"]
    amp = {}
    for phase, windows in sensitivity.items():
        selector, key, rkey, fkey = PHASES[phase]
        amp[phase] = a = amplification(windows, body[rkey]) ** power
        curves = prof.curves(selector, "kv", "sinkless")                          # [L, U, G]
        L, U, _ = curves.shape
        flat = curves.reshape(L * U, -1)
        w = a.view(L, 1).expand(L, U).reshape(-1)
        b = weighted_optimal(flat, prof.grid, MEAN, body[fkey] * step, step, w)
        assert abs(float(b.mean()) - MEAN) < 1e-6, f"{phase} total not met"
        body.update({key: b.view(L, U).tolist(), rkey: eval_curves(flat, prof.grid, b).view(L, U).tolist()})
    return body, amp


def stores(phase: str, context: int, windows: int) -> list[dict]:
    """layer_sensitivity.py's copy-probe stores of a phase (run it first: --phase PHASE --probe copy)."""
    paths = [RESULTS / "raw" / f"layer_sensitivity.{phase}.copy.{context}.w{w}.json" for w in range(windows)]
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        raise SystemExit(f"no sensitivity stores {missing}: run benchmark/layer_sensitivity.py --phase {phase} "
                         f"--probe copy --context {context} first")
    return [json.loads(x.read_text()) for x in paths]


def config(name: str, key: str, flags: list[str], checksum: str) -> dict:
    return {"bench": "layer_weighted", "variant": name, "flags": flags, "budgets": checksum, "task": key,
            "max_tokens": MAX_TOKENS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["prefill+decode", "prefill+decode^0.5"],
                   help="which phases' budgets each variant weights (prefill, decode or prefill+decode), and "
                        "^POWER: weights a_l ** POWER (default 1)")
    p.add_argument("--sensitivity-context", type=int, default=4096)
    p.add_argument("--sensitivity-windows", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--keep", type=float, default=50.0, help="dense score (%%) a form needs to count (retrieval.py's)")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--no-run", action="store_true")
    p.add_argument("--raw", default=str(RESULTS / "raw" / "layer_weighted.json"))
    p.add_argument("--out", default=str(RESULTS / "layer_weighted.md"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    from sglang_shplb.artifacts import write_json

    variants = {}   # name -> (flags, checksum, body, amplification)
    for v in args.variants:
        spec, _, power = v.partition("^")
        phases = spec.split("+")
        if not set(phases) <= set(PHASES):
            p.error(f"--variants {v}: phases are {sorted(PHASES)}, joined by +, then ^POWER if any")
        body, amp = weighted_body({ph: stores(ph, args.sensitivity_context, args.sensitivity_windows)
                                   for ph in phases}, float(power or 1))
        name = f"weighted-{v}@{MEAN}"
        path = Path(f"/tmp/layer-{name}.json")
        write_json(path, "budget", body)
        variants[name] = (["--shplb-budgets", str(path)], json.loads(path.read_text())["checksum"], body, amp)
    tasks = build_tasks(AutoTokenizer.from_pretrained(prepare_model()), args.contexts, args.seeds)
    default = canonical(DEFAULT)
    base, kept, todo = kept_baseline(tasks, default, args.keep)
    todo = dict(sorted(todo.items(), key=lambda kv: -int(kv[0].split("/")[2])))   # longest first: where it lost
    rows = Rows(args.raw)
    if not args.no_run:
        with ThreadPoolExecutor(args.parallel) as pool:
            jobs = [pool.submit(run_variant, n, todo, rows, Path("/tmp"), flags,
                                lambda n, k, f, c=checksum: config(n, k, f, c))
                    for n, (flags, checksum, *_) in variants.items()]
            for j in jobs:
                j.result()
    raw = {"dense": base["dense"], default: base[default]}
    for n, (flags, checksum, *_) in variants.items():
        got = {k: rows.get(config(n, k, flags, checksum), flags_code(tuple(flags))) for k in todo}
        raw[n] = {k: r for k, r in got.items() if r is not None}
    render(args, kept, todo, raw, default, variants)


def render(args, kept, todo, raw, default, variants):
    lines = form_table(raw, [default, *variants], kept, todo)
    lines += ["", "| layer | " + " | ".join(f"{n}: {ph} a_l (relative), budget (layer mean)" for n, v in
                                             variants.items() for ph in v[3]) + " |",
              "|---|" + "---|" * sum(len(v[3]) for v in variants.values())]
    for layer in range(len(next(iter(variants.values()))[2]["budgets"])):
        cells = []
        for n, (_, _, body, amp) in variants.items():
            for ph, a in amp.items():
                b = torch.tensor(body[PHASES[ph][1]][layer]).mean()
                cells.append(f"{float(a[layer] / a.mean()):.2f}, {float(b):.3f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    write_result(args.out, "Budgets weighted by each layer's measured error amplification",
                 f"The default's budgets file with one or both phases re-allocated by weighted max-min at the same "
                 f"mean ({MEAN}), each layer weighted by a_l from layer_sensitivity.py's copy probe on the profile's "
                 f"texts (module docstring). Retrieval.py's prompts ({args.seeds} seeds per kept form); dense and "
                 "default rows are retrieval.py's stored rows. Goal (issue 33): no kept form loses more than 1.",
                 lines, "python benchmark/layer_weighted.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
