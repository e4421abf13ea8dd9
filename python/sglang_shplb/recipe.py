"""The default recipe: what `python -m sglang_shplb.launch_server` serves when no budget flag is given.

Per-head decode and prefill budgets at one mean (`budget.make_budgets`, method `optimal`), and for `--tp N`
the balance-aware joint plan (`joint.make_joint_plan`), solved at start-up from the model's profile
(a fraction of a second) and written as an ordinary artifact, so serving, checks and logs are those of
`--shplb-budgets` / `--shplb-plan`. The profile is the committed one for the default model, one that
`--shplb-profile auto` made and cached by model fingerprint, or a file given with `--shplb-profile`.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .artifacts import ArtifactError, write_json

DEFAULT_MEAN_BUDGET = 0.10          # decode and prefill mean budget of the default recipe (--shplb-mean-budget)
COMMITTED_PROFILES = (Path(__file__).parent / "data" / "smollm2-135m.profile.safetensors",)


def _home() -> Path:
    from .models import home

    return home()


def cached_profile(fingerprint: str) -> Path:
    return _home() / "profiles" / f"{fingerprint}.profile.safetensors"


def find_profile(fingerprint: str) -> Path | None:
    """The committed or cached profile made for this model, else None."""
    from .profile import Profile

    for path in (*COMMITTED_PROFILES, cached_profile(fingerprint)):
        if path.is_file() and Profile.load(path).meta["model_fingerprint"] == fingerprint:
            return path
    return None


def profile_command(model_path: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "sglang_shplb.profile", "--model", str(model_path), "--out", str(out)]


def make_profile(model_path: str, fingerprint: str) -> Path:
    """Profile the model once (the profiler's own progress bars) into the cache; `--shplb-profile auto`."""
    out = cached_profile(fingerprint)
    print(f"[sglang-shplb] profiling {model_path} once (a few minutes on CPU), cached at {out}", flush=True)
    if subprocess.run(profile_command(model_path, out)).returncode != 0:
        raise ArtifactError(f"profiling {model_path} failed (see above); fix that, or serve dense with --shplb-dense")
    return out


def resolve_profile(given: str | None, model_path: str, fingerprint: str) -> Path:
    """The profile the recipe is solved from: --shplb-profile PATH, `auto` (profile once, cached), or the model's
    committed/cached one; without any, an ArtifactError naming the one command to run."""
    if given and given != "auto":
        return Path(given)
    found = find_profile(fingerprint)
    if found is not None:
        return found
    if given == "auto":
        return make_profile(model_path, fingerprint)
    raise ArtifactError(f"no S-HPLB profile for {model_path} yet: add --shplb-profile auto to profile it once "
                        f"(a few minutes, cached under {_home() / 'profiles'}), or run "
                        f"`{' '.join(profile_command(model_path, cached_profile(fingerprint))[1:])}`; "
                        "or serve dense with --shplb-dense")


@dataclass(frozen=True)
class Recipe:
    kind: str          # "budgets" (tp 1) or "plan" (tp > 1)
    path: Path         # the artifact written for this start
    mean: float
    tp: int
    profile: Path
    reads: tuple[float, float, float]    # decode KV read per step at the profile's context: mean, min, max head

    def describe(self) -> str:
        what = ("per-head budgets" if self.kind == "budgets"
                else f"per-head budgets placed on {self.tp} ranks (joint plan)")
        mean, lo, hi = self.reads
        return (f"S-HPLB default recipe: {what}, decode and prefill at mean budget {self.mean:g}, label selector; "
                f"decode reads {mean:.1%} of the KV per step (heads {lo:.1%}-{hi:.1%}); from profile "
                f"{self.profile.name}; --shplb-mean-budget B changes the mean, --shplb-dense serves stock attention; "
                f"artifact {self.path} (--shplb-{self.kind} serves it as is)")


def solve(profile_path: Path, mean: float, tp: int, fingerprint: str, head_dim: int) -> Recipe:
    """Solve the recipe and write its artifact under $SGLANG_SHPLB_HOME/recipes (re-solved at every start)."""
    import torch

    from .profile import Profile

    profile = Profile.load(profile_path, fingerprint)
    if tp == 1:
        from .budget import make_budgets

        body, kind = make_budgets(profile, mean, "optimal", prefill_mean=mean), "budgets"
        table = torch.tensor(body["budgets"])
    else:
        from .joint import make_joint_plan

        body, kind = make_joint_plan(profile, mean, tp, "kv", head_dim, None, None, mean), "plan"
        if not body["equal_count"]:
            raise ArtifactError(f"the joint plan for --tp {tp} is not servable (unequal head counts per rank)")
        table = torch.tensor([layer["unit_budgets"] for layer in body["layers"]])
    path = _home() / "recipes" / f"{fingerprint[:16]}-tp{tp}-mean{mean:g}.{kind}.json"
    write_json(path, "budget" if kind == "budgets" else "plan", body)
    reads = (float(table.mean()), float(table.min()), float(table.max()))
    return Recipe(kind, path, mean, tp, Path(profile_path), reads)
