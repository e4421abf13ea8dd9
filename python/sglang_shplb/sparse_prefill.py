"""Per-head block-sparse prefill attention over SGLang's paged KV cache — CPU path, pure PyTorch.

The extend (prefill) queries of a request are cut into query blocks of B tokens. For every
(query block, KV head) we keep
  * the sink pages (start of the context),
  * the local diagonal window: the pages holding the block's own queries plus the `recent - 1`
    pages before them (a one-token block keeps exactly what decode keeps),
  * then the top pages by a cheap estimate, until k = ceil(budget x causal context in pages)
    pages are kept (k counts the forced pages; a head whose k covers its context runs dense).
The extend's tail -- every query block holding one of its last `dense_tail` queries (`DENSE_TAIL`
by default) -- keeps its whole causal context. A long prompt's question or instruction sits there,
and every answer token reads its KV: on needle prompts at 10%, block-shared page selection over those
rows is what loses the answer (the first answer token survives, the rest does not), while the
prompt body tolerates it. Cost: tail x context logits (benchmark/results/prefill_needle_tail.md, in git at 96caf91).
A request whose KV length (prefix + extend) is at most `dense_kv_len` is all tail (served default
PREFILL_DENSE_KV_LEN = 2048, as SGLang's DSA backend): at 2k the forced window fills most of a 10% block budget,
and short prompts lost answers with the oracle ranking or twice the budget for little TTFT
(benchmark/results/prefill_short_needle.md, in git at 96caf91).
Estimate ("centre", the one served): the block's mean query (over its queries and the GQA group) against the
centre (min + max) / 2 of each page's key box, from the page min/max decode already keeps (one matvec per page and
block). Estimates that lost to it (label-cache log-mass, Quest bounds, per-head variants: more recall, no better
answers or perplexity, more time) are gone; git keeps them (benchmark/results/prefill_recall.md).
"oracle" ranks by the block's true page mass (`block_page_mass`: it reads every key, so it is a reference for
benchmarks, not a serving estimate).

Chunked prefill and radix reuse come for free: a chunk's queries sit at positions
prefix_len + i, its keys (prefix + itself) are in req_to_token, and the page metadata of the
prefix already exists; the caller folds the chunk's own keys into the metadata before selecting.
Attention is blockwise (a few query blocks at a time, all heads batched through a padded gather),
never L x L for all heads, and no Python loop per head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import recovery, selection as sel

PREFILL_DENSE_TAIL = 256      # tokens: an extend's last queries attend densely (the prompt's question; above)
PREFILL_DENSE_KV_LEN = 2048   # tokens: a prefill this short attends densely (above)
DENSE_TAIL = PREFILL_DENSE_TAIL

QUERY_BLOCK = 64
DEFAULT_ESTIMATE = "centre"           # the served estimate (module docstring)
ESTIMATES = (DEFAULT_ESTIMATE, "oracle")    # "oracle" reads every key: a benchmarks' reference, never served
LOGIT_ELEMS_PER_STEP = 1 << 19   # [blocks, heads, queries, keys] logits of one step: ~2 MB, cache-sized


@dataclass
class BlockSelection:
    """Pages kept per (query block, KV head). The diagonal window [win_lo, win_hi] is shared by a
    block's heads (and needs the causal mask); `rest` [nb, Hkv, R] holds each head's other pages
    (sink + top-k), ascending, -1 padded. Counts include the window."""
    win_lo: torch.Tensor         # [nb] first window page (>= 0)
    win_hi: torch.Tensor         # [nb] last window page = the block's last query's page
    rest: torch.Tensor           # [nb, Hkv, R]
    count: torch.Tensor          # [nb, Hkv] pages kept in all
    ctx_pages: torch.Tensor      # [nb] causal context of each block, in pages
    page_size: int

    @property
    def dense_blocks(self) -> torch.Tensor:
        """[nb] bool: the block keeps its whole causal context on every head."""
        return (self.count >= self.ctx_pages.unsqueeze(-1)).all(-1)

    @property
    def dense(self) -> bool:
        return bool(self.dense_blocks.all())

    def page_lists(self) -> torch.Tensor:
        """All kept pages [nb, Hkv, K] (window then rest), -1 padded: the GPU kernel's input."""
        W = int((self.win_hi - self.win_lo).max()) + 1
        win = self.win_lo.view(-1, 1) + torch.arange(W, device=self.win_lo.device)
        win = torch.where(win <= self.win_hi.view(-1, 1), win, -1)
        win = win.unsqueeze(1).expand(-1, self.rest.shape[1], -1)
        return torch.cat([win, self.rest], -1)


