"""Stage 3 — plan: place units (KV groups or query heads) on TP ranks so every rank does the same work.

    python -m sglang_shplb.plan --profile PROFILE --mean-budget B --tp N --out PLAN.json
        [--granularity kv|q|auto] [--kv-memory-limit FACTOR] [--prefill-mean-budget B2] [--model PATH]
        [--report plan.png]                        joint solver (joint.py): budgets and placement together
    python -m sglang_shplb.plan --budgets BUDGETS.json --tp N --out PLAN.json
        [--placement contiguous|lpt|lpt-card|balanced] [--granularity kv|q] [--objective decode|prefill]
        [--fill-bubbles --profile PROFILE] [--model PATH | --head-dim D] [--cost-model COST.json]
        [--kv-memory-limit FACTOR] [--alt-budgets OTHER.json] [--report plan.png]

Step time = sum over layers of the max rank load. Every plan's summary holds its
`predicted_step_time`, the `uniform_step_time` of uniform budgets at the same mean (for the joint
solver: uniform-B at kv granularity, the time it was held to) and their `step_time_ratio`.

A layer waits for its slowest rank (all-reduce after o_proj), so per layer we minimize the max rank
load. Units: `kv` = one KV head with its query group (SGLang's own sharding unit); `q` = one query
head, after expanding GQA to MHA (each query head gets a copy of its group's K/V: the same model,
kv_memory_factor = group size times the KV cache). Cost of a unit (one layer, per decoded token):
  decode   KV bytes read    = budget * context_len * 2 (K,V) * head_dim * kv_bytes
  prefill  attention FLOPs  = budget * context_len * head_dim * 4 * query heads in the unit
           (with the budgets file's `prefill_budgets` when it has them, else its decode budgets)
each times `scale` plus a per-unit `fixed`, from an optional --cost-model JSON (calibration hook):
  {"kv_bytes": 2, "decode": {"scale": 1.0, "fixed": 0.0}, "prefill": {"scale": 1.0, "fixed": 0.0}}

The backend reads layers[l].rank_budgets[tp_rank][i]: budget (fraction of context) of the i-th
local head (KV head at `kv`, query head = expanded KV head at `q`) of that rank, and
layers[l].rank_prefill_budgets (present when the budgets file has prefill budgets) the same way.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from . import placement as pl
from .artifacts import ArtifactError, model_fingerprint, model_shape

GRANULARITIES = ("kv", "q")
OBJECTIVES = ("decode", "prefill")
DEFAULT_COST = {"kv_bytes": 2, "decode": {"scale": 1.0, "fixed": 0.0}, "prefill": {"scale": 1.0, "fixed": 0.0}}


# ---------------------------------------------------------------- units and costs
def unit_budgets(budgets: dict, granularity: str, key: str = "budgets", cast=float) -> list[list]:
    """[layers][units] budgets (`key`: decode 'budgets' or 'prefill_budgets'; 'label_channels' with
    cast=list) at `granularity`; a kv file expands to q (each query head gets its group's entry). A q
    file cannot be folded to kv: a shared selection needs its own budget."""
    src = budgets["granularity"]
    rows = budgets[key]
    if granularity == src:
        return [list(map(cast, r)) for r in rows]
    if src == "kv" and granularity == "q":
        g = budgets["num_q_heads"] // budgets["num_kv_heads"]
        return [[cast(r[h // g]) for h in range(budgets["num_q_heads"])] for r in rows]
    raise ArtifactError("budgets are per query head (granularity q) but --granularity kv was asked; make a "
                        "kv budgets file with `python -m sglang_shplb.budget --granularity kv`")


def load_cost_model(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_COST))
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cost model {path} cannot be read as JSON ({e}); fix or drop --cost-model") from None
    cm = json.loads(json.dumps(DEFAULT_COST))
    unknown = set(raw) - set(cm)
    if unknown or any(set(raw.get(o, {})) - {"scale", "fixed"} for o in OBJECTIVES):
        raise ArtifactError(f"cost model {path} has unknown keys; allowed: {json.dumps(DEFAULT_COST)}")
    for o in OBJECTIVES:
        cm[o].update(raw.get(o, {}))
    cm["kv_bytes"] = raw.get("kv_bytes", cm["kv_bytes"])
    bad = [f"{o}.scale" for o in OBJECTIVES if not cm[o]["scale"] > 0] + \
          [f"{o}.fixed" for o in OBJECTIVES if not cm[o]["fixed"] >= 0] + \
          (["kv_bytes"] if not cm["kv_bytes"] > 0 else [])
    if bad:
        raise ArtifactError(f"cost model {path}: {', '.join(bad)} out of range (scale and kv_bytes > 0, fixed >= 0)")
    return cm


def cost_coefs(budgets: dict, granularity: str, head_dim: int, cost_model: dict) -> dict:
    """Per objective: (cost per unit of budget, fixed cost per unit); the same for all units."""
    ctx = budgets["context_len"]
    q_per_unit = budgets["num_q_heads"] // budgets["num_kv_heads"] if granularity == "kv" else 1
    base = {"decode": ctx * 2 * head_dim * cost_model["kv_bytes"], "prefill": ctx * head_dim * 4 * q_per_unit}
    return {o: (cost_model[o]["scale"] * base[o], cost_model[o]["fixed"]) for o in OBJECTIVES}


def unit_costs(row: list[float], coef: tuple[float, float]) -> list[float]:
    return [coef[0] * b + coef[1] for b in row]


# ---------------------------------------------------------------- fill bubbles
def fill_bubbles(row: torch.Tensor, ranks, coef, curves: torch.Tensor, grid: torch.Tensor, step: float) -> torch.Tensor:
    """Raise budgets on under-loaded ranks, best marginal predicted recovery first (capped at 1.0),
    until each rank's load reaches the layer max. The max rank is untouched, so latency is too."""
    from .budget import _spend_leftover

    row = row.clone()
    loads = [sum(coef[0] * float(row[u]) + coef[1] for u in r) for r in ranks]
    top = max(loads)
    for r, load in zip(ranks, loads):
        slack = (top - load) / coef[0]              # in budget units (cost per budget is uniform)
        if slack > 1e-12:
            idx = torch.tensor(r)
            row[idx] = _spend_leftover(curves[idx], grid, row[idx].clone(), slack, step)
    return row


# ---------------------------------------------------------------- planning
def _check_divisible(units: int, tp: int, granularity: str, q_heads: int) -> None:
    if tp < 1 or units % tp:
        alt = "" if granularity == "q" or q_heads % tp else "; or use --granularity q (query heads as units)"
        raise ArtifactError(f"{units} {'KV heads' if granularity == 'kv' else 'query heads'} cannot be split "
                            f"evenly over tp={tp} (SGLang gives every rank the same number of heads); use a "
                            f"--tp that divides {units}{alt}")


def plan_layer(costs: list[float], tp: int, method: str, ranks=None) -> dict:
    """Place one layer (or take `ranks` as given). `optimal`: balanced ran the exact search (small
    layer), so its max load is the optimum and also the tightest lower bound."""
    ranks = pl.place(costs, tp, method) if ranks is None else [sorted(r) for r in ranks]
    loads = pl.rank_loads(costs, ranks)
    lb = pl.lower_bound(costs, tp, equal_count=method != "lpt")
    optimal = (method == "balanced" and len(costs) <= pl.EXACT_MAX_UNITS) or max(loads) <= lb * (1 + 1e-12)
    return {"rank_units": ranks, "rank_load": loads, "imbalance": pl.imbalance(costs, ranks), "optimal": optimal,
            "lower_bound": max(loads) if optimal else lb}


def make_plan(budgets: dict, tp: int, placement: str = "balanced", granularity: str | None = None,
              objective: str = "decode", head_dim: int | None = None, cost_model: dict | None = None,
              profile=None, fill: bool = False, kv_memory_limit: float | None = None,
              placements: list | None = None) -> dict:
    """Budgets artifact -> plan body (see module doc). `placements` [layer][rank] fixes the
    placement (the joint solver's) instead of running `placement`."""
    granularity = granularity or budgets["granularity"]
    if placement not in pl.METHODS or granularity not in GRANULARITIES or objective not in OBJECTIVES:
        raise ArtifactError(f"choose --placement from {pl.METHODS}, --granularity from {GRANULARITIES}, "
                            f"--objective from {OBJECTIVES}")
    Hq, Hkv = budgets["num_q_heads"], budgets["num_kv_heads"]
    factor = Hq / Hkv if granularity == "q" else 1.0
    if kv_memory_limit is not None and factor > kv_memory_limit:
        raise ArtifactError(f"--granularity q needs {factor:g}x the KV cache (one copy per query head), above "
                            f"--kv-memory-limit {kv_memory_limit:g}; use --granularity kv or raise the limit")
    rows = unit_budgets(budgets, granularity)
    prefill_rows = unit_budgets(budgets, granularity, "prefill_budgets") if "prefill_budgets" in budgets else None
    _check_divisible(len(rows[0]), tp, granularity, Hq)
    cost_model = cost_model or load_cost_model(None)
    coefs = cost_coefs(budgets, granularity, head_dim or 1, cost_model)
    if fill and profile is None:
        raise ArtifactError("fill-bubbles needs a profile (its recovery curves); pass --profile PROFILE")
    metric = budgets.get("metric", "total")
    curves = profile.curves(budgets["selector"], granularity, metric).double() if profile is not None else None
    if curves is not None and tuple(curves.shape[:2]) != (len(rows), len(rows[0])):
        raise ArtifactError(f"profile has {tuple(curves.shape[:2])} (layers, units) at {granularity} granularity "
                            f"but the budgets give {(len(rows), len(rows[0]))}; use the profile the budgets came from")
    step = budgets["page_size"] / budgets["context_len"]
    layers, rec_before, rec_after = [], [], []
    for l, row in enumerate(rows):
        pre = prefill_rows[l] if prefill_rows else None
        lay = plan_layer(unit_costs(pre if objective == "prefill" and pre else row, coefs[objective]), tp, placement,
                         None if placements is None else placements[l])
        b0 = torch.tensor(row, dtype=torch.float64)
        b = fill_bubbles(b0, lay["rank_units"], coefs[objective], curves[l], profile.grid, step) if fill else b0
        entry = _layer_entry(l, lay, row, b.tolist(), coefs, objective, tp, pre)
        if curves is not None:
            from .curves import eval_curves
            rec_before.append(eval_curves(curves[l], profile.grid, b0))
            rec_after.append(eval_curves(curves[l], profile.grid, b))
            entry["unit_recovery"] = rec_after[-1].tolist()
        layers.append(entry)
    body = {
        "model_fingerprint": budgets["model_fingerprint"], "tp_size": tp, "granularity": granularity,
        "placement": placement, "objective": objective, "num_layers": len(rows), "num_q_heads": Hq,
        "num_kv_heads": Hkv, "served_num_kv_heads": Hq if granularity == "q" else Hkv, "head_dim": head_dim,
        "kv_memory_factor": factor, "units_per_rank": len(rows[0]) // tp,
        "equal_count": all(pl.is_equal_count(x["rank_units"]) for x in layers),
        "fill_bubbles": fill, "cost_model": cost_model,
        "cost_units": {"decode": "bytes read" if head_dim else "bytes read / head_dim",
                       "prefill": "FLOPs per query token" if head_dim else "FLOPs per query token / head_dim"},
        **{k: budgets[k]
           for k in ("page_size", "context_len", "floor_pages", "sink_pages", "recent_pages", "selector")},
        "budget_method": budgets["method"], "mean_budget": budgets["mean_budget"],
        "budget_granularity": budgets["granularity"], "layers": layers,
    }
    if "label_channels" in budgets:     # per unit, in unit order (serving picks each rank's)
        body["label_channels"] = unit_budgets(budgets, granularity, "label_channels", list)
    body["summary"] = _summary(layers, rec_before, rec_after)
    mean = sum(map(sum, rows)) / sum(map(len, rows))
    body["summary"].update(step_times(body, uniform_step_time(len(rows), len(rows[0]), tp, mean, coefs[objective]),
                                      granularity))
    return body


def uniform_step_time(layers: int, units: int, tp: int, mean: float, coef) -> float:
    """Sum over layers of the max rank load when every unit has budget `mean`."""
    return layers * (units // tp) * (coef[0] * mean + coef[1])


def step_times(body: dict, uniform: float, uniform_granularity: str) -> dict:
    """The plan's predicted step time (sum over layers of the max rank load, after any filling)
    next to uniform's at the same mean: what the unequal budgets cost the hardware."""
    t = sum(max(x["rank_load"]) for x in body["layers"])
    return {"predicted_step_time": t, "uniform_step_time": uniform, "uniform_granularity": uniform_granularity,
            "step_time_ratio": t / uniform}


def _layer_entry(l, lay, row, unit_b, coefs, objective, tp, prefill=None) -> dict:
    """`row`: budgets as planned; `unit_b`: after fill-bubbles (the same when not filling);
    `prefill`: the units' prefill budgets, if any (prefill costs then come from them).
    `imbalance`/`lower_bound`/`contiguous_*` describe the placement, i.e. the planned budgets."""
    ranks = lay["rank_units"]
    costs = {o: unit_costs(prefill if o == "prefill" and prefill else unit_b, coefs[o]) for o in OBJECTIVES}
    planned = unit_costs(prefill if objective == "prefill" and prefill else row, coefs[objective])
    base = pl.contiguous(planned, tp)
    extra = {} if prefill is None else {"unit_prefill_budgets": prefill,
                                        "rank_prefill_budgets": [[prefill[u] for u in r] for r in ranks]}
    return {**extra,
        "layer": l, "rank_units": ranks, "unit_budgets": unit_b,
        "rank_budgets": [[unit_b[u] for u in r] for r in ranks],
        "rank_load": pl.rank_loads(costs[objective], ranks),
        "rank_cost": {o: pl.rank_loads(costs[o], ranks) for o in OBJECTIVES},
        "imbalance": lay["imbalance"], "lower_bound": lay["lower_bound"], "optimal": lay["optimal"],
        "filled_imbalance": pl.imbalance(costs[objective], ranks),
        "contiguous_rank_load": pl.rank_loads(planned, base),
        "contiguous_imbalance": pl.imbalance(planned, base),
    }


def _summary(layers, rec_before, rec_after) -> dict:
    imb = [x["imbalance"] for x in layers]
    base = [x["contiguous_imbalance"] for x in layers]
    s = {"max_imbalance": max(imb), "mean_imbalance": sum(imb) / len(imb),
         "filled_mean_imbalance": sum(x["filled_imbalance"] for x in layers) / len(layers),
         "contiguous_max_imbalance": max(base), "contiguous_mean_imbalance": sum(base) / len(base),
         "total_max_rank_load": sum(max(x["rank_load"]) for x in layers),
         "contiguous_total_max_rank_load": sum(max(x["contiguous_rank_load"]) for x in layers),
         "total_lower_bound": sum(x["lower_bound"] for x in layers),
         "layers_proven_optimal": sum(x["optimal"] for x in layers)}
    if rec_before:
        before, after = float(torch.stack(rec_before).mean()), float(torch.stack(rec_after).mean())
        s.update(mean_recovery_before=before, mean_recovery=after, recovery_gain=after - before,
                 worst_recovery=float(torch.stack(rec_after).min()))
    return s


# ---------------------------------------------------------------- loading and checking
def plan_id(body: dict) -> str:
    """Short content id of a plan (names it in logs and in permuted checkpoints)."""
    clean = {k: v for k, v in body.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:12]


def load_plan(path, fingerprint: str | None = None) -> dict:
    """Read, checksum and structurally validate a plan artifact (schema.Plan); returns its body."""
    from .schema import Plan

    return Plan.load(path, fingerprint).to_json()


def permuted_marker(model_path) -> dict | None:
    """The `shplb_permuted` entry that `python -m sglang_shplb.permute` writes into config.json."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return cfg.get("shplb_permuted")


def check_plan(plan: dict, model_path, tp_size: int) -> None:
    """Raise ArtifactError (one sentence) unless `plan` fits this model checkpoint and --tp."""
    marker = permuted_marker(model_path)
    if marker is not None:   # an offline-permuted checkpoint: it must be the output of this very plan
        if marker.get("plan_id") != plan_id(plan):
            raise ArtifactError(f"{model_path} was permuted for plan {marker.get('plan_id')}, not this plan "
                                f"{plan_id(plan)}; serve the original checkpoint with this plan or re-run permute")
        shape = marker["source_shape"]
    else:
        fp = model_fingerprint(model_path)
        if plan["model_fingerprint"] != fp:
            raise ArtifactError(f"plan was made for another model (fingerprint {plan['model_fingerprint']} != "
                                f"{fp} of {model_path}); re-run profile/budget/plan for this model")
        shape = model_shape(model_path)
    have = (shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"])
    want = (plan["num_layers"], plan["num_q_heads"], plan["num_kv_heads"])
    if have != want:
        raise ArtifactError(f"plan is for (layers, q heads, kv heads) = {want} but {model_path} has {have}; "
                            "re-run plan for this model")
    if plan["tp_size"] != tp_size:
        raise ArtifactError(f"plan was made for tp={plan['tp_size']} but the server uses tp={tp_size}; "
                            f"re-run `python -m sglang_shplb.plan --tp {tp_size}` or pass --tp {plan['tp_size']}")


def rank_budget_table(plan: dict, tp_rank: int) -> list[list[float]]:
    """[layer][local head] budgets of one rank (the backend's view of the plan)."""
    return [x["rank_budgets"][tp_rank] for x in plan["layers"]]


if __name__ == "__main__":   # `python -m sglang_shplb.plan` runs the CLI; the library never imports it
    from sglang_shplb.plan_cli import main

    sys.exit(main())
