"""Tuning sweep for the masked_topk kernel (direct calls, no compile): tile, warps, digit width, sort."""

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
    grid = itertools.product([2048, 4096, 8192], [4, 8, 16], [4, 8], [False, True])
    only = sys.argv[1:] and sys.argv[1]
    for block, warps, digit, srt in grid:
        row = []
        for name, (xx, ee) in {"causal": (x, ends), "decode": (dx, dends)}.items():
            fn = lambda: masked_topk_triton(xx, k, row_ends=ee, sorted=srt, need_values=False,  # noqa: E731
                                            index_dtype=torch.int32, block=block, num_warps=warps,
                                            digit_bits=digit)
            _, idx = fn()
            bad = topk_mismatch(masked_logits(xx, row_ends=ee), k, None, idx, srt, False)
            us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
            row.append(f"{name} {us:8.1f}us{' BAD ' + bad if bad else ''}")
        print(f"block {block:5d} warps {warps:2d} digit {digit} sorted {int(srt)}: " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
