"""Offline GPU proof: compile the serving kernels with Triton's own compiler for a real target and read
registers / spills from Triton's bundled ptxas — on a machine without a GPU.

    python -m sglang_shplb_kernels.compile_check [--arch 90] [--dtype bf16] [--head-dim 128] ...

`serving_kernels(...)` lists (name, jit function, signature, constexprs) exactly as the wrappers
launch them; tests/test_gpu_offline.py and benchmark/gpu_check.py use it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import fine_score, label_score, page_meta, sparse_decode, topk_select
from .block_sparse_prefill import _prefill_kernel, query_tile


def _p2(x: int) -> int:
    return triton.next_power_of_2(x)


def serving_kernels(dtype: str = "bf16", head_dim: int = 128, group: int = 4, page: int = 16, kv_heads: int = 8,
                    agg: str = "max", sub: int = 4, label: int = 32):
    """(name, fn, signature, constexprs[, launch options]) of every kernel the GPU serving path launches, at one shape.
    dtype: the model's K/V/query dtype (bf16, fp16 or fp32); page metadata is bf16. agg / sub: the coarse
    aggregation and the sub-page size of the sub-page selector (two_stage4: max, 4); label: the label
    channels of the label selectors (the default, two_stage_label32_norm: 32)."""
    T, D, G, P, H = f"*{dtype}", head_dim, group, page, kv_heads
    i32, f32 = "i32", "fp32"
    ce = "constexpr"
    out = []
    sig = dict(k_ptr=T, locs_ptr="*i64", kmin_ptr="*i16", kmax_ptr="*i16", n=i32, stride_kn=i32, stride_kh=i32,
               P=ce, H=ce, D=ce, BITS16=ce, BLOCK_D=ce)
    out.append(("fold_page_minmax", page_meta._fold_kernel, sig,
                dict(P=P, H=H, D=D, BITS16=True, BLOCK_D=_p2(D))))
    sig = dict(q_ptr=T, kmin_ptr="*i16", kmax_ptr="*i16", r2t_ptr="*i32", rpi_ptr="*i64", npages_ptr="*i32",
               out_ptr="*fp32", s_qb=i32, s_qh=i32, s_qg=i32, s_r2t=i32, width=i32, H=ce, G=ce, D=ce, P=ce,
               AGG_MAX=ce, BITS16=ce, BLOCK_N=ce, BLOCK_G=ce, BLOCK_D=ce)
    out.append((f"page_scores[{agg}]", sparse_decode._score_kernel, sig,
                dict(H=H, G=G, D=D, P=P, AGG_MAX=agg == "max", BITS16=True, BLOCK_N=sparse_decode.SCORE_BLOCK_N,
                     BLOCK_G=_p2(G), BLOCK_D=min(sparse_decode.SCORE_BLOCK_D, _p2(D)))))
    sig = dict(scores_ptr="*fp32", npages_ptr="*i32", k_ptr="*i32", idx_ptr="*i32", cnt_ptr="*i32", map_ptr="*i32",
               stride_sb=i32, stride_sh=i32, stride_sj=i32, stride_kb=i32, stride_kh=i32, max_k=i32, sink=i32,
               recent=i32, map_w=i32, H=ce, BLOCK_N=ce, PAD=ce, MAP=ce)
    for mapped in (False, True):   # True: the two-stage selectors' second top-k (over the shortlist)
        out.append((f"select_topk_pages[{'shortlist' if mapped else 'pages'}]", topk_select._select_kernel, sig,
                    dict(H=H, BLOCK_N=topk_select.SELECT_BLOCK_N, PAD=False, MAP=mapped),
                    dict(num_warps=topk_select.SELECT_WARPS)))
    sig = dict(q_ptr=T, fmin_ptr="*i16", fmax_ptr="*i16", r2t_ptr="*i32", rpi_ptr="*i64", npages_ptr="*i32",
               short_ptr="*i32", cnt_ptr="*i32", out_ptr="*fp32", s_qb=i32, s_qh=i32, s_qg=i32, s_r2t=i32, s_cb=i32,
               width=i32, sink=i32, recent=i32, H=ce, G=ce, D=ce, P=ce, SUB=ce, BITS16=ce, BLOCK_C=ce, BLOCK_G=ce,
               BLOCK_D=ce)
    out.append(("fine_page_scores", fine_score._fine_kernel, sig,
                dict(H=H, G=G, D=D, P=P, SUB=sub, BITS16=True, BLOCK_C=fine_score.FINE_BLOCK_C, BLOCK_G=_p2(G),
                     BLOCK_D=min(fine_score.FINE_BLOCK_D, _p2(D)))))
    sig = dict(q_ptr=T, lab_ptr="*bf16", ch_ptr="*i32", r2t_ptr="*i32", rpi_ptr="*i64", npages_ptr="*i32",
               seq_ptr="*i64", short_ptr="*i32", cnt_ptr="*i32", out_ptr="*fp32", s_qb=i32, s_qh=i32, s_qg=i32,
               s_r2t=i32, s_cb=i32, s_lh=i32, width=i32, sink=i32, recent=i32, scale=f32, H=ce, G=ce, R=ce, P=ce,
               BLOCK_C=ce, BLOCK_G=ce, BLOCK_R=ce, PER_HEAD=ce)
    r = min(label, D)
    for per_head in (False, True):   # True: the normalised label selectors (norm, psum, mix) write per-head scores
        out.append((f"label_page_scores[{'per_head' if per_head else 'max'}]", label_score._label_kernel, sig,
                    dict(H=H, G=G, R=r, P=P, BLOCK_C=label_score.LABEL_BLOCK_C, BLOCK_G=_p2(G), BLOCK_R=_p2(r),
                         PER_HEAD=per_head)))
    sig = dict(q_ptr=T, k_ptr=T, v_ptr=T, r2t_ptr="*i32", rpi_ptr="*i64", seq_ptr="*i64", kcnt_ptr="*i32",
               sel_ptr="*i32", po_ptr="*fp32", plse_ptr="*fp32", s_qb=i32, s_qh=i32, s_qg=i32, s_kn=i32,
               s_kh=i32, s_vn=i32, s_vh=i32, s_r2t=i32, s_kcb=i32, kcap=i32, nsplit=i32, scale=f32, H=ce, G=ce,
               D=ce, DV=ce, P=ce, DENSE=ce, IEEE=ce, BLOCK_G=ce, BLOCK_D=ce, BLOCK_DV=ce)
    for dense in (False, True):
        out.append((f"sparse_decode_attend[{'dense' if dense else 'sparse'}]", sparse_decode._attend_kernel, sig,
                    dict(H=H, G=G, D=D, DV=D, P=P, DENSE=dense, IEEE=dtype == "fp32", BLOCK_G=max(16, _p2(G)),
                         BLOCK_D=_p2(D), BLOCK_DV=_p2(D))))
    sig = dict(po_ptr="*fp32", plse_ptr="*fp32", out_ptr=T, s_ob=i32, nsplit=i32, H=ce, G=ce, DV=ce,
               BLOCK_G=ce, BLOCK_DV=ce)
    out.append(("combine_splits", sparse_decode._combine_kernel, sig,
                dict(H=H, G=G, DV=D, BLOCK_G=_p2(G), BLOCK_DV=_p2(D))))
    sig = dict(q_ptr=T, k_ptr=T, v_ptr=T, o_ptr=T, slots_ptr="*i32", pages_ptr="*i32", n=i32, L=i32,
               prefix_len=i32, num_k=i32, scale=f32, s_qn=i32, s_qh=i32, s_kn=i32, s_kh=i32, s_vn=i32, s_vh=i32,
               s_on=i32, s_oh=i32, s_pb=i32, s_ph=i32, GROUP=ce, D=ce, DV=ce, BLOCK=ce, BLOCK_M=ce, P=ce,
               BLOCK_D=ce, BLOCK_DV=ce)
    out.append(("block_sparse_prefill", _prefill_kernel, sig,
                dict(GROUP=G, D=D, DV=D, BLOCK=64, BLOCK_M=query_tile(64, D), P=max(P, 16), BLOCK_D=_p2(D),
                     BLOCK_DV=_p2(D))))
    return out


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, str]:
    """(registers, spill bytes stores+loads, ptxas name) from the first bundled ptxas that accepts the PTX."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        errors = []
        for name in ("ptxas", "ptxas-blackwell"):
            exe = os.path.join(bindir, name)
            if not os.path.exists(exe):
                continue
            r = subprocess.run([exe, "-v", "--gpu-name", gpu, path, "-o", os.devnull], capture_output=True, text=True)
            if r.returncode == 0:
                text = r.stdout + r.stderr
                regs = int(re.search(r"Used (\d+) registers", text).group(1))
                spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
                return regs, spill, name
            errors.append(f"{name}: {r.stderr.strip()[:200]}")
        raise RuntimeError("no bundled ptxas accepted the PTX: " + "; ".join(errors))


