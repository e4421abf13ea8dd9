"""What a serving worker needs from the artifacts: the decode budget of each local KV head.

SGLang's TP rank r holds a contiguous block of KV heads (after our load-time permutation, the
block the plan assigned). Budgets come from, in order: a plan (`rank_budgets` per rank), a
budgets file (contiguous slice of its per-KV-group budgets), or one uniform fraction.
"""
from __future__ import annotations

import torch

from .artifacts import ArtifactError
from .config import ShplbConfig


def local_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """KV heads held by a rank under SGLang's rules (replicated when kv heads < tp)."""
    if num_kv_heads >= tp_size:
        per = num_kv_heads // tp_size
        return list(range(tp_rank * per, (tp_rank + 1) * per))
    return [tp_rank * num_kv_heads // tp_size]


def rank_budgets(cfg: ShplbConfig, num_layers: int, num_kv_heads: int, tp_size: int, tp_rank: int,
                 fingerprint: str | None = None) -> torch.Tensor | None:
    """Budgets [num_layers, local kv heads] as fractions of context, or None when dense."""
    heads = local_kv_heads(num_kv_heads, tp_size, tp_rank)
    if cfg.plan:
        from .plan import load_plan

        plan = load_plan(cfg.plan, fingerprint)
        rows = [layer["rank_budgets"][tp_rank] for layer in plan["layers"]]
        out = torch.tensor(rows, dtype=torch.float64)
    elif cfg.budgets:
        from .budget import load_budgets

        body = load_budgets(cfg.budgets, fingerprint)
        if body["granularity"] != "kv":
            raise ArtifactError(f"budgets file {cfg.budgets} is per query head (granularity q); without GQA "
                                "expansion a KV group shares one selection: make kv budgets, or a q plan")
        out = torch.tensor(body["budgets"], dtype=torch.float64)
        if out.shape[1] != num_kv_heads:
            raise ArtifactError(f"budgets file {cfg.budgets} has {out.shape[1]} KV groups per layer, the model "
                                f"has {num_kv_heads}; make budgets for this model")
        out = out[:, heads]
    elif cfg.budget is not None:
        out = torch.full((num_layers, len(heads)), cfg.budget, dtype=torch.float64)
    else:
        return None
    if out.shape != (num_layers, len(heads)):
        raise ArtifactError(f"budgets resolve to shape {tuple(out.shape)} on tp rank {tp_rank}, expected "
                            f"[{num_layers} layers, {len(heads)} local KV heads]; the artifact is for another model/tp")
    return out
