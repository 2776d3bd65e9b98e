"""Tuning sweep for the masked_topk kernel (direct calls, no compile): band size, chunk, warps.

Usage (GPU): ``python bench/tune_mask_topk.py [causal|decode|sort] [--variants]`` prints one line per
configuration with the do_bench median, registers/spills of each launch and a correctness check against eager.
With ``--gpu-time``: each variant's host-free cost, the figure a decode or CUDA-graph caller sees:
CUDA-graph replay of one call, and the profiler's per-kernel device time; beside them ``direct``, the do_bench
median of direct calls (for the launch-heavy split designs, host launch time).  The decode cases: 64 x 65536
fp32 (v4, v7 and its knobs, v5's split rows), and with v4, v7 (default, without the staircase, with
``row_bound``) and v5: bf16, rows whose scores rise with the position, a larger batch (256 x 131072) and 2048
prefill rows of 32768 keys (bench/NOTES.md, session 22).
Without ``--variants``: the v4 sweep (band size, chunk/merge, warps).  With ``--variants``: v4's default
against the v5 designs and knobs (``impl``, ``bits``, ``phases``, ``tile``, ``num_warps``, ``maxnreg``;
``chunk`` for split decode rows), the rows bench/NOTES.md's v5 table asks for.
"""

import sys

import torch
import triton.testing

import triton
import triton.language as tl

from dsa_inductor.lowerings import masked_topk as mt
from dsa_inductor.lowerings.masked_topk import masked_logits, masked_topk_triton, topk_mismatch
from harness import device_kernels_us


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


CAUSAL_VARIANTS = [("v4 default", dict(impl="v4"))] + [
    (f"v5 {phases} bits {bits} tile {tile} warps {warps}" + (f" maxnreg {reg}" if reg else ""),
     dict(impl="v5", phases=phases, bits=bits, tile=tile, num_warps=warps, maxnreg=reg))
    for phases in ("fused", "two") for bits in (1, 2) for tile in (1024, 2048) for warps in (4, 8)
    for reg in ((None, 128) if warps == 4 else (None,))
]
DECODE_VARIANTS = [("v4 default", dict(impl="v4"))] + [
    (f"v5 split chunk {chunk} tile {tile} warps {warps}",
     dict(impl="v5", chunk=chunk, tile=tile, num_warps=warps))
    for chunk in (2048, 4096, 8192, 16384) for tile in (2048, 4096) if tile <= chunk for warps in (4, 8)
]


def variants(which, t, k):
    """us per variant (unsorted, then the default of each impl sorted) for the causal and decode cases."""
    cases = []
    if "causal" in which:
        x = torch.randn(t, t, device="cuda")
        cases.append(("causal", x, torch.arange(1, t + 1, device="cuda", dtype=torch.int32), CAUSAL_VARIANTS))
    if "decode" in which:
        dx = torch.randn(64, 65536, device="cuda")
        cases.append(("decode", dx, torch.randint(32768, 65537, (64,), device="cuda", dtype=torch.int32),
                      DECODE_VARIANTS))
    for case, x, ends, table in cases:
        for name, kw in table:
            try:
                r = bench(x, ends, k, sorted=False, **kw)
            except Exception as e:  # a knob the installed Triton rejects: report, go on
                r = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            print(f"{case} {name:50s}: unsorted {r}", flush=True)
        for impl in ("v4", "v5"):
            print(f"{case} {impl} default{'':39s}: sorted   {bench(x, ends, k, sorted=True, impl=impl)}", flush=True)
        # The same problem in bf16 (16-bit keys: fewer radix passes / bisection rounds).
        xb = x.to(torch.bfloat16)
        for impl in ("v4", "v5"):
            print(f"{case} {impl} default bf16{'':34s}: unsorted {bench(xb, ends, k, sorted=False, impl=impl)}",
                  flush=True)


def graph_us(fn) -> float:
    """One call of ``fn`` captured in a CUDA graph, replayed: do_bench median of the replays."""
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3


def kernel_times(fn) -> str:
    """Per-kernel device time of one call (``harness.device_kernels_us``), largest first."""
    ev = [(name, us) for name, us in device_kernels_us(fn, ()) if us > 0]
    total = sum(us for _, us in ev)
    return f"device {total:7.1f}us = " + ", ".join(f"{name[:40]} {us:.1f}" for name, us in ev[:6])


GPU_TIME_VARIANTS = [("v4 default", dict(impl="v4")), ("v7 default", dict(impl="v7"))] + [
    (f"v7 {name}", dict(impl="v7", **kw)) for name, kw in (
        ("no staircase", dict(v7=dict(staircase=False))), ("row bound", dict(v7=dict(row_bound=True))), ("oversample 1.25", dict(v7=dict(oversample=1.25))),
        ("oversample 1.5", dict(v7=dict(oversample=1.5))), ("oversample 3", dict(v7=dict(oversample=3.0))),
        ("stop bit 0", dict(v7=dict(stop_bit=0))), ("stop bit 8", dict(v7=dict(stop_bit=8))),
        ("chunk 8192", dict(chunk=8192)), ("warps 8", dict(num_warps=8)), ("cap 8192", dict(v7=dict(cap=8192))))
] + [("v5 split chunk 4096 tile 1024 warps 4", dict(impl="v5", chunk=4096, tile=1024, num_warps=4))]