def compile_report(arch: int = 90, **shape) -> list[dict]:
    """Compile every serving kernel for GPUTarget('cuda', arch, 32); one row per kernel."""
    rows = []
    for name, fn, sig, cx, *opts in serving_kernels(**shape):
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", arch, 32),
                           options=opts[0] if opts else None)
        regs, spill, ptxas = _ptxas_report(k.asm["ptx"], arch)
        rows.append(dict(kernel=name, arch=arch, regs=regs, spill_bytes=spill, num_warps=k.metadata.num_warps,
                         shared=k.metadata.shared, ptxas=ptxas, **shape))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--dtype", nargs="+", default=["bf16"])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[128])
    ap.add_argument("--group", type=int, nargs="+", default=[4])
    ap.add_argument("--page", type=int, nargs="+", default=[16])
    ap.add_argument("--agg", nargs="+", default=["max"])
    a = ap.parse_args()
    print(f"triton {triton.__version__}")
    print(f"{'kernel':34s} {'sm':>3s} {'dtype':5s} {'D':>4s} {'G':>2s} {'P':>3s} {'regs':>5s} "
          f"{'spill B':>8s} {'warps':>5s}")
    for arch in a.arch:
        for dt in a.dtype:
            for D in a.head_dim:
                for G in a.group:
                    for P in a.page:
                        for agg in a.agg:
                            for r in compile_report(arch, dtype=dt, head_dim=D, group=G, page=P, agg=agg):
                                print(f"{r['kernel']:34s} {arch:3d} {dt:5s} {D:4d} {G:2d} {P:3d} {r['regs']:5d} "
                                      f"{r['spill_bytes']:8d} {r['num_warps']:5d}")


if __name__ == "__main__":
    main()
