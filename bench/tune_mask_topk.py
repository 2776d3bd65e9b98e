"""Tuning sweep for the masked_topk kernel (direct calls, no compile): band size, chunk, warps.

Usage (GPU): ``python bench/tune_mask_topk.py [causal|decode|sort]`` prints one line per configuration
with the do_bench median and a correctness check against eager.
"""

import sys

import torch
import triton.testing

import triton
import triton.language as tl

from dsa_inductor.lowerings import masked_topk as mt
from dsa_inductor.lowerings.masked_topk import masked_logits, masked_topk_triton, topk_mismatch


@triton.jit
def _floor_kernel(x_ptr, en_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """Memory floor: read each row's range [0, end) once, in registers, and write one number."""
    row = tl.program_id(0).to(tl.int64)
    hi = tl.load(en_ptr + row)
    lane = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * N + lane, mask=lane < hi, other=0.0)
    tl.store(out_ptr + row, tl.sum(x, 0))


def bench(x, ends, k, **kw):
    fn = lambda: masked_topk_triton(x, k, row_ends=ends, need_values=False,  # noqa: E731
                                    index_dtype=torch.int32, **kw)
    _, idx = fn()
    bad = topk_mismatch(masked_logits(x, row_ends=ends), k, None, idx, kw.get("sorted", True), False)
    us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    regs = " ".join(f"{c.n_regs}r/{c.n_spills}s" for c in mt.LAST_LAUNCHES if hasattr(c, "n_regs"))
    return f"{us:8.1f}us [{regs}]{' BAD ' + bad if bad else ''}"


def main():
    t, k = 8192, 2048
    which = sys.argv[1:] or ["causal", "decode", "sort"]
    if "causal" in which:
        x = torch.randn(t, t, device="cuda")
        ends = torch.arange(1, t + 1, device="cuda", dtype=torch.int32)
        out = torch.empty(t, device="cuda")
        for warps in (4, 8):
            us = triton.testing.do_bench(lambda: _floor_kernel[(t,)](x, ends, out, t, BLOCK=t, num_warps=warps),
                                         warmup=10, rep=50, return_mode="median") * 1e3
            print(f"causal memory floor (read range, {warps} warps): {us:.1f}us", flush=True)
        for small in (256,):
            for warps in (4, 8):
                print(f"causal small {small:4d} warps {warps}: unsorted "
                      f"{bench(x, ends, k, sorted=False, small=small, num_warps=warps)}", flush=True)
        print(f"causal default: sorted {bench(x, ends, k, sorted=True)}", flush=True)
    if "decode" in which:
        dx = torch.randn(64, 65536, device="cuda")
        dends = torch.randint(32768, 65537, (64,), device="cuda", dtype=torch.int32)
        for chunk, merge in ((4096, 8192), (8192, 8192), (8192, 16384), (16384, 8192)):
            for warps in (4, 8):
                print(f"decode chunk {chunk:5d} merge {merge:5d} warps {warps}: unsorted "
                      f"{bench(dx, dends, k, sorted=False, chunk=chunk, merge=merge, num_warps=warps)}",
                      flush=True)
        print(f"decode default: sorted {bench(dx, dends, k, sorted=True)}", flush=True)
    if "sort" in which:  # what sorting the k winners costs outside the kernel, for comparison
        v = torch.randn(t, k, device="cuda")
        us = triton.testing.do_bench(lambda: v.sort(dim=-1, descending=True), warmup=10, rep=50,
                                     return_mode="median")
        print(f"torch.sort [{t}, {k}] fp32 with indices: {us * 1e3:.1f}us", flush=True)


if __name__ == "__main__":
    main()
