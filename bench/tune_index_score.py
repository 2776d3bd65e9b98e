"""Sweep the index-score kernel's tiles and launch options at S = T = 4096, H = 64, D = 128 bf16 (CUDA).

    python bench/tune_index_score.py [--s 4096] [--t 4096]

Times ``index_score_triton`` directly (``do_bench`` medians), full rows, causal ``row_ends`` (tiles past
every row's end are written -inf) and causal ``row_ends`` with ``outside_undefined`` (the indexer chain's
form: those tiles are not touched), and prints TFLOP/s of the full problem.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from dsa_inductor.lowerings.index_score import (index_score_reference, index_score_triton,  # noqa: E402
                                                score_mismatch, tolerance)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--h", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, a.s, a.h, a.d, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, a.t, a.d, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, a.s, a.h, device="cuda", generator=g)
    ends = (torch.arange(a.s, device="cuda") + 1 + max(a.t - a.s, 0))[None]
    flops = 2.0 * a.s * a.t * a.h * a.d
    ref = index_score_reference(q[:, :256], k, w[:, :256], 0.088)
    tol = tolerance(q[:, :256], k, w[:, :256], 0.088)
    print(f"S={a.s} T={a.t} H={a.h} D={a.d} bf16 on {torch.cuda.get_device_name()}")
    best = {}
    for bs, bt, warps, stages in itertools.product((64, 128), (64, 128, 256), (4, 8), (2, 3, 4)):
        for causal in (False, True, "undefined"):
            e = ends if causal else None
            try:
                fn = lambda: index_score_triton(q, k, w, 0.088, False, e, None, -1, causal == "undefined",  # noqa: E731
                                                block_s=bs, block_t=bt, num_warps=warps, num_stages=stages)
                out = fn()
                why = None if causal else score_mismatch(out[:, :256], ref, tol)
                us = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e3
            except Exception as ex:  # out of resources (shared memory, registers) for this config
                print(f"bs={bs:3d} bt={bt:3d} warps={warps} stages={stages} causal={causal}: {type(ex).__name__}")
                continue
            print(f"bs={bs:3d} bt={bt:3d} warps={warps} stages={stages} causal={causal}: {us:8.1f} us "
                  f"{flops / us / 1e6:6.1f} TFLOP/s (full-problem FLOPs) {why or 'ok'}", flush=True)
            if why is None and (causal not in best or us < best[causal][0]):
                best[causal] = (us, bs, bt, warps, stages)
    print("default:", f"{triton.testing.do_bench(lambda: index_score_triton(q, k, w, 0.088), return_mode='median') * 1e3:.1f} us")
    for causal, (us, *cfg) in best.items():
        print(f"best {({False: 'full', True: 'causal -inf'}).get(causal, 'causal undefined')}: {us:.1f} us with (block_s, block_t, warps, stages) = {cfg}")


if __name__ == "__main__":
    main()
