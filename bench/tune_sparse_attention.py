"""Sweep the sparse attention kernels' knobs on an H100.

    python bench/tune_sparse_attention.py [--quick]              # shared latent (MLA) kernel
    python bench/tune_sparse_attention.py --per-head [--quick]   # per-head masked flash kernel
    python bench/tune_sparse_attention.py --v4                   # DeepSeek-V4 key lists (window [+ picks])

Shared latent: heads per program, keys per tile, warps, stages, index packing at the benchmark shape (T = 2048,
H = 128, K = 2048, dqk = 576, dv = 512, bf16), causal and all-valid selections; TFLOP/s use the issue's count
2 * S * H * K * (dqk + dv).

Per head (``--per-head``): transformers' eager ``DeepseekV32Attention`` at real dims, the MLA expanded per head
(B = 1, S = T = 4096, H = 128, dqk = 192, dv = 128, bf16, ``index_topk`` 2048, causal): ``topk`` of causally
masked random index scores, as the indexer selects (distinct keys; rows before 2048 also pick future keys,
which ``row_ends`` hides), ``dedup`` on as the rule passes it.  It times the masked flash kernel per tile
config (query rows per program, keys per tile, warps, stages), its two pre-passes alone (selection bitmask and
tile lists), dense causal SDPA on the same q/k/v (the target: the masked kernel does dense causal work), and
once the per-head gather kernel (``dedup`` off, the path taken before).  TFLOP/s count the dense causal work,
2 * H * (S * (S + 1) / 2) * (dqk + dv).  ``ok`` / a mismatch: 16 query rows (8 first, 8 last) against the
plain-torch reference.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sparse_attention import DV, FLOPS, SCALE, _inputs  # noqa: E402
from dsa_inductor.lowerings.sparse_attention import (attention_mismatch, selection_tiles,  # noqa: E402
                                                     sparse_attention_reference, sparse_attention_triton)


def _us(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def _try_config(tag, args, kw, ref, rows, flops) -> None:
    """One kernel config: run it (a config the compiler refuses is printed), check ``rows`` against ``ref``,
    time it."""
    try:
        out = sparse_attention_triton(*args, **kw)
    except Exception as err:  # noqa: BLE001  (e.g. out of shared memory)
        print(f"{tag}: {type(err).__name__}: {str(err)[:80]}", flush=True)
        return
    why = attention_mismatch(ref, out[:, rows])
    us = _us(lambda: sparse_attention_triton(*args, **kw))
    print(f"{tag}: {us:8.1f} us {flops / us / 1e6:6.1f} TFLOP/s {why or 'ok'}", flush=True)


def shared_latent(quick: bool) -> None:
    grid = ([(64, 64, 8, 1, False), (64, 64, 8, 2, True), (64, 128, 8, 2, True), (64, 128, 8, 3, True),
             (32, 128, 8, 2, True), (32, 64, 8, 3, True), (128, 64, 8, 2, True), (64, 64, 4, 3, True)] if quick else
            list(itertools.product([32, 64, 128], [32, 64], [4, 8], [1, 2, 3], [True, False])))
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
                print(f"causal={causal} BLOCK_H {bh:3d} BLOCK_K {bk:3d} warps {warps:2d} stages {stages} "
                      f"compact {compact:d}: {type(err).__name__}: {str(err)[:80]}", flush=True)
                continue
            why = attention_mismatch(ref, out[:, :256])
            us = _us(lambda: sparse_attention_triton(*args, **kw))
            print(f"causal={causal} BLOCK_H {bh:3d} BLOCK_K {bk:3d} warps {warps:2d} stages {stages} "
                  f"compact {compact:d}: {us:8.1f} us {FLOPS / us / 1e6:6.1f} TFLOP/s {why or 'ok'}", flush=True)


PH_S, PH_H, PH_DQK, PH_DV, PH_K = 4096, 128, 192, 128, 2048


def per_head_inputs():
    """q [1, S, H, 192], k [1, T, H, 192], v [1, T, H, 128] bf16; the indexer's causal top-k; row_ends."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s = t = PH_S
    q = torch.randn(1, s, PH_H, PH_DQK, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, t, PH_H, PH_DQK, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, t, PH_H, PH_DV, device="cuda", dtype=torch.bfloat16, generator=g)
    ends = torch.arange(1, s + 1, device="cuda", dtype=torch.int64)[None]
    scores = torch.rand(1, s, t, device="cuda", generator=g)
    scores = scores.masked_fill(torch.arange(t, device="cuda") >= ends[..., None], float("-inf"))
    idx = scores.topk(PH_K, dim=-1).indices.to(torch.int32)
    return q, k, v, idx, ends


