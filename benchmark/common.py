"""Shared bits of the benchmark scripts: machine/commit stamp and result files."""
import functools
import os
import platform
import subprocess
import time
from pathlib import Path


def machine_line() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return (f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
            f"{os.cpu_count()} CPUs · commit {commit}")


def write_result(path, title: str, note: str, rows: list[str], command: str) -> None:
    text = "\n".join([f"# {title}", "", note, "", f"Reproduce: `{command}`", "", machine_line(), "", *rows, ""])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)


PROFILE = Path(__file__).resolve().parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
BUDGET_METHODS = ("uniform", "shift", "optimal", "greedy", "bubbles")
# A held-out text: CPython's language reference as pydoc ships it (pydoc_data.topics, ~0.1M SmolLM2 tokens of
# technical prose with code). No profile, label calibration or needle haystack reads it, and every Python has it.
HELD_OUT = "pydoc"
TEXTS = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", HELD_OUT)


def corpus_text(name: str) -> str:
    """A long text by name: one of the profile's corpus files, or HELD_OUT."""
    if name == HELD_OUT:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    from sglang_shplb.models import prepare_corpus

    return (prepare_corpus() / name).read_text(errors="replace")


@functools.lru_cache(maxsize=1)
def committed_profile():
    """The committed profile, read once per process (benchmarks ask for many budget variants)."""
    from sglang_shplb.profile import Profile

    return Profile.load(PROFILE)


def kv_budgets(method: str, mean: float, metric: str = "sinkless", tp: int = 3, phase: str = "decode",
               floor_pages: int | None = None) -> dict:
    """A budgets artifact body [layers][kv groups] from the committed profile. `bubbles` is
    `optimal` then fill-bubbles of a balanced tp-`tp` plan: under-loaded ranks get extra budget up
    to the slowest rank's work, so its mean is above `mean` at the same step time. With
    phase='prefill', "budgets" holds the prefill budgets (from the prefill selector's curves). floor_pages: the
    fewest pages any group holds at the profile's context (None: budget.default_floor_pages, as served)."""
    from sglang_shplb.budget import make_budgets

    prof = committed_profile()
    if phase == "prefill":
        if method == "bubbles":
            raise ValueError("bubble filling plans decode budgets; use uniform/shift/optimal for prefill")
        body = make_budgets(prof, mean, method, "kv", metric=metric, floor_pages=floor_pages, prefill_mean=mean)
        return {**body, "budgets": body["prefill_budgets"]}
    if method == "joint":   # the joint plan's budgets (tp `tp`), in model head order: same quality at any tp
        from sglang_shplb.joint import make_joint_plan

        plan = make_joint_plan(prof, mean, tp, "kv", metric=metric, floor_pages=floor_pages)
        body = make_budgets(prof, mean, "uniform", "kv", metric=metric)
        return {**body, "method": f"joint(tp{tp})", "budgets": [lay["unit_budgets"] for lay in plan["layers"]]}
    body = make_budgets(prof, mean, "optimal" if method == "bubbles" else method, "kv", metric=metric,
                        floor_pages=floor_pages)
    if method == "bubbles":
        from sglang_shplb.plan import make_plan

        plan = make_plan(body, tp, "balanced", "kv", profile=prof, fill=True)
        body = {**body, "method": f"optimal+bubbles(tp{tp})",
                "budgets": [lay["unit_budgets"] for lay in plan["layers"]]}
    return body


def mean_of(body: dict) -> float:
    rows = body["budgets"]
    return sum(map(sum, rows)) / sum(map(len, rows))


class LabelCalibration:
    """Label channels of the label selectors (Double Sparsity's offline calibration): mean |q| and
    mean |k| per channel and KV head, accumulated by a harness's attention function during dense runs over
    TEXT, a text no recall or perplexity window is taken from (selector.py: alice29/asyoulik; quality.py:
    lcet10); needle haystacks draw sentences from every text."""
    TEXT, START, LENGTH = "plrabn12.txt", 1000, 4096

    def __init__(self):
        self.stats = {}          # layer -> (sum of mean |q| [Hkv, G, D], sum of mean |k| [Hkv, D])

    def ids(self, tokenizer):
        from sglang_shplb.models import prepare_corpus

        text = (prepare_corpus() / self.TEXT).read_text(errors="replace")
        return tokenizer(text).input_ids[self.START: self.START + self.LENGTH]

    def add(self, layer: int, q, k) -> None:
        """q [Hq, L, D], k [Hkv, L, D] of one dense forward."""
        qa, ka = q.float().abs().mean(1), k.float().abs().mean(1)
        old = self.stats.get(layer, (0, 0))
        self.stats[layer] = (old[0] + qa.view(k.shape[0], -1, qa.shape[-1]), old[1] + ka)

    def channels(self, r: int) -> dict:
        from sglang_shplb.selection import label_channels

        return {layer: label_channels(qa, ka, r) for layer, (qa, ka) in self.stats.items()}
