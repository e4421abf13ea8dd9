"""The GPU serving objects (sglang_shplb.gpu_decode.GpuSparseDecode, the kernels it launches) run under
TRITON_INTERPRET=1 against the CPU serving path (sparse_attention.py) and selection.py.

Each check runs in a fresh process (`python tests/gpu_offline_checks.py CHECK [--big]`): Triton fixes
interpreted vs compiled mode when the kernels are imported. tests/test_gpu_offline.py drives them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")     # before any kernel import
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmark"), str(ROOT / "python")]

import torch  # noqa: E402
from paged_sim import PagedCache, import_kernels  # noqa: E402

K = import_kernels()

from sglang_shplb import selection as S  # noqa: E402
from sglang_shplb import sparse_attention as cpu  # noqa: E402
from sglang_shplb.carry import new_carry  # noqa: E402
from sglang_shplb.gpu_decode import DecodeShape, GpuSparseDecode, gpu_selectors  # noqa: E402

BIG = "--big" in sys.argv
P, SINK, RECENT = 16, 1, 2
H, G, D = (4, 4, 64) if BIG else (2, 3, 32)
SEQ = [900, 33, 2000, 17] if BIG else [150, 17, 300]
MAX_CTX = 4096 if BIG else 512
SCALE = D ** -0.5
# not served: the kernels' single-stage page-bound path with the group-summed bound (the two-stage selectors' first
# stage runs the same kernel with "max")
QUEST_SUM = S.Selector("quest_sum", "sum")


def _channels(L, seed=0):
    """Label channels [L, H, min(LABEL_RANK, D)] as a calibration might give them (a permutation's head)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(D, generator=g)[: min(S.LABEL_RANK, D)] for _ in range(H)])
                        for _ in range(L)])


class _Ref(list):
    """The CPU path's metadata: ref[layer] = (kmin, kmax) at page size P; .fine[layer] at the selector's
    sub-page size (two-stage selectors), or None; .labels[layer] the label cache (label selectors), or None."""

    def __init__(self, slots, L, selector, channels):
        super().__init__(cpu.new_page_metadata(slots, H, D, P, "cpu") for _ in range(L))
        self.selector = selector
        rule = S.get_selector(selector)
        self.sub = rule.sub
        self.fine = [cpu.new_page_metadata(slots, H, D, self.sub, "cpu") for _ in range(L)] if self.sub else None
        self.channels = channels[..., : rule.keys] if rule.label else None
        self.labels = [cpu.new_label_cache(slots, self.channels[l], P, torch.float32, "cpu") for l in range(L)] \
            if rule.label else None

    def fold(self, layer, locs, k):
        cpu.update_page_minmax(*self[layer], locs, k, P)
        if self.fine:
            cpu.update_page_minmax(*self.fine[layer], locs, k, self.sub)
        if self.labels:
            cpu.fold_labels(self.labels[layer], self.channels[layer], locs, k)

    def label_args(self, layer, labels=None):
        """select_decode_tokens' labels= (this path's cache, or `labels`: another one, e.g. the GPU's bf16)."""
        if self.labels is None:
            return None
        return (self.labels[layer] if labels is None else labels.float()), self.channels[layer]


def _setup(budgets, meta_dtype=torch.float32, seq=SEQ, dtype=torch.float32, seed=0, selector=S.DEFAULT_SELECTOR,
           carry_rows=None):
    L = budgets.shape[0]
    cache = PagedCache(seq, L, H, D, P, MAX_CTX, dtype=dtype, seed=seed)
    shape = DecodeShape(L, H, G, D, D, P, SINK, RECENT, MAX_CTX)
    channels = _channels(L, seed)
    dec = GpuSparseDecode(shape, budgets, "cpu", meta_dtype=meta_dtype, num_slots=cache.k[0].shape[0], num_sms=3,
                          selector=selector, channels=channels, carry_rows=carry_rows)
    ref_meta = _Ref(cache.k[0].shape[0], L, selector, channels)
    locs = cache.prefill_locs
    for layer in range(L):
        if dec.meta is not None:
            dec.fold(layer, cache.k[layer][locs], locs)
        ref_meta.fold(layer, locs, cache.k[layer][locs])
    return cache, dec, ref_meta