def block_positions(prefix_len: int, extend_len: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of each query block's first and last query: ([nb], [nb])."""
    starts = torch.arange(0, extend_len, block)
    ends = torch.clamp(starts + block, max=extend_len) - 1
    return starts + prefix_len, ends + prefix_len


def block_window(first: torch.Tensor, last: torch.Tensor, page_size: int, recent: int):
    """Each block's diagonal window in pages: its own pages plus the `recent - 1` before them."""
    return (first // page_size - (recent - 1)).clamp(min=0), last // page_size


def block_scores(q_blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, estimate: str = DEFAULT_ESTIMATE):
    """q_blocks [nb, B, Hkv, G, D] (the queries of each block), lo/hi [Hkv, N, D] -> scores [nb, Hkv, N]."""
    if estimate != DEFAULT_ESTIMATE:
        raise ValueError(f"unknown prefill estimate {estimate!r}; choose one of {ESTIMATES}")
    # the pooled query against the page's box centre (a mean-key proxy); a sum ranks like the mean
    return torch.einsum("bhd,hnd->bhn", q_blocks.float().sum(3).sum(1), (lo + hi) / 2)


def block_page_mass(q_blocks: torch.Tensor, keys: torch.Tensor, scale: float, first: torch.Tensor,
                    page_size: int) -> torch.Tensor:
    """The true page mass of each query block — what every estimate approximates. q_blocks
    [nb, B, Hkv, G, D], keys [Hkv, L, D] (the request's causal context), first [nb] each block's
    first query position -> [nb, Hkv, N]: softmax per query, summed per page, mean over the block's
    real queries (positions < L) and the KV group. One block at a time: [Hkv, G, B, L] logits."""
    nb, B = q_blocks.shape[:2]
    L, P = keys.shape[1], page_size
    N = math.ceil(L / P)
    k, key_pos = keys.float(), torch.arange(L, device=keys.device)
    out = []
    for b in range(nb):
        pos = first[b] + torch.arange(B, device=keys.device)
        logits = torch.einsum("bhgd,hld->hgbl", q_blocks[b].float(), k) * scale
        logits.masked_fill_(key_pos > pos.view(-1, 1), -math.inf)
        probs = torch.nn.functional.pad(logits.softmax(-1), (0, N * P - L)).unflatten(-1, (N, P)).sum(-1)
        out.append(probs[:, :, pos < L].mean((1, 2)))
    return torch.stack(out)


def pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [n, ...] -> [nb, block, ...], zero-padded at the end."""
    nb = math.ceil(x.shape[0] / block)
    pad = nb * block - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return x.unflatten(0, (nb, block))


def dense_tail_start(n: int, block: int, dense_tail: int) -> int:
    """First extend row of the dense tail: the start of the first query block holding one of the
    extend's last `dense_tail` queries (n: no tail)."""
    return n if dense_tail <= 0 else max(n - dense_tail, 0) // block * block


def select_prefill_pages(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, prefix_len: int,
                         budgets: torch.Tensor, page_size: int, sink: int, recent: int,
                         block: int = QUERY_BLOCK, estimate: str | None = None,
                         keys: torch.Tensor | None = None, scale: float | None = None,
                         dense_tail: int = DENSE_TAIL) -> BlockSelection:
    """q [n, Hkv, G, D] the extend queries of one request; lo/hi [Hkv, N, D] the metadata of its
    N = ceil((prefix_len + n) / P) logical pages; budgets [Hkv] fractions of causal context.
    Blocks holding any of the extend's last `dense_tail` queries keep their whole context.
    keys [Hkv, prefix_len + n, D] and scale only for the reference "oracle". estimate None: DEFAULT_ESTIMATE."""
    estimate = estimate or DEFAULT_ESTIMATE
    n, Hkv, G, D = q.shape
    N, dev = lo.shape[1], q.device
    first, last = (x.to(dev) for x in block_positions(prefix_len, n, block))
    ctx = last // page_size + 1                                                  # [nb]
    win_lo, win_hi = block_window(first, last, page_size, recent)
    j = torch.arange(N, device=dev).view(1, -1)
    in_win = (j >= win_lo.view(-1, 1)) & (j <= win_hi.view(-1, 1))               # [nb, N]
    if estimate == "oracle":
        if keys is None or scale is None:
            raise ValueError("the 'oracle' prefill estimate reads every key: pass keys= and scale=")
        scores = block_page_mass(pad_blocks(q, block), keys, scale, first, page_size)
    else:
        scores = block_scores(pad_blocks(q, block), lo.float(), hi.float(), estimate)   # [nb, Hkv, N]
    sinks = (j < sink) & ~in_win
    scores = scores.masked_fill(sinks.unsqueeze(1), math.inf)
    scores = scores.masked_fill((in_win | (j >= ctx.view(-1, 1))).unsqueeze(1), -math.inf)
    n_win = (win_hi - win_lo + 1).view(-1, 1)
    floor = n_win + sinks.sum(-1, keepdim=True)                                  # [nb, 1]
    k = sel.pages_for_budget(budgets.view(1, Hkv).double().to(dev), ctx.view(-1, 1).double(), 0)
    k = torch.minimum(torch.maximum(k, floor), ctx.view(-1, 1))                  # [nb, Hkv]
    tail = first >= prefix_len + dense_tail_start(n, block, dense_tail)
    k = torch.where(tail.view(-1, 1), ctx.view(-1, 1), k)                        # the tail: dense
    R = int((k - n_win).max())
    top = scores.topk(R, dim=-1).indices if R else scores.new_zeros(*scores.shape[:2], 0, dtype=torch.long)
    keep = torch.arange(R, device=dev).view(1, 1, R) < (k - n_win).unsqueeze(-1)
    rest = torch.where(keep, top, N).sort(-1).values
    return BlockSelection(win_lo, win_hi, torch.where(rest == N, -1, rest), k, ctx, page_size)


def request_pages(buf: torch.Tensor, slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """A request's keys (or values) by logical page: buf [slots, Hkv, D], slots [L] -> [Hkv, N, P, D]."""
    N = math.ceil(slots.shape[0] / page_size)
    padded = torch.nn.functional.pad(slots.long(), (0, N * page_size - slots.shape[0]))
    return buf[padded].unflatten(0, (N, page_size)).permute(2, 0, 1, 3).contiguous()


def _steps(chosen: BlockSelection, per_page: int, nb: int):
    """Consecutive ranges of the first nb blocks whose logits ([blocks, heads, queries, keys]) stay cache-sized."""
    width = (chosen.win_hi - chosen.win_lo + 1) + (chosen.rest >= 0).sum(-1).amax(-1)   # [nb] pages
    b0 = 0
    while b0 < nb:
        cost = width[b0:nb].cummax(0).values * torch.arange(1, nb - b0 + 1) * per_page
        b1 = b0 + max(1, int((cost <= LOGIT_ELEMS_PER_STEP).sum()))
        yield b0, b1
        b0 = b1


def _window_bias(chosen, b0, b1, W, P, block, prefix_len, L):
    """Causal mask of the window pages as an additive bias [s, 1, B, 1, W*P] (0 or -inf)."""
    pages = chosen.win_lo[b0:b1].view(-1, 1) + torch.arange(W)
    kpos = (pages.unsqueeze(-1) * P + torch.arange(P)).flatten(1)                # [s, W*P]
    kpos = kpos.masked_fill((pages > chosen.win_hi[b0:b1].view(-1, 1)).repeat_interleave(P, -1), L)
    qpos = prefix_len + torch.arange(b0 * block, b1 * block).view(-1, block, 1)
    ok = (kpos.unsqueeze(1) <= qpos) & (kpos.unsqueeze(1) < L)
    return torch.zeros(ok.shape).masked_fill_(~ok, -math.inf)[:, None, :, None, :], pages


def attend_blocks(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, chosen: BlockSelection,
                  prefix_len: int, scale: float, block: int = QUERY_BLOCK) -> torch.Tensor:
    """q [n, Hkv, G, D]; k/v_pages [Hkv, N, P, D] -> out [n, Hkv, G, Dv]. A few blocks per step
    (logits stay in cache), each step trimmed to its own widest selection. Only the window pages
    need the causal mask; the other pages lie wholly before every query of the block. Trailing blocks
    that keep every page (the dense tail) run as one SDPA instead."""
    n, Hkv, G, D = q.shape
    P = k_pages.shape[2]
    L = prefix_len + n
    qp = pad_blocks(q, block).permute(0, 2, 1, 3, 4)
    qb = torch.mul(qp, scale, out=torch.empty(qp.shape, dtype=q.dtype))           # [nb, Hkv, B, G, D], one pass
    heads = torch.arange(Hkv).view(1, Hkv, 1)
    out = q.new_empty(qb.shape[0], Hkv, block, G, v_pages.shape[-1])
    sparse_nb = qb.shape[0] - int(chosen.dense_blocks.flip(0).cumprod(0).sum())   # before the trailing dense blocks
    for b0, b1 in _steps(chosen, Hkv * block * G * P, sparse_nb):
        W = int((chosen.win_hi[b0:b1] - chosen.win_lo[b0:b1]).max()) + 1
        R = int((chosen.rest[b0:b1] >= 0).sum(-1).max())
        bias_w, win = _window_bias(chosen, b0, b1, W, P, block, prefix_len, L)
        rest = chosen.rest[b0:b1, :, :R]
        idx = torch.cat([win.clamp(max=k_pages.shape[1] - 1).unsqueeze(1).expand(-1, Hkv, -1), rest.clamp(min=0)], -1)
        keys = k_pages[heads, idx].flatten(2, 3).to(q.dtype)                     # [s, Hkv, (W+R)*P, D]
        vals = v_pages[heads, idx].flatten(2, 3).to(q.dtype)
        s = b1 - b0
        logits = (qb[b0:b1].reshape(s, Hkv, block * G, D) @ keys.transpose(-1, -2)).view(s, Hkv, block, G, -1)
        logits[..., : W * P] += bias_w
        if R:
            logits[..., W * P:] += torch.zeros(rest.shape).masked_fill_(rest < 0, -math.inf) \
                .repeat_interleave(P, -1)[:, :, None, None, :]
        probs = logits.softmax(-1).view(s, Hkv, block * G, -1)
        out[b0:b1] = (probs @ vals).view(s, Hkv, block, G, -1)
    out = out.permute(0, 2, 1, 3, 4).flatten(0, 1)[:n]
    if sparse_nb * block < n:   # the dense tail (DENSE_TAIL): one causal SDPA over the whole context, no gather
        out[sparse_nb * block:] = _dense_rows(q[sparse_nb * block:], k_pages, v_pages, prefix_len + sparse_nb * block,
                                              L, scale)
    return out


def _dense_rows(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, first: int, L: int, scale: float):
    """q [m, Hkv, G, D] at positions first.. attending causally to the request's first L keys -> [m, Hkv, G, Dv]."""
    m, Hkv, G, D = q.shape
    keys, vals = (x.flatten(1, 2)[:, :L].to(q.dtype) for x in (k_pages, v_pages))   # [Hkv, L, D]: views
    causal = torch.arange(L).view(1, L) <= torch.arange(first, first + m).view(m, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3).reshape(1, Hkv * G, m, D), keys.unsqueeze(0), vals.unsqueeze(0), attn_mask=causal,
        scale=scale, enable_gqa=G > 1)
    return o.view(Hkv, G, m, -1).permute(2, 0, 1, 3)


def sparse_prefill(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, kmin: torch.Tensor,
                   kmax: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices, prefix_lens: list[int],
                   extend_lens: list[int], budgets: torch.Tensor, page_size: int, sink: int, recent: int,
                   scale: float, block: int = QUERY_BLOCK, attend=None,
                   estimate: str | None = None, dense_tail: int = DENSE_TAIL, dense_kv_len: int = 0) -> torch.Tensor:
    """Block-sparse attention of an extend batch. q [T, Hkv, G, D] (requests back to back),
    page metadata kmin/kmax [physical pages, Hkv, D] already holding this batch's keys.
    `attend(q, k_buf, v_buf, slots, chosen, prefix, scale, block)` (the GPU kernel) may replace
    the CPU path, which gathers the request's pages once and runs attend_blocks.
    A request with prefix + extend <= dense_kv_len is all tail (the server passes PREFILL_DENSE_KV_LEN).
    A request's body and its dense tail are selected and attended apart: in one selection every
    block's page list would be padded to the tail's width, the whole context (at 32k, ~64 MB of page
    indices per layer and a context-wide top-k for every block). The CPU path runs the tail as one
    causal SDPA; the GPU kernel gets the tail's few blocks as full page lists."""
    out = torch.empty(*q.shape[:3], v_buf.shape[-1], dtype=q.dtype, device=q.device)
    rows = req_pool_indices.tolist()
    start = 0
    for r, prefix, n in zip(rows, prefix_lens, extend_lens):
        slots = req_to_token[r, : prefix + n]
        phys = slots[::page_size].long() // page_size
        lo, hi = kmin[phys].float().transpose(0, 1), kmax[phys].float().transpose(0, 1)   # [Hkv, N, D] (GPU: bf16)
        qr, o = q[start: start + n], out[start: start + n]
        t = 0 if prefix + n <= dense_kv_len else dense_tail_start(n, block, dense_tail)   # short: all dense
        parts = [(0, t, 0), (t, n, n - t)]                      # (rows from, to, dense tail): body, then tail
        if attend is None:
            k_pages, v_pages = request_pages(k_buf, slots, page_size), request_pages(v_buf, slots, page_size)
        for a, b, tail in (p for p in parts if p[1] > p[0]):
            if attend is None and tail:
                o[a:b] = _dense_rows(qr[a:b], k_pages, v_pages, prefix + a, prefix + b, scale)
                continue
            chosen = select_prefill_pages(qr[a:b], lo, hi, prefix + a, budgets, page_size, sink, recent, block,
                                          estimate, dense_tail=tail)
            o[a:b] = (attend(qr[a:b], k_buf, v_buf, slots, chosen, prefix + a, scale, block) if attend is not None
                      else attend_blocks(qr[a:b], k_pages, v_pages, chosen, prefix + a, scale, block))
        start += n
    return out


def block_recovery(q: torch.Tensor, k: torch.Tensor, scale: float, grid: torch.Tensor, page_size: int, sink: int,
                   recent: int, block_starts: list[int], block: int = QUERY_BLOCK,
                   estimate: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill selector's recovery curve (profiler). q [Hq, L, D], k [Hkv, L, D] of one causal
    prefill. For each sampled query block: the true page mass (softmax per query, mean over the
    block's queries and the KV group) and the share of it the selector keeps at each grid budget.
    Returns (recovery [Hkv, len(grid)], sink-page mass [Hkv]), means over the sampled blocks (estimate None:
    DEFAULT_ESTIMATE)."""
    estimate = estimate or DEFAULT_ESTIMATE
    Hq, L, D = q.shape
    Hkv, P = k.shape[0], page_size
    lo, hi = sel.page_minmax(k, P)                                               # [Hkv, N, D]
    N = lo.shape[1]
    recs, sinks = [], []
    for s in block_starts:
        qb = q[:, s: s + block].float().view(Hkv, Hq // Hkv, -1, D)              # [Hkv, g, B, D]
        pos = s + torch.arange(qb.shape[2], device=q.device)
        mass = block_page_mass(qb.permute(2, 0, 1, 3).unsqueeze(0), k, scale, pos[:1], P)[0]   # [Hkv, N]
        first, last = int(pos[0]), int(pos[-1])
        win_lo, win_hi = max(0, first // P - (recent - 1)), last // P
        j = torch.arange(N, device=q.device)
        forced = ((j >= win_lo) & (j <= win_hi)) | ((j < sink) & (j <= win_hi))
        qs = qb.permute(2, 0, 1, 3).unsqueeze(0)                                  # [1, B, Hkv, g, D]
        scores = block_scores(qs, lo, hi, estimate)[0]                           # [Hkv, N]
        scores = scores.masked_fill(forced, math.inf).masked_fill(j > win_hi, -math.inf)
        order = scores.argsort(dim=-1, descending=True, stable=True)
        ctx = torch.tensor(float(win_hi + 1))
        k_pages = sel.pages_for_budget(grid.double(), ctx, int(forced.sum()))
        recs.append(recovery.recovery_curve(mass, order, k_pages.to(q.device).expand(Hkv, -1)))
        sinks.append(mass[:, :sink].sum(-1))
    return torch.stack(recs).mean(0), torch.stack(sinks).mean(0)
