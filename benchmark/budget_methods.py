"""Predicted recovery of the budget methods at equal totals, on a real profile.

    python benchmark/budget_methods.py [--profile P] [--out benchmark/results/budget_methods.md]

For mean budgets 2/5/10/20% and both granularities, prints mean and worst-case predicted recovery
(runtime selector curves) for uniform, shift (the paper) and optimal (ours), and the ratio
optimal/uniform of the worst case. Takes a few seconds.
"""
import argparse
import sys
import time
from pathlib import Path

from sglang_shplb.budget import METHODS, make_budgets
from sglang_shplb.profile import Profile

DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
MEANS = (0.02, 0.05, 0.10, 0.20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=str(DEFAULT_PROFILE))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "budget_methods.md"))
    args = p.parse_args()
    prof = Profile.load(args.profile)
    rows = ["| granularity | mean budget | " + " | ".join(f"{m} mean / worst" for m in METHODS)
            + " | worst: optimal / uniform |", "|---|---|" + "---|" * (len(METHODS) + 1)]
    for gran in ("kv", "q"):
        for mean in MEANS:
            res = {m: make_budgets(prof, mean, m, gran)["summary"] for m in METHODS}
            cells = [f"{res[m]['mean_recovery']:.4f} / {res[m]['worst_recovery']:.4f}" for m in METHODS]
            ratio = res["optimal"]["worst_recovery"] / res["uniform"]["worst_recovery"]
            rows.append(f"| {gran} | {mean:.2f} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    text = "\n".join([
        "# Budget methods: predicted recovery at equal totals", "",
        f"Profile: `{Path(args.profile).name}` (model {prof.meta['model']}, context {prof.meta['context_lens']}, "
        f"page {prof.meta['page_size']}, corpus {prof.meta['corpus']}). Runtime-selector curves, "
        "sinkless recovery (share of the mass outside the always-kept sink pages; see budget.py).",
        f"Generated {time.strftime('%Y-%m-%d')} by `python benchmark/budget_methods.py`.", "", *rows, ""])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
