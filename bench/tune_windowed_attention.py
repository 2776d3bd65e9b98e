"""Sweep the windowed attention kernel's tiles, warps and stages at the benchmark shape (q, k, v [8192, 128],
a 128-key sliding window), direct kernel calls; each config is checked against eager first.  Each config gets
its GPU time (``harness.device_us``: kernel time alone; at this size a direct call is host-bound, so the
do_bench time "with host" measures Python and the launch, not the kernel).

    python bench/tune_windowed_attention.py [--t 8192] [--w 128] [--dtype bfloat16|float32] [--fp32-dot ieee|tf32x3]
    python bench/tune_windowed_attention.py --v4 [--t 4096]   # DeepSeek-V4's sliding layer: 64 heads, D = Dv = 512,
                                                              # one shared K = V head, a per-head sink

``--fp32-dot`` sets ``windowed_attention.FP32_PRECISION`` for fp32 inputs ("ieee" is the default: eager's fp32
matmul without TF32; "tf32x3" runs on tensor cores with close to fp32 accuracy; the check says whether it
stays within the fp32 tolerance).

The check here is at D = Dv = 128 only.  Triton 3.6 miscompiled the 64 x 64 / 4-warp tile at other head dims
(D = 33, Dv = 2) while it passed at 128 (``windowed_attention._miscompiled_tile``, which refuses it: such
configs print ``ValueError``), so after changing a default run
``tests/test_windowed_attention_kernel.py::test_default_tile_at_odd_head_dims`` and the kernel's property test
on the GPU.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from dsa_inductor.lowerings import windowed_attention as mod
from dsa_inductor.testing import windowed_attention_mismatch
from harness import _median_us, device_us


def _us(fn):
    return _median_us(fn, ())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--w", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fp32-dot", default=mod.FP32_PRECISION)
    ap.add_argument("--v4", action="store_true")
    a = ap.parse_args()
    if a.v4:
        return v4(a.t if a.t != 8192 else 4096, a.w, getattr(torch, a.dtype))
    t, w, dtype = a.t, a.w, getattr(torch, a.dtype)
    mod.FP32_PRECISION = a.fp32_dot
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, 128, device="cuda", generator=g).to(dtype) for _ in range(3))
    pos = torch.arange(t, device="cuda")
    s, e = pos - w + 1, pos + 1
    scale = 128 ** -0.5
    ref = mod.windowed_attention_reference(q, k, v, s, e, scale, dtype)
    print(f"{torch.cuda.get_device_name()}: {t}x128 {a.dtype}, window {w}, fp32 dot {a.fp32_dot}; "
          f"eager (dense) {_us(lambda: mod.windowed_attention_reference(q, k, v, s, e, scale, dtype)):.1f} us; "
          f"a [{t}, 128] copy {_us(lambda: q.clone()):.1f} us")
    for bm, bn, warps, stages in itertools.product([32, 64, 128], [32, 64, 128], [4, 8], [2, 3]):
        kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            out = mod.windowed_attention_triton(q, k, v, s, e, scale, dtype, **kw)
        except Exception as err:  # noqa: BLE001  (a config the compiler refuses, e.g. out of shared memory)
            print(f"bm {bm:3d} bn {bn:3d} warps {warps} stages {stages}: {type(err).__name__}")
            continue
        why = windowed_attention_mismatch(ref, out, dtype)
        call = lambda: mod.windowed_attention_triton(q, k, v, s, e, scale, dtype, **kw)  # noqa: E731
        print(f"bm {bm:3d} bn {bn:3d} warps {warps} stages {stages}: GPU {device_us(call, ()):7.1f} us, "
              f"with host {_us(call):7.1f} us {why or 'ok'}", flush=True)


def v4(t, w, dtype) -> None:
    """DeepSeek-V4's sliding-window layer (bench case "windowed attention + sink"): the wide head dim (512) is
    where the 128-dim defaults may not hold."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 64, t, 512, device="cuda", generator=g).to(dtype)
    kv = torch.randn(1, 1, t, 512, device="cuda", generator=g).to(dtype)
    sinks = torch.randn(64, 1, device="cuda", generator=g)
    pos = torch.arange(t, device="cuda")
    s, e, scale = pos - w + 1, pos + 1, 512 ** -0.5
    ref = mod.windowed_attention_reference(q, kv, kv, s, e, scale, dtype, sinks)
    print(f"{torch.cuda.get_device_name()}: V4 sliding layer, 64 heads, T {t}, D 512, {dtype}, window {w}; "
          f"q copy {_us(lambda: q.clone()):.1f} us", flush=True)
    for bm, bn, warps, stages in [(0, 0, 0, 0)] + list(itertools.product([16, 32, 64], [16, 32], [4, 8], [2])):
        kw = {n: x for n, x in dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages).items() if x}
        call = lambda: mod.windowed_attention_triton(q, kv, kv, s, e, scale, dtype, sinks, **kw)  # noqa: E731
        try:
            why = windowed_attention_mismatch(ref, call(), dtype)
        except Exception as err:  # noqa: BLE001  (a config the compiler refuses, e.g. out of shared memory)
            print(f"bm {bm:3d} bn {bn:3d} warps {warps} stages {stages}: {type(err).__name__}", flush=True)
            continue
        print(f"bm {bm:3d} bn {bn:3d} warps {warps} stages {stages}: GPU {device_us(call, ()):8.1f} us "
              f"{why or 'ok'}", flush=True)


if __name__ == "__main__":
    main()
