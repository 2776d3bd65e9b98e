"""Sweep the sparse MLA kernel's knobs (heads per program, keys per tile, warps, stages, index packing) at the benchmark
shape (T = 2048, H = 128, K = 2048, dqk = 576, dv = 512, bf16), causal and all-valid selections.

    python bench/tune_sparse_attention.py [--quick]

TFLOP/s use the issue's count 2 * S * H * K * (dqk + dv).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sparse_attention import DV, FLOPS, SCALE, _inputs  # noqa: E402
from dsa_inductor.lowerings.sparse_attention import (attention_mismatch, sparse_attention_reference,  # noqa: E402
                                                     sparse_attention_triton)


def _us(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few configs only")
    a = ap.parse_args()
    grid = ([(64, 64, 8, 1, False), (64, 64, 8, 2, True), (64, 128, 8, 2, True), (64, 128, 8, 3, True),
             (32, 128, 8, 2, True), (32, 64, 8, 3, True), (128, 64, 8, 2, True), (64, 64, 4, 3, True)] if a.quick else
            list(itertools.product([32, 64, 128], [32, 64], [4, 8], [1, 2, 3], [True, False])))
    print(torch.cuda.get_device_name(), flush=True)
    for causal in (True, False):
        q, kv, idx = _inputs("cuda", causal)
        k = kv.unsqueeze(2)
        end = torch.arange(1, q.shape[1] + 1, device="cuda", dtype=torch.int32)[None] if causal else None
        args = (q, k, None, idx, end, None, None, SCALE, DV, 0, False, torch.bfloat16)
        ref = sparse_attention_reference(q[:, :256], k, None, idx[:, :256], None if end is None else end[:, :256],
                                         None, None, SCALE, DV)
        for bh, bk, warps, stages, compact in grid:
            kw = dict(block_h=bh, block_k=bk, num_warps=warps, num_stages=stages, compact=compact)
            try:
                out = sparse_attention_triton(*args, **kw)
            except Exception as err:  # noqa: BLE001  (a config the compiler refuses, e.g. out of shared memory)
                print(f"causal={causal} BLOCK_H {bh:3d} BLOCK_K {bk:3d} warps {warps:2d} stages {stages} compact {compact:d}: "
                      f"{type(err).__name__}: {str(err)[:80]}", flush=True)
                continue
            why = attention_mismatch(ref, out[:, :256])
            us = _us(lambda: sparse_attention_triton(*args, **kw))
            print(f"causal={causal} BLOCK_H {bh:3d} BLOCK_K {bk:3d} warps {warps:2d} stages {stages} compact {compact:d}: {us:8.1f} us "
                  f"{FLOPS / us / 1e6:6.1f} TFLOP/s {why or 'ok'}", flush=True)


if __name__ == "__main__":
    main()
