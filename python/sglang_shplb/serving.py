"""What a serving worker needs from the artifacts, resolved once per process: the decode and prefill
budget of each local KV head, and the plan (shared by the backend and the load-time weight hook).

SGLang's TP rank r holds a contiguous block of KV heads (after our load-time permutation, the
block the plan assigned). Decode budgets come from, in order: a plan (its rank's table), a budgets
file (contiguous slice of its per-KV-group budgets), or one uniform fraction. Prefill budgets: the
--shplb-uniform-prefill-budget if given, else the artifact's optional prefill table, else dense.
Label channels (the default selector's calibration) come with the decode budgets' artifact (for a
--shplb-uniform-budget: from --shplb-profile), mapped to the same local heads; `decode_selector` picks
the selector: --shplb-selector, else the label default when channels are given, else the uncalibrated one.
Each artifact file is read and checksummed once per process (`artifact`), whoever asks first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import selection as sel
from .artifacts import ArtifactError
from .config import ShplbConfig
from .schema import Budgets, Plan

_artifacts: dict = {}     # (kind, path, fingerprint) -> Budgets | Plan | Profile
_resolved: dict = {}      # (config, shape) -> RankBudgets


def _stamp(path: str | None):
    """A file's identity for the caches: a rewritten file is read again."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        raise ArtifactError(f"artifact file {path} does not exist") from None
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def artifact(kind: str, path: str, fingerprint: str | None = None):
    """The typed artifact at `path` ('plan' | 'budget' | 'profile'), loaded and validated once per process."""
    key = (kind, _stamp(path), fingerprint)
    if key not in _artifacts:
        if kind == "profile":
            from .profile import Profile

            _artifacts[key] = Profile.load(path, fingerprint)
        else:
            _artifacts[key] = (Plan if kind == "plan" else Budgets).load(path, fingerprint)
    return _artifacts[key]


