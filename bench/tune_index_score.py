"""Sweep the index-score kernel's tiles and launch options at S = T = 4096, H = 64, D = 128 bf16 (CUDA).

    python bench/tune_index_score.py [--s 4096] [--t 4096]
    python bench/tune_index_score.py --decode 64 --t 16384    # B requests of one query row: the heads layout
    python bench/tune_index_score.py --fixup                  # the cost of the three-dot split's fix-up launch

Decode mode sweeps the heads layout (bf16 keys, and FP8 cache keys gathered by slot) against the rows layout,
and prints the achieved bandwidth of the key stream.

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

from dsa_inductor.lowerings.index_score import (gathered_k, index_score_reference, index_score_triton,  # noqa: E402
                                                q_row_min, score_mismatch, tolerance)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--h", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--decode", type=int, default=0, help="B requests of --s (default 1) query rows each")
    ap.add_argument("--fixup", action="store_true", help="time the split's fix-up launch (FP8-cache keys)")
    a = ap.parse_args()
    if a.fixup:
        return fixup()
    if a.decode:
        return decode(a)
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


def decode(a) -> None:
    from dsa_inductor.lowerings.gather_dequant import quantize_e4m3

    b, s = a.decode, (a.s if a.s != 4096 else 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, a.h, a.d, device="cuda", generator=g).bfloat16()
    k = torch.randn(b, a.t, a.d, device="cuda", generator=g).bfloat16()
    w = torch.randn(b, s, a.h, device="cuda", generator=g)
    cache, scale = quantize_e4m3(torch.randn(b * a.t, a.d, device="cuda", generator=g))
    slots = torch.randperm(b * a.t, device="cuda", generator=g).view(b, a.t)
    forms = {
        "bf16 k": ((q, k, w, 0.088), {}, b * a.t * a.d * 2),
        "fp8 cache": ((q, cache, w, 0.088), dict(k_slots=slots, k_cache_scale=scale, k_zero_negative=True),
                      b * a.t * (a.d + 4 + 8)),
    }
    print(f"decode B={b} S={s} T={a.t} H={a.h} D={a.d} on {torch.cuda.get_device_name()}")
    for name, (args, kw, nbytes) in forms.items():
        ref = index_score_triton(*args, **kw, layout="rows")
        tol = tolerance(q, k, w, 0.088)
        best = None
        configs = [("rows", None, None, None, None)] + [
            ("heads", bt, warps, stages, None)
            for bt, warps, stages in itertools.product((64, 128, 256), (4, 8), (2, 3, 4, 5))]
        for layout, bt, warps, stages, _ in configs:
            try:
                fn = lambda: index_score_triton(*args, **kw, layout=layout, block_t=bt, num_warps=warps,  # noqa: E731
                                                num_stages=stages)
                out = fn()
                # (the FP8 form's keys are not k: there the rows layout is the check)
                why = score_mismatch(out, ref, tol) if name == "bf16 k" else (
                    None if torch.allclose(out, ref, rtol=1e-5, atol=1e-3) else "differs from the rows layout")
                us = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e3
            except Exception as ex:  # out of resources for this config
                print(f"{name} {layout} bt={bt} warps={warps} stages={stages}: {type(ex).__name__}")
                continue
            print(f"{name} {layout} bt={bt} warps={warps} stages={stages}: {us:8.1f} us "
                  f"{nbytes / us / 1e3:7.1f} GB/s (keys) {why or 'ok'}", flush=True)
            if layout == "heads" and why is None and (best is None or us < best[0]):
                best = (us, bt, warps, stages)
        dflt = triton.testing.do_bench(lambda: index_score_triton(*args, **kw), return_mode="median") * 1e3
        print(f"{name}: default {dflt:.1f} us; best heads {best[0]:.1f} us with (block_t, warps, stages) = {best[1:]}")


def fixup() -> None:
    """FP8-cache keys against bf16 q (the three-bf16-dot split): the kernel without the fix-up launch, with it
    on ordinary inputs (it reads q once and each tile's flag, and recomputes nothing), and with inputs that
    make it recompute: an inf in one q row (one row tile's tiles), and keys below 2**-102 in one key tile."""
    from dsa_inductor.lowerings.gather_dequant import quantize_e4m3

    print(f"split fix-up on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    h, d = 64, 128
    for name, b, s, t, n in (("prefill", 1, 1024, 4096, 16384), ("decode", 64, 1, 16384, 64 * 16384)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, d, device="cuda", generator=g).bfloat16()
        w = torch.randn(b, s, h, device="cuda", generator=g) * h ** -0.5
        cache, scale = quantize_e4m3(torch.randn(n, d, device="cuda", generator=g))
        slots = torch.randperm(n, device="cuda", generator=g)[:b * t].view(b, t)
        q_inf = q.clone()
        q_inf[0, 0, 3, 7] = float("inf")
        tiny = scale.clone()
        tiny[slots[0, :128].long()] *= 2.0 ** -120  # one key tile of batch 0
        for what, qq, sc, fix in (("no fix-up", q, scale, False), ("fix-up, nothing to fix", q, scale, True),
                                  ("fix-up, inf in a q row", q_inf, scale, True),
                                  ("fix-up, one tile of tiny keys", q, tiny, True)):
            fn = lambda: index_score_triton(qq, cache, w, 0.088, False, k_slots=slots,  # noqa: E731
                                            k_cache_scale=sc, k_zero_negative=True, fixup=fix)
            out = fn()
            ref = index_score_reference(qq[:1, :64], cache, w[:1, :64], 0.088, False, k_slots=slots[:1],
                                        k_cache_scale=sc, k_zero_negative=True)
            keys = gathered_k(cache, slots[:1], sc, 0, True)
            why = score_mismatch(out[:1, :64], ref, tolerance(qq[:1, :64], keys, w[:1, :64], 0.088))
            us = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e3
            print(f"{name} B={b} S={s} T={t}: {what:32s} {us:8.1f} us  {why or 'equals eager'}", flush=True)
        us = triton.testing.do_bench(lambda: q_row_min(q), warmup=20, rep=100, return_mode="median") * 1e3
        print(f"{name} B={b} S={s} T={t}: {'of which the q check':32s} {us:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
