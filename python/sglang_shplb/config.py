"""Serving options shared by the launcher and every SGLang worker process.

SGLang spawns its scheduler/TP workers, so options travel in one environment variable
(`SGLANG_SHPLB_CONFIG`, JSON) that spawned processes inherit. Stock `python -m sglang.launch_server`
can be used too: set the variable yourself, or rely on the defaults.
"""
from __future__ import annotations

import json
import os
import functools
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import ConfigError
from .sparse_prefill import PREFILL_DENSE_KV_LEN, PREFILL_DENSE_TAIL

__all__ = ["ConfigError", "ShplbConfig", "PREFILL_DENSE_KV_LEN", "PREFILL_DENSE_TAIL", "ENV_VAR"]
ENV_VAR = "SGLANG_SHPLB_CONFIG"



@dataclass(frozen=True)
class ShplbConfig:
    uniform_budget: Optional[float] = None  # uniform decode budget, fraction of context (a baseline)
    budgets: Optional[str] = None           # budgets artifact (per-head decode budgets)
    plan: Optional[str] = None              # plan artifact (placement + budgets per rank)
    profile: Optional[str] = None           # profile whose label channels a uniform decode budget reads
    page_size: int = 16                     # tokens per logical page used by selection
    sink_pages: int = 1                     # always-kept pages at the start of the context (not a flag: the
    recent_pages: int = 2                   # profile measured these), and at the end (current token's page incl.)
    uniform_prefill_budget: Optional[float] = None  # uniform prefill budget (else the artifact's, else dense)
    prefill_dense_tail: int = PREFILL_DENSE_TAIL   # an extend's last queries that attend densely (not a flag)
    prefill_dense_kv_len: int = PREFILL_DENSE_KV_LEN   # an extend whose prefix + own tokens fit here: all dense
    selector: str = ""                      # decode page selector (selection.SELECTORS); "" = serving.decode_selector
    # Request limits at the API edge (sglang_adapter/request_limits.py); OpenAI's own caps by default.
    max_n: int = 128                        # completions per request (`n`, `sampling_params.n`)
    max_n_tokens: int = 131072              # n x max_tokens per request (the work one request may ask for)
    max_logprobs: int = 5                   # /v1/completions `logprobs`
    max_top_logprobs: int = 20              # chat `top_logprobs`, /generate `top_logprobs_num`

    def __post_init__(self):
        for name in ("uniform_budget", "uniform_prefill_budget"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise ConfigError(f"--shplb-{name.replace('_', '-')} must be in (0, 1], got {v}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"--shplb-page-size must be a power of two >= 1, got {self.page_size}")
        if self.sink_pages < 0 or self.recent_pages < 1:
            raise ConfigError("sink_pages must be >= 0 and recent_pages >= 1 "
                              f"(got {self.sink_pages}, {self.recent_pages})")
        for name, low in (("prefill_dense_tail", 0), ("prefill_dense_kv_len", 0), ("max_n", 1), ("max_n_tokens", 1),
                          ("max_logprobs", 0), ("max_top_logprobs", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"--shplb-{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        from .selection import SELECTORS, UNCALIBRATED_SELECTOR

        if self.selector and self.selector not in SELECTORS:
            raise ConfigError(f"--shplb-selector must be one of {sorted(SELECTORS)}, got {self.selector!r}")
        rule = SELECTORS[self.selector] if self.selector else None
        if rule is not None and rule.label and not (self.budgets or self.plan or self.profile):
            raise ConfigError(f"--shplb-selector {self.selector} reads label channels calibrated by the profile, "
                              "which come in a budgets or plan file (or, with --shplb-uniform-budget, from "
                              "--shplb-profile): pass --shplb-budgets, --shplb-plan or --shplb-profile, or choose "
                              f"another --shplb-selector (e.g. {UNCALIBRATED_SELECTOR})")
        sub = rule.sub if rule is not None else None
        if sub and (sub > self.page_size or self.page_size % sub):
            raise ConfigError(f"--shplb-selector {self.selector} scores {sub}-token sub-pages, which do not tile "
                              f"--shplb-page-size {self.page_size}; use a page size that is a multiple of {sub}")
        if self.budgets and self.plan:
            raise ConfigError("give either --shplb-budgets or --shplb-plan (a plan already holds budgets)")
        if self.profile and (self.budgets or self.plan):
            raise ConfigError("--shplb-profile gives --shplb-uniform-budget the profile's label channels; "
                              f"--shplb-{'plan' if self.plan else 'budgets'} carries its own: drop --shplb-profile")
        if self.profile and self.uniform_budget is None:
            raise ConfigError("--shplb-profile only serves a uniform decode budget: add --shplb-uniform-budget B "
                              "(or make budgets from the profile with `python -m sglang_shplb.budget`)")
        for name in ("budgets", "plan", "profile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"--shplb-{name} file {path} does not exist")

    @property
    def sparse(self) -> bool:
        return any(v is not None for v in (self.uniform_budget, self.budgets, self.plan, self.uniform_prefill_budget))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ShplbConfig":
        """The process's config, parsed once per distinct value of the variable."""
        return _from_env(cls, os.environ.get(ENV_VAR) or "")

    @classmethod
    def _parse(cls, raw: str) -> "ShplbConfig":
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{ENV_VAR} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@functools.lru_cache(maxsize=8)
def _from_env(cls, raw: str) -> ShplbConfig:
    return cls._parse(raw)