def per_head(quick: bool) -> None:
    grid = ([(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2),
             (64, 128, 4, 2), (128, 128, 8, 2)] if quick else
            list(itertools.product([64, 128], [32, 64, 128], [4, 8], [1, 2, 3, 4])))
    q, k, v, idx, ends = per_head_inputs()
    scale = PH_DQK ** -0.5
    flops = 2.0 * PH_H * (PH_S * (PH_S + 1) / 2) * (PH_DQK + PH_DV)
    args = (q, k, v, idx, ends, None, None, scale, PH_DV, 0, True, torch.bfloat16)
    rows = torch.cat([torch.arange(8), torch.arange(PH_S - 8, PH_S)]).cuda()
    ref = sparse_attention_reference(q[:, rows], k, v, idx[:, rows], ends[:, rows], None, None, scale, PH_DV, 0, True)
    print(f"per head: B=1 S=T={PH_S} H={PH_H} dqk={PH_DQK} dv={PH_DV} K={PH_K} bf16 causal", flush=True)
    for bm, bn, warps, stages in grid:
        _try_config(f"masked flash BLOCK_M {bm:3d} BLOCK_N {bn:3d} warps {warps} stages {stages}", args,
                    dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages), ref, rows, flops)
    for bm, bn in ((128, 64), (64, 64)):
        us = _us(lambda: selection_tiles(idx, PH_S, ends, None, bm, bn))
        print(f"pre-passes alone (bitmask + tile lists, BLOCK_M {bm} BLOCK_N {bn}): {us:8.1f} us", flush=True)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    us = _us(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale))
    print(f"dense causal SDPA (torch's default backend), same q/k/v: {us:8.1f} us {flops / us / 1e6:6.1f} TFLOP/s",
          flush=True)
    gather = args[:10] + (False, torch.bfloat16)
    ms = triton.testing.do_bench(lambda: sparse_attention_triton(*gather), warmup=1, rep=1, return_mode="median")
    print(f"per-head gather kernel (dedup off, the previous path): {ms * 1e3:10.1f} us", flush=True)


V4_S, V4_H, V4_D, V4_W, V4_M, V4_K = 4096, 64, 512, 128, 4, 512


def v4_key_lists(quick: bool) -> None:
    """DeepSeek-V4-Flash attention as key lists (what the windowed_attention rule's CSA route builds): one K = V
    head [1, T, 1, 512] shared by 64 heads, bf16, the sink, dedup; each query's window of 128 keys, plus (CSA)
    512 picks among S / 4 compressed keys.  Shared-latent kernel configs; the sliding layer's windowed_attention
    kernel on the same input for comparison."""
    from dsa_inductor.lowerings.windowed_attention import windowed_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    s, h, d, w = V4_S, V4_H, V4_D, V4_W
    n = s // V4_M
    q = torch.randn(1, s, h, d, device="cuda", generator=g).to(torch.bfloat16)
    kv = torch.randn(1, s + n, 1, d, device="cuda", generator=g).to(torch.bfloat16)
    sinks = torch.randn(h, device="cuda", generator=g)
    win = torch.arange(s, device="cuda")[:, None] + torch.arange(-w + 1, 1, device="cuda")[None]
    win = torch.where(win >= 0, win, -1)[None]
    ready = ((torch.arange(s, device="cuda") + 1) // V4_M)[:, None]
    scores = torch.rand(1, s, n, device="cuda", generator=g).masked_fill(torch.arange(n, device="cuda") >= ready, -1)
    picks = scores.topk(V4_K, dim=-1).indices
    picks = torch.where(picks < ready, picks + s, -1)
    grid = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 1), (64, 32, 4, 2), (32, 64, 4, 2)]
    if quick:
        grid = grid[:2]
    scale = d ** -0.5
    rows = torch.cat([torch.arange(8), torch.arange(s - 8, s)]).cuda()
    for label, idx, t in (("sliding (window 128)", win, s), ("CSA (window 128 + 512 picks)",
                                                             torch.cat([win, picks], -1), s + n)):
        k = kv[:, :t]
        valid = int((idx >= 0).sum())
        flops = 4.0 * h * valid * d  # q k^T and P V over each query's valid keys
        args = (q, k, None, idx, None, None, sinks, scale, d, 1, True, torch.bfloat16)
        ref = sparse_attention_reference(q[:, rows], k, None, idx[:, rows], None, None, sinks, scale, d, 1, True)
        for bh, bk, warps, stages in grid:
            _try_config(f"V4 {label}: BLOCK_H {bh} BLOCK_K {bk} warps {warps} stages {stages}", args,
                        dict(block_h=bh, block_k=bk, num_warps=warps, num_stages=stages), ref, rows, flops)
    qh, kh = q.transpose(1, 2), kv[:, :s].transpose(1, 2)
    ends = torch.arange(1, s + 1, device="cuda")
    us = _us(lambda: windowed_attention_triton(qh, kh, kh, ends - w, ends, scale, torch.bfloat16, sinks=sinks[:, None]))
    print(f"V4 sliding, windowed_attention kernel (rows layout): {us:8.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few configs only")
    ap.add_argument("--per-head", action="store_true", help="the per-head masked flash kernel (transformers' shape)")
    ap.add_argument("--v4", action="store_true", help="DeepSeek-V4's key lists (window, window + picks)")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    (v4_key_lists if a.v4 else per_head if a.per_head else shared_latent)(a.quick)


if __name__ == "__main__":
    main()
