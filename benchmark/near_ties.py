"""Issue 33: how near a tie is dense's own answer on the prompts the default loses? In-process, HF fp32, dense.

The per-form goal counts prompts a variant loses that dense answers. A prompt whose dense answer hangs on a token
that dense itself barely prefers is lost by any perturbation of the attention, sparse or not. So for each prompt of
the given forms this reads the prompt and the served dense answer (retrieval.py's stored row, the same server
answer the goal's table compares against) in one teacher-forced forward pass, and takes at each answer token,
up to the end of the last expected value the answer contains, dense's lead: its top logit minus its second. A
prompt's lead is the smallest of those. Per form: the prompts dense answers, how many of them have a lead below
0.5 and 1 logit, and the lead of each prompt the default loses (retrieval.py's stored default row).

Rows (raw/near_ties.json) are keyed by the prompt and the dense answer's text; they depend on the model alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmark/near_ties.py --forms multi_value/L1/4096 variable_track/L0/4096 \
        single_needle/L0/8000 --seeds 20
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmark")]

from common import write_result  # noqa: E402
from retrieval import RESULTS, build_tasks, canonical, form, kept_baseline  # noqa: E402
from rows import Rows  # noqa: E402

from sglang_shplb.models import prepare_model  # noqa: E402

TIES = (0.5, 1.0)          # logits: a lead below these counts as a near tie
DEFAULT = "recipe+optimal@0.1"   # retrieval.py's name of the default recipe, whose rows are the baseline


def answer_span(tok, output: str, answers) -> tuple[list[int], int]:
    """The output's tokens and how many of them reach the end of the last expected value it contains (all of them
    when it contains none)."""
    enc = tok(output, add_special_tokens=False, return_offsets_mapping=True)
    ends = [output.find(a) + len(a) for a in answers if a in output]
    if not ends:
        return enc.input_ids, len(enc.input_ids)
    end = max(ends)
    return enc.input_ids, next(i + 1 for i, (_, stop) in enumerate(enc.offset_mapping) if stop >= end)


@torch.no_grad()
def leads(model, tok, task, output: str) -> dict:
    """Dense's lead (top logit minus the second) at each answer token up to the last expected value, teacher-forced
    on `output`; whether dense's top token is the output's there (HF fp32 against the server's answer)."""
    prompt = tok(task.prompt(tok), add_special_tokens=False).input_ids
    ans, span = answer_span(tok, output, task.answers)
    # only the answer's positions go through the LM head (an 8k x 49k logit matrix would dominate the pass)
    logits = model(input_ids=torch.tensor([prompt + ans[:span]]), logits_to_keep=span + 1).logits[0, :span]
    top2 = logits.float().topk(2, -1)
    lead = (top2.values[:, 0] - top2.values[:, 1]).tolist()
    return {"leads": lead, "min": min(lead), "agree": (top2.indices[:, 0] == torch.tensor(ans[:span])).tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", nargs="+", required=True, help="retrieval forms, family/level/context")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "near_ties.md"))
    p.add_argument("--no-run", action="store_true", help="render the stored rows only")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    md = prepare_model()
    tok = AutoTokenizer.from_pretrained(md)
    contexts = sorted({int(f.rsplit("/", 1)[1]) for f in args.forms})
    tasks = build_tasks(tok, contexts, args.seeds)
    default = canonical(DEFAULT)
    base, kept, todo = kept_baseline(tasks, default, forms=args.forms)
    rows = Rows(RESULTS / "raw" / "near_ties.json")
    model = None
    got = {}
    for key, task in todo.items():
        dense = base["dense"].get(key)
        if dense is None:
            continue
        cfg = {"bench": "near_ties", "task": key, "dense_output": dense["output"]}
        got[key] = rows.get(cfg, "hf-fp32")
        if got[key] is None and not args.no_run:
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, attn_implementation="sdpa").eval()
            got[key] = leads(model, tok, task, dense["output"])
            rows.put(cfg, "hf-fp32", got[key])
            print(f"{key}: lead {got[key]['min']:.2f}", flush=True)
    write_result(args.out, "How near a tie dense's own answers are, on the forms the default loses 2",
                 __doc__.split("\n\n")[1].replace("\n", " ") + " The default is `" + default + "`.",
                 table(base, default, kept, got), "python benchmark/near_ties.py " + " ".join(sys.argv[1:]))


def table(base: dict, default: str, kept: list[str], got: dict) -> list[str]:
    dense, ours = base["dense"], base[default]
    lines = ["| form | dense answers | lead < 0.5 | lead < 1 | default lost: each one's lead | default gained |",
             "|---|---|---|---|---|---|"]
    pooled = {"answered": 0, "lost": 0, **{t: [0, 0] for t in TIES}}   # tie -> [prompts, of them lost]
    for f in kept:
        keys = [k for k in got if form(k) == f and got[k] is not None and k in ours]
        answered = [k for k in keys if dense[k]["score"] > 0]
        lost = [k for k in answered if ours[k]["score"] < dense[k]["score"]]
        gained = [k for k in keys if ours[k]["score"] > dense[k]["score"]]
        ties = {t: [k for k in answered if got[k]["min"] < t] for t in TIES}
        pooled["answered"] += len(answered)
        pooled["lost"] += len(lost)
        for t in TIES:
            pooled[t][0] += len(ties[t])
            pooled[t][1] += len(set(ties[t]) & set(lost))
        cells = [str(len(answered))] + [str(len(ties[t])) for t in TIES]
        cells.append(", ".join(f"seed {k.rsplit('/', 1)[1]}: {got[k]['min']:.2f}" for k in lost) or "none")
        cells.append(str(len(gained)))
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", f"Pooled: {pooled['answered']} prompts dense answers, the default loses {pooled['lost']}. "
              + "; ".join(f"{pooled[t][0]} have a lead below {t} and the default loses {pooled[t][1]} of them, "
                          f"{pooled['lost'] - pooled[t][1]} of the other {pooled['answered'] - pooled[t][0]}"
                          for t in TIES) + ".",
              "", "HF fp32 takes the server's dense token as its top one at "
              f"{sum(sum(g['agree']) for g in got.values() if g)} of {sum(len(g['agree']) for g in got.values() if g)}"
              " answer tokens."]
    return lines


if __name__ == "__main__":
    main()