@dataclass(frozen=True)
class RankBudgets:
    """One TP worker's budgets: decode/prefill [num_layers, local KV heads] (None: that phase runs
    dense), the plan they came from (None without one), and the context in tokens the budgets were
    made at (None for --shplb-uniform-budget: a plain fraction of every context)."""
    tp_rank: int
    tp_size: int
    decode: Optional[torch.Tensor]
    prefill: Optional[torch.Tensor]
    plan: Optional[Plan]
    ref_context: Optional[int] = None
    ref_mean: Optional[float] = None            # the whole model's mean sparse decode budget there (BudgetRef)
    selector: str = sel.UNCALIBRATED_SELECTOR   # the decode selector (decode_selector)
    labels: Optional[torch.Tensor] = None       # its label channels [num_layers, local KV heads, r], best first

    def budget_ref(self, page_size: int) -> Optional[sel.BudgetRef]:
        """selection.pages_for_budget's reference, in pages of `page_size` (None: a uniform budget)."""
        return None if self.ref_context is None else sel.BudgetRef(-(-self.ref_context // page_size), self.ref_mean)

    def table(self, phase: str) -> Optional[torch.Tensor]:
        if phase not in ("decode", "prefill"):
            raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
        return self.decode if phase == "decode" else self.prefill


def _decode_source(cfg: ShplbConfig, fingerprint: str | None = None):
    """The artifact the decode budgets come from (plan or budgets file), or None (uniform/dense)."""
    if cfg.plan:
        return artifact("plan", cfg.plan, fingerprint)
    return artifact("budget", cfg.budgets, fingerprint) if cfg.budgets else None


def _profile_labels(cfg: ShplbConfig, fingerprint: str | None = None) -> Optional[torch.Tensor]:
    """A uniform budget's label channels [layers, KV heads, r] from --shplb-profile (None without one)."""
    if not cfg.profile:
        return None
    labels = artifact("profile", cfg.profile, fingerprint).label_channels("kv")
    if labels is None:
        raise ArtifactError(f"--shplb-profile {cfg.profile} has no label channels (made before label calibration); "
                            "re-run `python -m sglang_shplb.profile`")
    return labels


def decode_selector(cfg: ShplbConfig, fingerprint: str | None = None) -> str:
    """The decode selector this configuration serves: --shplb-selector if given (a label selector only
    with calibrated channels: in the budgets/plan artifact, or from --shplb-profile for a uniform budget),
    else selection.DEFAULT_SELECTOR when there are channels, else selection.UNCALIBRATED_SELECTOR."""
    src = _decode_source(cfg, fingerprint)
    labels = _profile_labels(cfg, fingerprint) if src is None else src.labels
    name = cfg.selector or (sel.DEFAULT_SELECTOR if labels is not None else sel.UNCALIBRATED_SELECTOR)
    rule = sel.get_selector(name)
    if rule.label and labels is None:
        where = f"{cfg.plan or cfg.budgets} has none" if src is not None else \
            "no budgets, plan or profile file was given"
        raise ArtifactError(f"--shplb-selector {name} reads label channels calibrated by the profile, but {where}; "
                            "re-run `python -m sglang_shplb.budget` (and `plan`) from a profile made by this version, "
                            f"or choose another --shplb-selector (e.g. {sel.UNCALIBRATED_SELECTOR})")
    if rule.label and labels.shape[-1] < rule.keys:
        raise ArtifactError(f"{cfg.plan or cfg.budgets or cfg.profile} carries {labels.shape[-1]} label channels "
                            f"per head; --shplb-selector {name} reads {rule.keys}; choose a label selector with fewer")
    if rule.sub and (rule.sub > cfg.page_size or cfg.page_size % rule.sub):
        raise ArtifactError(f"selector {name} scores {rule.sub}-token sub-pages, which do not tile --shplb-page-size "
                            f"{cfg.page_size}; use a page size that is a multiple of {rule.sub} or another "
                            "--shplb-selector")
    return name


def local_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """KV heads held by a rank under SGLang's rules (replicated when kv heads < tp)."""
    if num_kv_heads >= tp_size:
        per = num_kv_heads // tp_size
        return list(range(tp_rank * per, (tp_rank + 1) * per))
    return [tp_rank * num_kv_heads // tp_size]


def resolve(cfg: ShplbConfig, num_layers: int, num_kv_heads: int, tp_size: int, tp_rank: int,
            fingerprint: str | None = None) -> RankBudgets:
    """This rank's budgets for both phases (cached: the backend, the weight hook and the launcher's
    checks share one object per process and configuration)."""
    key = (cfg, _stamp(cfg.plan), _stamp(cfg.budgets), _stamp(cfg.profile), num_layers, num_kv_heads, tp_size,
           tp_rank, fingerprint)
    if key not in _resolved:
        plan = artifact("plan", cfg.plan, fingerprint) if cfg.plan else None
        if plan is not None and plan.tp_size != tp_size:
            raise ArtifactError(f"plan {cfg.plan} was made for tp={plan.tp_size} but this server runs tp={tp_size}; "
                                f"re-run `python -m sglang_shplb.plan --tp {tp_size}`")
        tables = {ph: _phase_table(cfg, plan, num_layers, num_kv_heads, tp_size, tp_rank, fingerprint, ph)
                  for ph in ("decode", "prefill")}
        src = _decode_source(cfg, fingerprint)
        ref = None if src is None else src.ref_context        # decode budgets come from src when there is one
        ref_mean = None if ref is None else sel.BudgetRef.of(src.decode, 1).mean   # of every rank's heads
        selector = decode_selector(cfg, fingerprint)
        labels = None
        if sel.get_selector(selector).label and tables["decode"] is not None:
            if plan is not None:
                labels = src.rank_labels(tp_rank)
            else:   # a budgets file's or the profile's channels, per KV head of the model
                labels = src.labels if src is not None else _profile_labels(cfg, fingerprint)
                if tuple(labels.shape[:2]) != (num_layers, num_kv_heads):
                    raise ArtifactError(f"the label channels of {cfg.budgets or cfg.profile} are for "
                                        f"{labels.shape[0]} layers x {labels.shape[1]} KV heads, the model has "
                                        f"{num_layers} x {num_kv_heads}: they were made for another model")
                labels = labels[:, local_kv_heads(num_kv_heads, tp_size, tp_rank)]
            labels = labels[..., : sel.get_selector(selector).keys].contiguous()
        _resolved[key] = RankBudgets(tp_rank, tp_size, tables["decode"], tables["prefill"], plan, ref, ref_mean,
                                     selector, labels)
    return _resolved[key]


def rank_budgets(cfg: ShplbConfig, num_layers: int, num_kv_heads: int, tp_size: int, tp_rank: int,
                 fingerprint: str | None = None, phase: str = "decode") -> torch.Tensor | None:
    """Budgets [num_layers, local kv heads] of `phase` ('decode'|'prefill'), or None (dense)."""
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    return resolve(cfg, num_layers, num_kv_heads, tp_size, tp_rank, fingerprint).table(phase)


def _phase_table(cfg, plan, num_layers, num_kv_heads, tp_size, tp_rank, fingerprint, phase) -> torch.Tensor | None:
    heads = local_kv_heads(num_kv_heads, tp_size, tp_rank)
    uniform = cfg.uniform_budget if phase == "decode" else cfg.uniform_prefill_budget
    if uniform is not None and (phase == "prefill" or not (cfg.plan or cfg.budgets)):
        out = torch.full((num_layers, len(heads)), uniform, dtype=torch.float64)
    elif plan is not None:
        out = plan.rank_table(tp_rank, phase)
    elif cfg.budgets:
        out = _file_table(cfg, fingerprint, num_kv_heads, phase)
        out = None if out is None else out[:, heads]
    else:
        return None
    if out is None:
        return None
    if out.shape != (num_layers, len(heads)):
        raise ArtifactError(f"budgets resolve to shape {tuple(out.shape)} on tp rank {tp_rank}, expected "
                            f"[{num_layers} layers, {len(heads)} local KV heads]; the artifact is for another model/tp")
    return out


def _file_table(cfg: ShplbConfig, fingerprint, num_kv_heads: int, phase: str) -> torch.Tensor | None:
    body = artifact("budget", cfg.budgets, fingerprint)
    out = body.table(phase)
    if out is None:
        return None               # budgets made before prefill budgets existed: dense prefill
    if body.granularity != "kv":
        raise ArtifactError(f"budgets file {cfg.budgets} is per query head (granularity q); without GQA "
                            "expansion a KV group shares one selection: make kv budgets, or a q plan")
    if out.shape[1] != num_kv_heads:
        raise ArtifactError(f"budgets file {cfg.budgets} has {out.shape[1]} KV groups per layer, the model "
                            f"has {num_kv_heads}; make budgets for this model")
    return out