def _cpu_decode(cache, ref_meta, layer, q, budgets, meta=None, fine=None, labels=None, carry=None):
    """The CPU serving path of the backend (selection with the same selector + attention) on the same cache;
    meta/fine/labels: other page metadata or label cache to select on (default: the CPU path's own)."""
    qg = q.view(cache.bs, H, G, D)
    meta = ref_meta[layer] if meta is None else meta
    fine = (ref_meta.fine[layer] if ref_meta.fine else None) if fine is None else fine
    chosen = cpu.select_decode_tokens(qg, *meta, cache.req_to_token, cache.req_pool_indices, cache.seq_lens,
                                      budgets[layer], P, SINK, RECENT, selector=ref_meta.selector, fine=fine,
                                      labels=ref_meta.label_args(layer, labels), carry=carry)
    return cpu.attend_selected(qg.float(), cache.k[layer].float(), cache.v[layer].float(), chosen, SCALE)


def _step(cache, dec, ref_meta, budgets, static_bs=None):
    locs, k_new = cache.step()
    for layer in range(cache.L):
        ref_meta.fold(layer, locs, k_new[layer])
    bs = cache.bs if static_bs is None else static_bs
    return locs, k_new, bs


def check_decode_vs_cpu():
    """10% and 100% budget layers, 3 decode steps: GpuSparseDecode == the CPU path, with float32 metadata
    (same bound, same selection; the default selector, then one step of every other selector the kernels
    implement) — and with bf16 metadata the selection equals selection.py's on it."""
    budgets = torch.tensor([[0.1] * H, [1.0] * H, [0.3, 0.05] * (H // 2)], dtype=torch.float64)
    for selector in [S.DEFAULT_SELECTOR] + [s for s in gpu_selectors() if s != S.DEFAULT_SELECTOR]:
        _decode_steps(budgets, selector, 3 if selector == S.DEFAULT_SELECTOR else 1)
    for selector in (QUEST_SUM, S.UNCALIBRATED_SELECTOR, S.DEFAULT_SELECTOR):
        _decode_bf16(budgets, selector)


def _run_steps(cache, dec, ref_meta, budgets, selector, steps, ref_carry=None):
    """Decode `steps` steps with the GPU objects and the CPU path side by side (each carrying pages in its own
    state when ref_carry is given); yields each (step, layer) after checking their outputs agree."""
    for _ in range(steps):
        locs, k_new, bs = _step(cache, dec, ref_meta, budgets)
        dec.plan(bs, cache.seq_lens, cache.seq_lens_dev)
        dec.prepare(cache.seq_lens_dev)
        for layer in range(cache.L):
            dec.fold(layer, k_new[layer], locs)
            q = cache.query(H * G)
            got = dec.decode(layer, q, cache.k_dev[layer], cache.v_dev[layer], cache.req_to_token_dev,
                             cache.req_pool_indices_dev, cache.seq_lens_dev, SCALE)
            want = _cpu_decode(cache, ref_meta, layer, q, budgets,
                               carry=None if ref_carry is None else ref_carry[layer])
            torch.testing.assert_close(got.view(cache.bs, H, G, D), want, rtol=2e-4, atol=2e-4, msg=str(selector))
            yield layer


def _decode_steps(budgets, selector, steps):
    cache, dec, ref_meta = _setup(budgets, selector=selector)
    for layer in _run_steps(cache, dec, ref_meta, budgets, selector, steps):
        if not dec.dense_layer[layer]:   # the metadata itself is the CPU path's, bit for bit
            assert torch.equal(dec.meta[layer][0], ref_meta[layer][0])
            assert torch.equal(dec.meta[layer][1], ref_meta[layer][1])
            if dec.fine is not None:
                assert torch.equal(dec.fine[layer][0], ref_meta.fine[layer][0])
                assert torch.equal(dec.fine[layer][1], ref_meta.fine[layer][1])
            if dec.labels is not None:
                assert torch.equal(dec.labels[layer], ref_meta.labels[layer])
    # accounting: tokens read per layer on the host, dense layer reads everything
    assert dec.tokens_read[1] == dec.tokens_dense[1] and (dec.tokens_read[0] < dec.tokens_dense[0])


def _decode_bf16(budgets, selector):
    """bf16 metadata: rounded outward (still bounds every key); the decode equals the CPU path selecting
    with the same selector on that (widened) metadata."""
    cache, dec, ref_meta = _setup(budgets, meta_dtype=torch.bfloat16, seed=1, selector=selector)
    locs, k_new, bs = _step(cache, dec, ref_meta, budgets)
    dec.plan(bs, cache.seq_lens, cache.seq_lens_dev)
    dec.prepare(cache.seq_lens_dev)
    layer = 0
    dec.fold(layer, k_new[layer], locs)
    lo, hi = dec.meta[layer]
    n = (cache.seq_lens + P - 1) // P
    for r in range(cache.bs):
        phys = cache.req_to_token[cache.req_pool_indices[r], : int(n[r]) * P: P].long() // P
        assert (lo[phys].float() <= ref_meta[layer][0][phys]).all() and \
            (hi[phys].float() >= ref_meta[layer][1][phys]).all()
    q = cache.query(H * G)
    out = dec.decode(layer, q, cache.k_dev[layer], cache.v_dev[layer], cache.req_to_token_dev,
                     cache.req_pool_indices_dev, cache.seq_lens_dev, SCALE)
    fine = None if dec.fine is None else tuple(t.float() for t in dec.fine[layer])
    labels = None if dec.labels is None else dec.labels[layer]
    want = _cpu_decode(cache, ref_meta, layer, q, budgets, meta=(lo.float(), hi.float()), fine=fine, labels=labels)
    torch.testing.assert_close(out.view(bs, H, G, D), want, rtol=2e-4, atol=2e-4, msg=str(selector))
    if selector == QUEST_SUM:   # and the chosen page sets are selection.select_pages' on the kernel's scores
        qg = q.view(cache.bs, H, G, D)
        scores = K.page_scores_torch(qg, lo, hi, cache.req_to_token, cache.req_pool_indices, cache.seq_lens, P)
        k = dec.buf.k_pages[layer, :bs].long()
        want_mask = S.select_pages(scores, n[:, None].expand(bs, H), k, SINK, RECENT)
        got_idx = dec.buf.sel_idx[:bs]
        for r in range(bs):
            for h in range(H):
                got = torch.zeros(scores.shape[-1], dtype=torch.bool)
                got[got_idx[r, h, : int(k[r, h])].long()] = True
                assert torch.equal(got, want_mask[r, h]), (r, h)


def check_carry():
    """Pages carried between steps (carry.py): over 8 decode steps the GPU objects, carrying in their own state
    buffer, decode what the CPU path does carrying in its own, and carry the same pages; a new prompt in a row
    (forget) clears only that row."""
    budgets = torch.tensor([[0.1] * H, [0.05] * H], dtype=torch.float64)
    for selector in (S.DEFAULT_SELECTOR, S.UNCALIBRATED_SELECTOR):
        cache, dec, ref_meta = _setup(budgets, selector=selector, carry_rows=cache_rows(SEQ))
        ref_carry = new_carry(budgets.shape[0], cache_rows(SEQ), H, "cpu")
        for _ in _run_steps(cache, dec, ref_meta, budgets, selector, 8, ref_carry):
            pass
        rows = cache.req_pool_indices
        assert (ref_carry[:, rows] >= 0).any(), "nothing was carried: the check would not check"
        assert torch.equal(dec.carry[:, rows].sort(-1).values, ref_carry[:, rows].sort(-1).values), selector
        dec.forget(rows[:1])
        assert (dec.carry[:, rows[:1]] == -1).all() and torch.equal(dec.carry[:, rows[1:]], ref_carry[:, rows[1:]])


def cache_rows(seq):
    return len(seq) + 2          # PagedCache's req_to_token rows


def check_fine_scores():
    """The two-stage kernels against their references: shortlist (top-k kernel, k = c), fine_page_scores ==
    fine_page_scores_torch, the mapped second top-k == selection.choose_pages' pages."""
    budgets = torch.full((1, H), 0.1, dtype=torch.float64)
    for meta_dtype in (torch.float32, torch.bfloat16):
        cache, dec, _ = _setup(budgets, meta_dtype=meta_dtype, selector=S.UNCALIBRATED_SELECTOR)
        dec.plan(cache.bs, cache.seq_lens, cache.seq_lens_dev)
        dec.prepare(cache.seq_lens_dev)
        qg = cache.query(H * G).view(cache.bs, H, G, D)
        dec.select(0, qg, cache.req_to_token_dev, cache.req_pool_indices_dev, cache.seq_lens_dev)
        b, bs = dec.buf, cache.bs
        want = K.fine_page_scores_torch(qg, *dec.fine[0], cache.req_to_token, cache.req_pool_indices,
                                        cache.seq_lens, b.short_idx[:bs], b.c_pages[0, :bs], P, dec.sub, SINK, RECENT)
        torch.testing.assert_close(b.fine_scores[:bs], want, rtol=1e-5, atol=1e-4)
        # the whole selection: selection.choose_pages on the same (bf16-widened) metadata
        n = (cache.seq_lens + P - 1) // P
        lo, hi = dec.meta[0]
        flo, fhi = dec.fine[0]
        rule = S.get_selector(S.UNCALIBRATED_SELECTOR)
        for r in range(bs):
            rows = cache.req_to_token[cache.req_pool_indices[r], : int(n[r]) * P: P].long() // P   # physical pages
            sub_rows = rows.unsqueeze(-1) * (P // dec.sub) + torch.arange(P // dec.sub)
            kmin, kmax = lo[rows].float().transpose(0, 1), hi[rows].float().transpose(0, 1)      # [H, N, D]
            fmin, fmax = flo[sub_rows].float().permute(2, 0, 1, 3), fhi[sub_rows].float().permute(2, 0, 1, 3)

            def fine_meta(idx):   # [H, C] -> [H, C, S, D]
                g = idx[..., None, None].expand(*idx.shape, *fmin.shape[-2:])
                return fmin.gather(1, g), fmax.gather(1, g)

            k = b.k_pages[0, r].long()
            chosen = S.choose_pages(rule, qg[r], kmin, kmax, fine_meta, n[r].expand(H), k, SINK, RECENT)
            for h in range(H):
                want_set = set(chosen[h, : int(k[h])].tolist())
                got_set = set(b.sel_idx[r, h, : int(k[h])].tolist())
                assert got_set == want_set, (meta_dtype, r, h, got_set ^ want_set)


def check_label_scores():
    """The label selectors' kernels against their references: label_page_scores == label_page_scores_torch
    (selection.key_scores) on the shortlist, the mapped second top-k == selection.choose_pages' pages on the
    same label cache (float32 and bf16), every label selector the kernels implement."""
    budgets = torch.full((1, H), 0.1, dtype=torch.float64)
    for selector, meta_dtype in ((S.DEFAULT_SELECTOR, torch.float32), (S.DEFAULT_SELECTOR, torch.bfloat16),
                                 *((s, torch.float32) for s, r in S.SELECTORS.items()
                                   if r.label and s != S.DEFAULT_SELECTOR and s in gpu_selectors())):
        cache, dec, _ = _setup(budgets, meta_dtype=meta_dtype, selector=selector, seed=2)
        dec.plan(cache.bs, cache.seq_lens, cache.seq_lens_dev)
        dec.prepare(cache.seq_lens_dev)
        qg = cache.query(H * G).view(cache.bs, H, G, D)
        dec.select(0, qg, cache.req_to_token_dev, cache.req_pool_indices_dev, cache.seq_lens_dev)
        b, bs = dec.buf, cache.bs
        labels, channels = dec.labels[0], dec.channels[0]
        rule = S.get_selector(selector)
        want = K.label_page_scores_torch(qg, labels, channels.long(), cache.req_to_token, cache.req_pool_indices,
                                         cache.seq_lens, b.short_idx[:bs], b.c_pages[0, :bs], P, SINK, RECENT,
                                         rule.aggregate)
        torch.testing.assert_close(b.fine_scores[:bs], want, rtol=1e-5, atol=1e-4)
        n = (cache.seq_lens + P - 1) // P
        lo, hi = dec.meta[0]
        for r in range(bs):
            slots = cache.req_to_token[cache.req_pool_indices[r], : int(n[r]) * P].long()       # whole pages
            rows = slots[::P] // P
            kmin, kmax = lo[rows].float().transpose(0, 1), hi[rows].float().transpose(0, 1)      # [H, N, D]
            lab = labels[:, slots].float().unflatten(1, (-1, P))                                 # [H, N, P, r]

            def fine_meta(idx):   # [H, C] -> [H, C, P, r]
                return (lab.gather(1, idx[..., None, None].expand(*idx.shape, *lab.shape[-2:])),)

            k = b.k_pages[0, r].long()
            chosen = S.choose_pages(rule, qg[r], kmin, kmax, fine_meta, n[r].expand(H), k, SINK, RECENT,
                                    channels.long(), cache.seq_lens[r].expand(H))
            for h in range(H):
                want_set = set(chosen[h, : int(k[h])].tolist())
                got_set = set(b.sel_idx[r, h, : int(k[h])].tolist())
                assert got_set == want_set, (selector, meta_dtype, r, h, got_set ^ want_set)


def check_scores_agg():
    """Both group aggregations against selection.py (sum: group_upper_bound, max: max of quest_upper_bound)."""
    budgets = torch.full((1, H), 0.2, dtype=torch.float64)
    for meta_dtype in (torch.float32, torch.bfloat16):
        cache, dec, _ = _setup(budgets, meta_dtype=meta_dtype)
        dec.plan(cache.bs, cache.seq_lens, cache.seq_lens_dev)
        dec.prepare(cache.seq_lens_dev)
        lo, hi = dec.meta[0]
        qg = cache.query(H * G).view(cache.bs, H, G, D)
        n = (cache.seq_lens + P - 1) // P
        for agg in K.AGGREGATIONS:
            out = torch.full_like(dec.buf.scores, float("nan"))
            K.page_scores(qg, lo, hi, cache.req_to_token, cache.req_pool_indices, dec.buf.n_pages, P, out, agg)
            for r in range(cache.bs):
                phys = cache.req_to_token[cache.req_pool_indices[r], : int(n[r]) * P: P].long() // P
                lo_r, hi_r = lo[phys].float().transpose(0, 1), hi[phys].float().transpose(0, 1)
                want = S.group_upper_bound(qg[r], lo_r, hi_r) if agg == "sum" else \
                    S.quest_upper_bound(qg[r], lo_r, hi_r).amax(-2)
                torch.testing.assert_close(out[r, :, : int(n[r])], want, rtol=1e-5, atol=1e-4)


class _Launches:
    """Records every Triton launch (kernel, grid, pointer addresses, scalars) made by the interpreter."""

    def __init__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.log, self.cls = [], InterpretedFunction
        self.orig = InterpretedFunction.run

    def __enter__(self):
        log, orig = self.log, self.orig

        def run(fn, *args, grid, warmup, **kwargs):
            g = grid(kwargs) if callable(grid) else tuple(grid)
            key = tuple(("ptr", a.data_ptr(), a.dtype) if torch.is_tensor(a) else a for a in args)
            log.append((fn.fn.__name__, g, key, tuple(sorted(kwargs.items()))))
            return orig(fn, *args, grid=grid, warmup=warmup, **kwargs)

        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.orig


def check_graph_replay():
    """CUDA-graph discipline: capture at a padded batch (SGLang's fill values), then replays with growing,
    changing lengths over the same static inputs. Every replay issues exactly the captured launches (same
    kernels, grids, buffer addresses and scalars) and computes the CPU path's answer for the real rows."""
    budgets = torch.tensor([[0.1] * H, [1.0] * H], dtype=torch.float64)
    cache, dec, ref_meta = _setup(budgets, seq=SEQ[:2])
    graph_bs = 4                                     # captured size: 2 real requests + 2 padded rows
    dec.reserve(graph_bs)
    seq_static = torch.ones(graph_bs, dtype=torch.int64)            # runner's static buffers
    rpi_static = torch.zeros(graph_bs, dtype=torch.int64)
    locs_static = torch.zeros(graph_bs, dtype=torch.int64)
    q_static = torch.zeros(graph_bs, H * G * D)
    kn_static = [torch.zeros(graph_bs, H, D) for _ in range(cache.L)]

    def body():
        dec.prepare(seq_static)
        outs = []
        for layer in range(cache.L):
            dec.fold(layer, kn_static[layer], locs_static)
            outs.append(dec.decode(layer, q_static, cache.k[layer], cache.v[layer], cache.req_to_token,
                                   rpi_static, seq_static, SCALE))
        return outs

    # capture: SGLang fills seq_lens with the backend's fill value (1) and pool index 0
    dec.plan(graph_bs, seq_static.clone(), seq_static, static=True)
    with _Launches() as cap:
        body()
    assert cap.log, "nothing launched"
    for step in range(3):
        locs, k_new, _ = _step(cache, dec, ref_meta, budgets)
        # replay: real rows copied into the static buffers, padded rows keep the fill values;
        # the padded rows' slot is SGLang's dummy page 0
        seq_static[:2], rpi_static[:2], locs_static[:2] = cache.seq_lens, cache.req_pool_indices, locs
        seq_static[2:], rpi_static[2:], locs_static[2:] = 1, 0, 0
        qs = cache.query(H * G)
        q_static[:2] = qs
        for layer in range(cache.L):
            kn_static[layer][:2] = k_new[layer]
            kn_static[layer][2:] = 0
        dec.plan(graph_bs, seq_static.clone(), seq_static, real_bs=2, static=True)   # outside the graph
        with _Launches() as rep:
            outs = body()
        assert _normalised(rep.log) == _normalised(cap.log), f"replay {step}: launches differ from the capture"
        for layer in range(cache.L):
            want = _cpu_decode(cache, ref_meta, layer, qs, budgets)
            torch.testing.assert_close(outs[layer][:2].view(2, H, G, D), want, rtol=2e-4, atol=2e-4)


def _normalised(log):
    """Launches with the per-call output of the combine kernel blanked: torch.empty inside a captured
    graph is graph-pool memory at a fixed address, which an eager re-run cannot reproduce."""
    out = []
    for name, grid, args, kw in log:
        if name == "_combine_kernel":
            args = args[:2] + ("OUT",) + args[3:]
        out.append((name, grid, args, kw))
    return out


def check_no_host_sync():
    """Per layer (fold, score, top-k with carried pages, attend) and the in-graph prepare: no host sync from our
    code."""
    budgets = torch.tensor([[0.1] * H, [1.0] * H], dtype=torch.float64)
    cache, dec, ref_meta = _setup(budgets, carry_rows=cache_rows(SEQ))
    locs, k_new, bs = _step(cache, dec, ref_meta, budgets)
    dec.plan(bs, cache.seq_lens, cache.seq_lens_dev)      # host work between steps (host tensors only)
    q = cache.query(H * G)
    ours = (str(ROOT / "python" / "sglang_shplb"), str(ROOT / "kernels"))
    names = ("item", "cpu", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_getitem = torch.Tensor.__getitem__
    hits = []

    def guard(name):
        def f(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                hits.append((name, caller, sys._getframe(1).f_lineno))
                raise RuntimeError(f"host sync Tensor.{name} in {caller}:{sys._getframe(1).f_lineno}")
            return saved[name](self, *a, **k)
        return f

    def getitem(self, idx):
        caller = sys._getframe(1).f_code.co_filename
        items = idx if isinstance(idx, tuple) else (idx,)
        if caller.startswith(ours) and any(torch.is_tensor(i) and i.dtype == torch.bool for i in items):
            hits.append(("bool-mask index", caller, sys._getframe(1).f_lineno))
            raise RuntimeError(f"boolean-mask indexing (a host sync) in {caller}")
        return saved_getitem(self, idx)

    try:
        for n in names:
            setattr(torch.Tensor, n, guard(n))
        torch.Tensor.__getitem__ = getitem
        dec.prepare(cache.seq_lens_dev)
        outs = []
        for layer in range(cache.L):
            dec.fold(layer, k_new[layer], locs)
            outs.append(dec.decode(layer, q, cache.k_dev[layer], cache.v_dev[layer], cache.req_to_token_dev,
                                   cache.req_pool_indices_dev, cache.seq_lens_dev, SCALE))
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])
        torch.Tensor.__getitem__ = saved_getitem
    assert not hits, hits
    # the guard is live: the same patch catches a sync made from our code
    try:
        for n in names:
            setattr(torch.Tensor, n, guard(n))
        exec(compile("torch.ones(1).item()", str(ROOT / "python" / "sglang_shplb" / "probe.py"), "exec"))
        raise AssertionError("guard did not fire")
    except RuntimeError:
        pass
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])
    torch.testing.assert_close(outs[0].view(bs, H, G, D), _cpu_decode(cache, ref_meta, 0, q, budgets),
                               rtol=2e-4, atol=2e-4)


def check_fold_meta():
    """fold_page_minmax (float32 and bf16) == the CPU path's update (+ outward rounding), prefill then decode."""
    budgets = torch.full((1, H), 0.2, dtype=torch.float64)
    for meta_dtype in (torch.float32, torch.bfloat16):
        cache, dec, ref_meta = _setup(budgets, meta_dtype=meta_dtype, dtype=torch.bfloat16)
        for _ in range(P + 1):                      # crosses a page boundary (a reused, stale page)
            locs, k_new, _ = _step(cache, dec, ref_meta, budgets)
            dec.fold(0, k_new[0], locs)
        want_lo, want_hi = ref_meta[0]
        if meta_dtype == torch.bfloat16:
            want_lo, want_hi = K.round_bf16(want_lo, up=False), K.round_bf16(want_hi, up=True)
        n = (cache.seq_lens + P - 1) // P
        for r in range(cache.bs):
            phys = cache.req_to_token[cache.req_pool_indices[r], : int(n[r]) * P: P].long() // P
            assert torch.equal(dec.meta[0][0][phys].float(), want_lo[phys].float()), r
            assert torch.equal(dec.meta[0][1][phys].float(), want_hi[phys].float()), r
    x = torch.tensor([1.0, -1.0, 1.00001, -1.00001, 3.3e38, -3.3e38, 0.0, -0.0, float("inf")])
    lo, hi = K.round_bf16(x, up=False).float(), K.round_bf16(x, up=True).float()
    assert (lo <= x).all() and (hi >= x).all() and torch.equal(lo[:2], x[:2]) and torch.equal(hi[:2], x[:2])


class _Env:
    """The two monkeypatch methods conftest.cpu_backend uses, for a script (no pytest fixture here)."""

    def setenv(self, name, value):
        os.environ[name] = value

    def setattr(self, obj, name, value):
        setattr(obj, name, value)


def _gpu_engine_backend(budget):
    """The real backend (its own __init__, SGLang's pools, conftest.cpu_backend) with its engine swapped for the
    CUDA one, built on the CPU device: the kernels interpreted, SGLang's CUDA-only start-up stubbed."""
    import conftest as C

    from sglang_shplb.sglang_adapter import gpu_engine, gpu_startup

    b = C.cpu_backend(_Env(), uniform_budget=budget)
    gpu_startup.refuse_unsupported = lambda runner, page: set()
    gpu_startup.attention_dims = lambda model: (C.Q_HEADS, C.KV_HEADS, C.HEAD_DIM, C.HEAD_DIM)
    gpu_startup.dense_extend_backend = lambda runner: (None, "torch_native (stubbed)")
    runner = __import__("types").SimpleNamespace(model=None, model_config=__import__("types").SimpleNamespace(
        context_len=512))
    b.engine = gpu_engine.GpuEngine(b.engine.s, runner, b.keep_metadata)
    b.carry = b.engine.carry
    return b


def check_backend_engines():
    """Both engines behind the one backend interface: a prefill then 24 decode steps through the real backend, once
    with the CPU engine and once with the CUDA engine (interpreted). At budget 1 every output matches (both read
    every page); at 25% the CUDA engine's outputs are finite, its metadata holds every written page and it reads
    fewer tokens than dense."""
    import types

    import conftest as C

    for budget in (1.0, 0.25):
        cpu_b, gpu_b = C.cpu_backend(_Env(), uniform_budget=budget), _gpu_engine_backend(budget)
        g = torch.Generator().manual_seed(1)
        layer = types.SimpleNamespace(layer_id=0, tp_q_head_num=C.Q_HEADS, tp_k_head_num=C.KV_HEADS,
                                      qk_head_dim=C.HEAD_DIM, v_head_dim=C.HEAD_DIM, scaling=C.HEAD_DIM ** -0.5,
                                      is_cross_attention=False, attn_type=None, sliding_window_size=None,
                                      logit_cap=0.0)
        n = 100
        slots = torch.arange(n) + C.PAGE
        k, v = (torch.randn(n, C.KV_HEADS, C.HEAD_DIM, generator=g) for _ in range(2))
        q = torch.randn(n, C.Q_HEADS * C.HEAD_DIM, generator=g)
        for b in (cpu_b, gpu_b):
            b.req_to_token_pool.req_to_token[1, :n + 24] = torch.arange(n + 24) + C.PAGE
            b.init_forward_metadata(C.extend_batch(slots))
            b.forward_extend(q, k, v, layer, C.extend_batch(slots))
        for t in range(24):
            q = torch.randn(1, C.Q_HEADS * C.HEAD_DIM, generator=g)
            k, v = (torch.randn(1, C.KV_HEADS, C.HEAD_DIM, generator=g) for _ in range(2))
            fb = C.decode_batch(C.PAGE + n + t, n + t + 1)
            outs = []
            for b in (cpu_b, gpu_b):
                b.init_forward_metadata(fb)
                outs.append(b.forward_decode(q, k, v, layer, fb))
            assert torch.isfinite(outs[1]).all(), (budget, t)
            if budget == 1.0:
                assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4), (t, (outs[0] - outs[1]).abs().max())
        lo, hi = gpu_b.engine.metadata(0)
        pages = (C.PAGE + n + 24 + C.PAGE - 1) // C.PAGE
        assert torch.isfinite(lo[1:pages].float()).all() and torch.isfinite(hi[1:pages].float()).all()
        read, dense = gpu_b.engine.decoder.tokens_read, gpu_b.engine.decoder.tokens_dense
        assert float(read[0]) <= float(dense[0]) and (budget == 1.0 or float(read[0]) < float(dense[0]))


CHECKS = {f.__name__[len("check_"):]: f for f in (check_decode_vs_cpu, check_scores_agg, check_fine_scores,
                                                   check_label_scores, check_carry, check_graph_replay,
                                                   check_no_host_sync, check_fold_meta, check_backend_engines)}

if __name__ == "__main__":
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]} OK")
