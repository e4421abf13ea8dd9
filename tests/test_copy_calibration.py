"""copy_calibration.py's probe: the profile's prose window, its second half interleaved with copies of spans of its
first (what a retrieval answer does), made from the calibration text alone."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))


def test_copy_probe_copies_first_half_spans_into_every_other_chunk_of_the_second():
    from copy_calibration import copy_probe

    ids = torch.arange(1000, 1000 + 4096)      # distinct tokens: a copy is findable by value
    out = copy_probe(ids, 128, seed=0)
    assert torch.equal(out[:2048], ids[:2048]) and out.shape == ids.shape
    for i, start in enumerate(range(2048, 4096, 128)):
        chunk = out[start:start + 128]
        if i % 2:                                # the window's own prose
            assert torch.equal(chunk, ids[start:start + 128])
        else:                                    # a contiguous span of the first half
            src = int(chunk[0]) - 1000
            assert 0 <= src <= 2048 - 128 and torch.equal(chunk, ids[src:src + 128])
    assert not torch.equal(copy_probe(ids, 128, seed=1), out)
