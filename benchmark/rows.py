"""Result rows that cannot go stale: each row names the code that made it, its configuration and its seed.

A row is stored under its configuration (what was run: flags, task, length, prompt count, seed) and stamped
with the code hash and commit it ran at. `Rows.get` returns a row only when its code hash is the current one, so
an edit to the package re-runs exactly the rows whose code changed; a report may still show an older row, but
marked with the commit it came from (`Rows.latest`).

Three code scopes, because a dense server never runs the sparse-attention code, and the API edge only decides
whether a request is served (it never changes an answer or a step):
- `sparse`: the package and its kernels without the API-edge checks (`ADMISSION`): what decides a sparse
  variant's answers and speed;
- `dense`: that without the modules only a sparse server runs (`SPARSE_ONLY`). A one-line edit to the
  selection code re-runs the sparse rows and reuses the dense ones;
- `all`: everything, for the rows that measure what is refused and how (fuzz, load).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "python/sglang_shplb"
# Modules a `--shplb-dense` server never imports into its forward pass: page selection, sparse attention,
# budgets and placement, the profile, and the kernels.
SPARSE_ONLY = tuple(f"{PACKAGE}/{m}" for m in (
    "selection.py", "carry.py", "carry_seed.py", "sparse_attention.py", "sparse_prefill.py", "gpu_decode.py",
    "sglang_adapter/backend.py", "sglang_adapter/engine.py", "sglang_adapter/cpu_engine.py",
    "sglang_adapter/gpu_engine.py", "budget.py", "recipe.py", "curves.py", "recovery.py", "plan.py", "plan_cli.py",
    "placement.py", "joint.py", "permute.py", "profile.py", "data")) + ("kernels",)

# The API edge: checks that refuse a request (or relabel stock's abort of it) before or after it is served.
ADMISSION = tuple(f"{PACKAGE}/sglang_adapter/{m}" for m in ("api_checks.py", "body_guard.py", "request_limits.py"))
LEFT_OUT = {"all": (), "sparse": ADMISSION, "dense": ADMISSION + SPARSE_ONLY}


def _files(root: Path):
    for base in (PACKAGE, "kernels"):
        for f in sorted((root / base).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".safetensors", ".json"):
                yield f.relative_to(root).as_posix(), f


def code_hash(scope: str = "sparse", root: Path = ROOT) -> str:
    """sha256 (16 hex) over the package and kernels, less the scope's LEFT_OUT modules."""
    if scope not in LEFT_OUT:
        raise ValueError(f"scope {scope!r}: one of {', '.join(LEFT_OUT)}")
    h = hashlib.sha256()
    for rel, f in _files(root):
        if any(rel == s or rel.startswith(s + "/") for s in LEFT_OUT[scope]):
            continue
        h.update(rel.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def scope_of(flags: list[str]) -> str:
    return "dense" if "--shplb-dense" in flags else "sparse"


def ran_at(entry: dict, current: str | None = None) -> str:
    """Where a stored row came from: its commit, flagged when its code is not `current` (default: the current
    hash of the row's scope, from its flags)."""
    current = current or code_hash(scope_of(entry["config"].get("flags", [])))
    return entry["commit"] if entry["code"] == current else f"{entry['commit']} (stale: older code)"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", PACKAGE, "kernels"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+edits" if dirty else "")


class Rows:
    """A JSON file of rows {config key: {"code", "commit", "config", "row"}}."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(config: dict) -> str:
        return json.dumps(config, sort_keys=True)

    def get(self, config: dict, code: str):
        """The row made by `code` for `config`, or None (missing, or made by other code: stale)."""
        entry = self.data.get(self.key(config))
        return entry["row"] if entry and entry["code"] == code else None

    def latest(self, config: dict) -> dict | None:
        """The stored entry whatever its code: {"code", "commit", "config", "row"}."""
        return self.data.get(self.key(config))

    def put(self, config: dict, code: str, row) -> None:
        """Store a row. The file is re-read under a lock first, so a row another process stored meanwhile is
        kept, and never overwritten by the older copy this process read at start."""
        entry = {"code": code, "commit": commit(), "config": config, "row": row}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            self.data = {**self.data, **on_disk, self.key(config): entry}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)
