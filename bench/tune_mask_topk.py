"""Tuning sweep for the masked_topk kernel (direct calls, no compile): chunk size, warps, sort."""

import itertools
import sys

import torch
import triton.testing

from dsa_inductor.lowerings.masked_topk import masked_logits, masked_topk_triton, topk_mismatch


def main():
    t, k = 8192, 2048
    x = torch.randn(t, t, device="cuda")
    ends = torch.arange(1, t + 1, device="cuda", dtype=torch.int32)
    dx = torch.randn(64, 65536, device="cuda")
    dends = torch.randint(32768, 65537, (64,), device="cuda", dtype=torch.int32)
    grid = itertools.product([8192, 16384], [4, 8], [False, True])
    only = sys.argv[1:] and sys.argv[1]
    for block, warps, srt in grid:
        row = []
        for name, (xx, ee) in {"causal": (x, ends), "decode": (dx, dends)}.items():
            fn = lambda: masked_topk_triton(xx, k, row_ends=ee, sorted=srt, need_values=False,  # noqa: E731
                                            index_dtype=torch.int32, block_max=block, num_warps=warps)
            _, idx = fn()
            bad = topk_mismatch(masked_logits(xx, row_ends=ee), k, None, idx, srt, False)
            us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
            row.append(f"{name} {us:8.1f}us{' BAD ' + bad if bad else ''}")
        print(f"block_max {block:5d} warps {warps:2d} sorted {int(srt)}: " + "  ".join(row), flush=True)
    # what sorting the k winners costs outside the kernel, for comparison
    v = torch.randn(t, k, device="cuda")
    us = triton.testing.do_bench(lambda: v.sort(dim=-1, descending=True), warmup=10, rep=50, return_mode="median")
    print(f"torch.sort [{t}, {k}] fp32 with indices: {us * 1e3:.1f}us")
    p = torch.randint(0, 2**62, (t, k), device="cuda")
    us = triton.testing.do_bench(lambda: p.sort(dim=-1, descending=True), warmup=10, rep=50, return_mode="median")
    print(f"torch.sort [{t}, {k}] int64 with indices: {us * 1e3:.1f}us")


if __name__ == "__main__":
    main()
