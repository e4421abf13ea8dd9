"""Property-based API fuzzing (benchmark/fuzz.py, hypothesis) against the real S-HPLB server: after
every generated request the server answers /health, nothing is a 5xx, every refusal is a 4xx with a
JSON error, nothing hangs. Both runs are in `make test-slow` (the server start and 80 cases took ~4 min of the
default suite)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import fuzz  # noqa: E402


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(fuzz.SERVER_ARGS, name="fuzz")


def _run(server, cases, seed):
    counts = fuzz.run(server.url, cases, seed, lambda: server.proc.poll() is None)
    assert sum(counts.values()) == cases
    # the strategies must reach the model, not only the validators
    assert sum(v for (_, outcome), v in counts.items() if outcome == "2xx") >= cases // 10, counts
    assert "Traceback" not in server.log()
    return counts


@pytest.mark.slow     # `make test` keeps the hand-written bad inputs (test_reliability.py); this adds 80 random ones
def test_fuzz_short(server):
    _run(server, 80, seed=0)


@pytest.mark.slow
def test_fuzz_long(server):
    _run(server, 2000, seed=1)
