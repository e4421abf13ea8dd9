"""Issue 33: how near a tie is dense's own answer on the prompts the default loses? In-process, HF fp32, dense.

The per-form goal counts prompts a variant loses that dense answers. A prompt whose dense answer hangs on a token
that dense itself barely prefers can flip under any small change to the attention, sparse or not. So for each prompt of
the given forms this decodes dense's greedy answer in HF fp32 (the prompt text the server prefills, the same token
budget; it is the server's dense answer on most prompts, and the table says on how many) and takes at each answer
token, up to the end of the last expected value the answer contains, dense's lead: its top logit minus its second.
A prompt's lead is the smallest of those. Per form: the prompts dense answers (the server's stored dense row,
retrieval.py's), how many of them have a lead below 0.5 and 1 logit, and the lead of each prompt the default loses
(retrieval.py's stored default row).

Rows (raw/near_ties.json) are keyed by the prompt and the server's dense answer; they depend on the model alone.

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
from retrieval import MAX_TOKENS, RESULTS, build_tasks, canonical, form, kept_baseline, stored  # noqa: E402
from rows import Rows  # noqa: E402

from sglang_shplb.models import prepare_model  # noqa: E402

TIES = (0.5, 1.0)          # logits: a lead below these counts as a near tie
DEFAULT = "recipe+optimal@0.1"   # retrieval.py's name of the default recipe, whose rows are the baseline
# retrieval.py's other stored variants on these forms: decode-only (prefill dense), a 20% prefill, a 12.5% mean
OTHERS = ("optimal@0.1", "recipe0.2+optimal@0.1", "recipe+optimal@0.125")


def answer_span(tok, ids: list[int], answers) -> int:
    """How many of the answer's tokens reach the end of the last expected value its text contains (all of them when
    it contains none)."""
    text = tok.decode(ids)
    ends = [text.find(a) + len(a) for a in answers if a in text]
    if not ends:
        return len(ids)
    return next(i + 1 for i in range(len(ids)) if len(tok.decode(ids[: i + 1])) >= max(ends))


@torch.no_grad()
def leads(model, tok, task, max_tokens: int = MAX_TOKENS) -> dict:
    """HF fp32 dense's greedy answer (as the server decodes it: same prompt text, same token budget) and its lead at
    each token up to the last expected value: the top logit minus the second."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cur = torch.tensor([tok(task.prompt(tok), add_special_tokens=False).input_ids])
    ids, lead = [], []
    for _ in range(max_tokens):
        top2 = model(input_ids=cur, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].topk(2)
        ids.append(int(top2.indices[0]))
        lead.append(float(top2.values[0] - top2.values[1]))
        if ids[-1] == tok.eos_token_id:
            break
        cur = top2.indices[:1].view(1, 1)
    span = answer_span(tok, ids, task.answers)
    return {"output": tok.decode(ids, skip_special_tokens=True), "leads": lead[:span], "min": min(lead[:span])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", nargs="+", required=True, help="retrieval forms, family/level/context")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "near_ties.md"))
    p.add_argument("--variants", nargs="+", default=list(OTHERS),
                   help="retrieval.py variants whose stored rows are shown beside the default's")
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
    names = [default] + [canonical(v) for v in args.variants]
    base.update(stored(Rows(RESULTS / "raw" / "retrieval.json"), names[1:], todo, Path("/tmp"))[0])
    rows = Rows(RESULTS / "raw" / "near_ties.json")
    model = None
    got = {}
    for key, task in todo.items():
        dense = base["dense"].get(key)
        if dense is None:
            continue
        cfg = {"bench": "near_ties", "task": key, "dense_output": dense["output"], "max_tokens": MAX_TOKENS}
        got[key] = rows.get(cfg, "hf-fp32")
        if got[key] is None and not args.no_run:
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, attn_implementation="sdpa").eval()
            got[key] = leads(model, tok, task)
            rows.put(cfg, "hf-fp32", got[key])
            print(f"{key}: lead {got[key]['min']:.2f}", flush=True)
    write_result(args.out, "How near a tie dense's own answers are, on the forms the default loses 2",
                 __doc__.split("\n\n")[1].replace("\n", " ") + " The default is `" + default + "`.",
                 table(base, names, kept, got), "python benchmark/near_ties.py " + " ".join(sys.argv[1:]))


def table(base: dict, names: list[str], kept: list[str], got: dict) -> list[str]:
    """Per form: the prompts dense answers, how many hang on a near tie, and per variant the prompts it loses (each
    one's lead) and gains; then pooled per variant: its losses among the near ties and among the rest."""
    dense = base["dense"]
    got = {k: g for k, g in got.items() if g is not None}
    same = lambda k: got[k]["output"].strip() == dense[k]["output"].strip()   # noqa: E731
    lines = ["| form | dense answers | lead < 0.5 | lead < 1 | " + " | ".join(
        f"{n}: −lost (seed: lead) +gained" for n in names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    answered = [k for k in got if dense[k]["score"] > 0]
    for f in kept:
        mine = [k for k in answered if form(k) == f]
        cells = [str(len(mine))] + [str(sum(got[k]["min"] < t for k in mine)) for t in TIES]
        for n in names:
            keys = [k for k in got if form(k) == f and k in base[n]]
            lost = [k for k in keys if base[n][k]["score"] < dense[k]["score"]]
            gained = sum(base[n][k]["score"] > dense[k]["score"] for k in keys)
            where = ", ".join(f"{k.rsplit('/', 1)[1]}: {got[k]['min']:.2f}" + ("" if same(k) else "*") for k in lost)
            ran = "" if len(keys) == sum(form(k) == f for k in got) else f" ({len(keys)} prompts ran)"
            cells.append((f"−{len(lost)} ({where}) +{gained}" if lost else f"−0 +{gained}") + ran)
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "Pooled over these forms, the prompts dense answers that each variant ran: its losses among the "
              "near ties (lead < 0.5) and among the others.", "", "| variant | prompts | near ties: lost / of | "
              "the others: lost / of |", "|---|---|---|---|"]
    for n in names:
        keys = [k for k in answered if k in base[n]]
        tie = [k for k in keys if got[k]["min"] < TIES[0]]
        lost = {k for k in keys if base[n][k]["score"] < dense[k]["score"]}
        lines.append(f"| {n} | {len(keys)} | {len(lost & set(tie))} / {len(tie)} | "
                     f"{len(lost - set(tie))} / {len(keys) - len(tie)} |")
    lines += ["", f"HF fp32's greedy answer is the server's dense answer on {sum(map(same, got))} of {len(got)} "
              "prompts (* marks a lost prompt where it is not: its lead is on HF's own path)."]
    return lines


if __name__ == "__main__":
    main()
