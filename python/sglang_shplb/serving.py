"""What a serving worker needs from the artifacts: the decode and prefill budget of each local KV head.

SGLang's TP rank r holds a contiguous block of KV heads (after our load-time permutation, the
block the plan assigned). Decode budgets come from, in order: a plan (`rank_budgets` per rank), a
budgets file (contiguous slice of its per-KV-group budgets), or one uniform fraction. Prefill
budgets: the uniform --shplb-prefill-budget if given, else the artifact's optional
`rank_prefill_budgets` (plan) / `prefill_budgets` (budgets file), else dense prefill.
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
                 fingerprint: str | None = None, phase: str = "decode") -> torch.Tensor | None:
    """Budgets [num_layers, local kv heads] of `phase` ('decode'|'prefill') as fractions of
    context, or None when that phase runs dense."""
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    heads = local_kv_heads(num_kv_heads, tp_size, tp_rank)
    uniform = cfg.budget if phase == "decode" else cfg.prefill_budget
    prefix = "" if phase == "decode" else "prefill_"
    if uniform is not None and (phase == "prefill" or not (cfg.plan or cfg.budgets)):
        out = torch.full((num_layers, len(heads)), uniform, dtype=torch.float64)
    elif cfg.plan:
        out = _plan_budgets(cfg, fingerprint, tp_rank, f"rank_{prefix}budgets")
    elif cfg.budgets:
        out = _file_budgets(cfg, fingerprint, num_kv_heads, f"{prefix}budgets")
        out = None if out is None else out[:, heads]
    else:
        return None
    if out is None:
        return None
    if out.shape != (num_layers, len(heads)):
        raise ArtifactError(f"budgets resolve to shape {tuple(out.shape)} on tp rank {tp_rank}, expected "
                            f"[{num_layers} layers, {len(heads)} local KV heads]; the artifact is for another model/tp")
    return out


def _plan_budgets(cfg: ShplbConfig, fingerprint, tp_rank: int, key: str) -> torch.Tensor | None:
    from .plan import load_plan

    plan = load_plan(cfg.plan, fingerprint)
    if key not in plan["layers"][0]:
        return None               # a plan without prefill budgets: dense prefill
    return torch.tensor([layer[key][tp_rank] for layer in plan["layers"]], dtype=torch.float64)


def _file_budgets(cfg: ShplbConfig, fingerprint, num_kv_heads: int, key: str) -> torch.Tensor | None:
    from .budget import load_budgets

    body = load_budgets(cfg.budgets, fingerprint)
    if key not in body:
        return None               # budgets made before prefill budgets existed: dense prefill
    if body["granularity"] != "kv":
        raise ArtifactError(f"budgets file {cfg.budgets} is per query head (granularity q); without GQA "
                            "expansion a KV group shares one selection: make kv budgets, or a q plan")
    out = torch.tensor(body[key], dtype=torch.float64)
    if out.shape[1] != num_kv_heads:
        raise ArtifactError(f"budgets file {cfg.budgets} has {out.shape[1]} KV groups per layer, the model "
                            f"has {num_kv_heads}; make budgets for this model")
    return out
