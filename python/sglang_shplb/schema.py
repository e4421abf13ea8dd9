"""Typed views of the budgets and plan artifacts: what serving reads, validated once, no string-built keys.

The JSON files stay the interchange format (`artifacts.write_json`/`read_json`: schema, fingerprint,
checksum); `Budgets.load` / `Plan.load` read one, check its structure and hand out the per-phase
tables serving needs. `to_json()` gives back the exact validated body (plan_id, permute and the
CLI keep working on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .artifacts import ArtifactError

PHASES = ("decode", "prefill")


def _phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def _table(rows, what: str, layers: int, path) -> torch.Tensor:
    try:
        t = torch.tensor(rows, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ArtifactError(f"{path}: {what} is not a [layers][units] table of numbers; regenerate it") from None
    if t.dim() != 2 or t.shape[0] != layers:
        raise ArtifactError(f"{path}: {what} has shape {tuple(t.shape)}, expected [num_layers={layers}, units]")
    if not bool(((t > 0) & (t <= 1)).all()):
        raise ArtifactError(f"{path}: {what} has budgets outside (0, 1]; regenerate it")
    return t


def _labels(rows, layers: int, units: int, path) -> Optional[torch.Tensor]:
    """Calibrated label channels [layers, units, r] (selection.label_channels), or None when absent."""
    if rows is None:
        return None
    try:
        t = torch.tensor(rows, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        raise ArtifactError(f"{path}: label_channels is not a [layers][units][r] table of integers; "
                            "regenerate it") from None
    if t.dim() != 3 or tuple(t.shape[:2]) != (layers, units) or t.shape[2] < 1:
        raise ArtifactError(f"{path}: label_channels has shape {tuple(t.shape)}, expected [{layers}, {units}, r]; "
                            "regenerate it")
    if bool((t < 0).any()) or any(len(set(r)) != len(r) for r in t.flatten(0, 1).tolist()):
        raise ArtifactError(f"{path}: label_channels has negative or repeated channels; regenerate it")
    return t


class _Artifact:
    """What both artifacts share: read + checksum + validate once, the JSON body, the reference context."""
    KIND = ""
    body: dict

    @classmethod
    def load(cls, path, fingerprint: str | None = None):
        from .artifacts import read_json
        return cls.from_json(read_json(path, cls.KIND, fingerprint), path)

    def to_json(self) -> dict:
        return self.body

    @property
    def ref_context(self) -> Optional[int]:
        """Tokens of context the budgets were made at (selection.pages_for_budget's reference)."""
        return self.body.get("context_len")


@dataclass(frozen=True)
class Budgets(_Artifact):
    """A budgets artifact: per-unit decode (and optional prefill) budgets, [layers, units]."""
    model_fingerprint: str
    granularity: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    mean_budget: float
    decode: torch.Tensor
    prefill: Optional[torch.Tensor]
    body: dict
    labels: Optional[torch.Tensor] = None    # label channels [layers, units, r] (None: uncalibrated profile)

    @classmethod
    def from_json(cls, body: dict, path=None) -> "Budgets":
        try:
            L = body["num_layers"]
            decode = _table(body["budgets"], "budgets", L, path)
            prefill = _table(body["prefill_budgets"], "prefill_budgets", L, path) if "prefill_budgets" in body else None
            labels = _labels(body.get("label_channels"), L, decode.shape[1], path)
            return cls(body["model_fingerprint"], body["granularity"], L, body["num_q_heads"], body["num_kv_heads"],
                       float(body["mean_budget"]), decode, prefill, body, labels)
        except KeyError as e:
            raise ArtifactError(f"budgets file {path} lacks field {e}; regenerate it with "
                                "`python -m sglang_shplb.budget`") from None

    KIND = "budget"

    def table(self, phase: str) -> Optional[torch.Tensor]:
        """[layers, units] budgets of `phase`, or None (a file without prefill budgets: dense prefill)."""
        _phase(phase)
        return self.decode if phase == "decode" else self.prefill


@dataclass(frozen=True)
class Plan(_Artifact):
    """A plan artifact: per layer, which units each TP rank holds and their budgets."""
    model_fingerprint: str
    tp_size: int
    granularity: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    served_num_kv_heads: int
    rank_units: tuple                    # [layer][rank] -> tuple of unit ids
    decode: torch.Tensor                 # [layers, tp, units per rank]
    prefill: Optional[torch.Tensor]      # same, or None (dense prefill)
    body: dict
    labels: Optional[torch.Tensor] = None   # label channels [layers, units, r], unit order (None: uncalibrated)

    @classmethod
    def from_json(cls, body: dict, path=None) -> "Plan":
        try:
            tp, gran, L = body["tp_size"], body["granularity"], body["num_layers"]
            units = body["num_q_heads"] if gran == "q" else body["num_kv_heads"]
            layers = body["layers"]
            ok = len(layers) == L and all(
                len(x["rank_units"]) == tp and sorted(u for r in x["rank_units"] for u in r) == list(range(units))
                and [len(r) for r in x["rank_budgets"]] == [len(r) for r in x["rank_units"]] for x in layers)
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"plan file {path} lacks field {e}; regenerate it with "
                                "`python -m sglang_shplb.plan`") from None
        if not ok:
            raise ArtifactError(f"plan file {path} does not place every unit exactly once on {tp} ranks in every "
                                "layer; regenerate it with `python -m sglang_shplb.plan`")
        if not body.get("equal_count", False) or len({len(r) for x in layers for r in x["rank_units"]}) != 1:
            raise ArtifactError(f"plan file {path} gives ranks different numbers of heads, which SGLang cannot "
                                "load; regenerate it with --placement balanced")
        decode = _table([[b for r in x["rank_budgets"] for b in r] for x in layers], "rank_budgets", L, path)
        has_pre = all("rank_prefill_budgets" in x for x in layers)
        prefill = _table([[b for r in x["rank_prefill_budgets"] for b in r] for x in layers],
                         "rank_prefill_budgets", L, path) if has_pre else None
        return cls(body["model_fingerprint"], tp, gran, L, body["num_q_heads"], body["num_kv_heads"],
                   body.get("served_num_kv_heads", body["num_kv_heads"]),
                   tuple(tuple(tuple(r) for r in x["rank_units"]) for x in layers),
                   decode.view(L, tp, -1), None if prefill is None else prefill.view(L, tp, -1), body,
                   _labels(body.get("label_channels"), L, units, path))

    KIND = "plan"

    def rank_table(self, tp_rank: int, phase: str) -> Optional[torch.Tensor]:
        """[layers, local heads] budgets of one rank for `phase`, or None (dense prefill)."""
        _phase(phase)
        t = self.decode if phase == "decode" else self.prefill
        return None if t is None else t[:, tp_rank].clone()

    def rank_labels(self, tp_rank: int) -> Optional[torch.Tensor]:
        """[layers, local heads, r] label channels of one rank's units, in the order the weight hook
        places them (rank_units), or None."""
        if self.labels is None:
            return None
        return torch.stack([self.labels[l, list(units[tp_rank])] for l, units in enumerate(self.rank_units)])
