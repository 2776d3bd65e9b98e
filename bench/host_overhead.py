"""Host (CPU) time per call of each fused op, and where it goes.

A fused op inserted post-grad runs as an opaque custom op: Inductor's generated wrapper calls
``torch.ops.dsa_inductor.<op>`` and the op's Python body computes launch parameters and launches its
Triton kernels.  At small sizes the GPU finishes before the host issues the next call, so the host time
per call *is* the latency.  This measures, per op, at tiny sizes:

* ``op``: ``torch.ops.dsa_inductor.<op>(...)`` (the dispatcher path the compiled graph takes);
* ``body``: the op's ``*_triton`` function called directly (no dispatcher);
* ``compiled``: a compiled eager idiom with dsa_inductor, and with stock torch.compile, per call;

then prints the top of a cProfile of the ``op`` path.

    python bench/host_overhead.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import dsa_inductor
from dsa_inductor.lowerings import gather_dequant as gd
from dsa_inductor.lowerings import index_score as isc
from dsa_inductor.lowerings import masked_topk as mt
from dsa_inductor.lowerings import windowed_softmax as ws


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def cases(dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(64, 4096, device=dev, generator=g)
    ends = torch.randint(1, 4096, (64,), device=dev, generator=g)
    starts = torch.zeros_like(ends)
    op = torch.ops.dsa_inductor
    yield ("masked_topk", lambda: op.masked_topk(logits, 256, starts, ends, None, True, None, float("-inf"), False,
                                                  torch.int32, False),
           lambda: mt.masked_topk_triton(logits, 256, starts, ends, sorted=False, index_dtype=torch.int32,
                                         need_values=False))
    cache = torch.randint(0, 100, (4096, 128), dtype=torch.uint8, device=dev)
    scale = torch.rand(4096, 1, device=dev)
    slots = torch.randint(-1, 4096, (512,), device=dev)
    yield ("gather_dequant", lambda: op.gather_dequant(cache, scale, slots, None, 0, None, True, "e4m3",
                                                        torch.float32),
           lambda: gd.gather_dequant_triton(cache, scale, slots, zero_negative=True))
    q = torch.randn(1, 64, 8, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 256, 64, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, 64, 8, device=dev, dtype=torch.bfloat16)
    yield ("index_score", lambda: op.index_score(q, k, w, 0.125, False, None),
           lambda: isc.index_score_triton(q, k, w, 0.125))
    scores = torch.randn(256, 1024, device=dev)
    ke = torch.randint(1, 1024, (256,), device=dev)
    yield ("windowed_softmax", lambda: op.windowed_softmax(scores, None, ke, None, torch.float32),
           lambda: ws.windowed_softmax_triton(scores, None, ke))


def idiom(k: int, sorted: bool):
    def fn(logits, ends):
        keep = torch.arange(logits.shape[-1], device=logits.device)[None, :] < ends[:, None]
        return logits.masked_fill(~keep, float("-inf")).topk(k, dim=-1, sorted=sorted).indices.to(torch.int32)
    return fn


def _profile(fn, top: int, calls: int = 200) -> None:
    """Print the ``top`` entries (by own time) of a cProfile of ``calls`` calls of ``fn``."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch._inductor.config.force_disable_caches = True
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'op':18s} {'op us':>8s} {'body us':>8s}")
    for name, via_op, body in cases():
        with torch.no_grad():
            print(f"{name:18s} {host_us(via_op):8.1f} {host_us(body):8.1f}", flush=True)
            if a.profile:
                _profile(via_op, 14)
    # compiled mask-then-topk: a small unsorted case, and issue 2's sorted decode shape (64 x 65536, k = 2048)
    for n, k, sorted_ in ((4096, 256, False), (65536, 2048, True)):
        logits = torch.randn(64, n, device="cuda")
        ends = torch.randint(n // 2, n + 1, (64,), device="cuda")
        with torch.no_grad():
            for label, reg in (("stock", False), ("ours", True)):
                torch._dynamo.reset()
                (dsa_inductor.register_dsa_passes if reg else dsa_inductor.unregister_dsa_passes)()
                f = torch.compile(idiom(k, sorted_), dynamic=False)
                f(logits, ends)
                print(f"compiled mask-topk 64 x {n}, k {k}, sorted {sorted_}, {label}: "
                      f"{host_us(lambda: f(logits, ends)):.1f} us/call host", flush=True)
                if a.profile and reg:
                    _profile(lambda: f(logits, ends), 20)
    dsa_inductor.unregister_dsa_passes()


if __name__ == "__main__":
    main()