def gpu_time(which, t, k):
    cases = []
    if "decode" in which:
        g = torch.Generator(device="cuda").manual_seed(1)
        dx = torch.randn(64, 65536, device="cuda", generator=g)
        ends = torch.randint(32768, 65537, (64,), device="cuda", dtype=torch.int32, generator=g)
        three = GPU_TIME_VARIANTS[:4] + [GPU_TIME_VARIANTS[-1]]  # v4, v7, v7 w/o staircase, v7 row bound, v5 split
        cases += [("decode", dx, ends, GPU_TIME_VARIANTS), ("decode bf16", dx.bfloat16(), ends, three)]
        # Rows whose scores rise with the position: chunks' bounds differ most (v7's candidates overflow its list).
        rising = dx + torch.arange(65536, device="cuda") / 256.0
        cases += [("decode rising", rising, ends, three)]
        wide = torch.randn(256, 131072, device="cuda", generator=g)  # a larger decode batch, longer context
        cases += [("decode 256 x 131072", wide, torch.randint(65536, 131073, (256,), device="cuda", dtype=torch.int32,
                                                             generator=g), three)]
        # Prefill at long context: thousands of causal rows longer than one program holds.
        tall = torch.randn(2048, 32768, device="cuda", generator=g)
        cases += [("prefill 2048 x 32768", tall, torch.arange(32768 - 2048 + 1, 32769, device="cuda",
                                                               dtype=torch.int32), three)]
    if "causal" in which:
        x = torch.randn(t, t, device="cuda")
        ends = torch.arange(1, t + 1, device="cuda", dtype=torch.int32)
        cases += [("causal", x, ends, [("v5 default", dict(impl="v5"))])]
    calls = []  # (label, fn, masked, sorted); stock's and torch.sort's with masked None
    for case, x, ends, table in cases:
        masked = masked_logits(x, row_ends=ends)
        for srt in (False, True):
            for name, kw in table:
                fn = (lambda x=x, ends=ends, srt=srt, kw=kw: masked_topk_triton(
                    x, k, row_ends=ends, need_values=False, index_dtype=torch.int32, sorted=srt, **kw))
                calls.append((f"{case} {'sorted' if srt else 'unsorted'} {name:38s}", fn, masked, srt))
        stock = torch.compile(lambda x, e: x.masked_fill(
            torch.arange(x.shape[-1], device=x.device)[None] >= e[:, None], float("-inf")).topk(k, dim=-1).indices)
        calls.append((f"{case} sorted stock torch.compile{'':21s}", lambda x=x, ends=ends, f=stock: f(x, ends), None,
                      True))
        v = torch.randn(x.shape[0], k, device="cuda")
        calls.append((f"{case} torch.sort [{x.shape[0]}, {k}]{'':27s}", lambda v=v: v.sort(dim=-1, descending=True),
                      None, True))
    # Direct calls first, before any torch.profiler run (kernel_times): a profiler run leaves CUPTI attached to the
    # process (pytorch#144455), adding host time to later launches.  Session 20's run timed them after the previous
    # variants' profiler runs, and its sorted direct calls took ~500 us more than the unsorted ones.
    direct = {}
    for label, fn, _, _ in calls:
        try:
            fn()
            direct[label] = f"{triton.testing.do_bench(fn, warmup=10, rep=50, return_mode='median') * 1e3:7.1f}us"
        except Exception as e:
            direct[label] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    for label, fn, masked, srt in calls:
        try:
            bad = topk_mismatch(masked, k, None, fn()[1], srt, False) if masked is not None else None
            r = (f"graph {graph_us(fn):7.1f}us  direct {direct[label]}  {kernel_times(fn)}"
                 f"{' BAD ' + bad if bad else ''}")
        except Exception as e:
            r = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        print(f"{label}: {r}", flush=True)


def main():
    t, k = 8192, 2048
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    which = args or ["causal", "decode", "sort"]
    if "--gpu-time" in sys.argv:
        gpu_time(which, t, k)
        return
    if "--variants" in sys.argv:
        variants(which, t, k)
        return
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
                      f"{bench(x, ends, k, sorted=False, small=small, num_warps=warps, impl='v4')}", flush=True)
        print(f"causal v4 default: sorted {bench(x, ends, k, sorted=True, impl='v4')}", flush=True)
    if "decode" in which:
        dx = torch.randn(64, 65536, device="cuda")
        dends = torch.randint(32768, 65537, (64,), device="cuda", dtype=torch.int32)
        for chunk, merge in ((4096, 8192), (8192, 8192), (8192, 16384), (16384, 8192)):
            for warps in (4, 8):
                print(f"decode chunk {chunk:5d} merge {merge:5d} warps {warps}: unsorted "
                      f"{bench(dx, dends, k, sorted=False, chunk=chunk, merge=merge, num_warps=warps, impl='v4')}",
                      flush=True)
        print(f"decode v4 default: sorted {bench(dx, dends, k, sorted=True, impl='v4')}", flush=True)
    if "sort" in which:  # what sorting the k winners costs outside the kernel, for comparison
        v = torch.randn(t, k, device="cuda")
        us = triton.testing.do_bench(lambda: v.sort(dim=-1, descending=True), warmup=10, rep=50,
                                     return_mode="median")
        print(f"torch.sort [{t}, {k}] fp32 with indices: {us * 1e3:.1f}us", flush=True)


if __name__ == "__main__":
    main()
