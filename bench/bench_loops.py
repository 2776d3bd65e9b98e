"""Per-token Python loops at serving shapes (16 requests x 1024 tokens = 16384 slots).

The FP8 indexer-cache read of DeepSeek-V3.2 serving code, written as the loop vLLM/SGLang-style code writes
it (paged cache, block_size 64, D 128: each page row holds 64 x 128 fp8 bytes then 64 fp32 scales, read
through a uint8 view), and the causal ``[ks, ke)`` window offsets of indexer prefill.  "eager" runs the
Python loop; "stock compile" is ``torch.compile`` of a caller, which graph-breaks at ``.tolist()`` and
unrolls the loop; "dsa-inductor" is the same compile after ``register_dsa_passes()``, which lifts the loop
(the loops live in ``examples/serving_loops.py``, shared with the tests, and are found by scanning when
``register_dsa_passes()`` runs).  The harness compiles
with ``dynamic=False``.  Stock compile of a 16384-iteration unrolled loop takes very long: it is skipped
(reported as nan) unless ``DSA_BENCH_STOCK_LOOPS=1``, which is why ``run_case`` here replaces the harness's.
No Dynamo config is set: the offsets loop's data-dependent output length is an unbacked size.

    python bench/bench_loops.py        # these cases alone; bench/run.py includes them too
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsa_inductor  # noqa: E402
from harness import Case, Result, _gpu_name, _median_us, HBM_BYTES_PER_S  # noqa: E402
from harness import device_times as harness_device_times  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import serving_loops  # noqa: E402  (the loops, shared with tests/test_loops_lifting.py)
from serving_loops import causal_window_offsets, offsets_step, read_indexer_cache  # noqa: E402

BLOCK, D = 64, 128


def indexer_cache_step(cache, slot_mapping):
    return serving_loops.indexer_step(cache, slot_mapping, BLOCK, D)


def _check_equal(args, eager, ours):
    eager = eager if isinstance(eager, tuple) else (eager,)
    ours = ours if isinstance(ours, tuple) else (ours,)
    for e, o in zip(eager, ours):
        if not torch.equal(e.cpu(), o.cpu()):
            return "differs from the eager loop"
    return None


def cases(device="cuda"):
    reqs, toks = 16, 1024
    n = reqs * toks

    def cache_inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        pages = n // BLOCK + 8
        cache = torch.randint(0, 256, (pages, BLOCK * (D + 4)), dtype=torch.uint8, generator=g)
        cache[:, :BLOCK * D] &= 0x77  # no fp8 NaN bytes, so torch.equal checks the values
        cache[:, BLOCK * D:] = torch.rand(pages, BLOCK, generator=g).view(torch.uint8).reshape(pages, -1)
        slots = torch.randperm(pages * BLOCK, generator=g)[:n]
        slots[torch.rand(n, generator=g) < 0.05] = -1  # padding
        return cache.to(device), slots.to(device)

    def offsets_inputs():
        q = torch.full((reqs,), toks, dtype=torch.int64)
        return q + 512, q

    return [
        Case("loop: fp8 indexer cache read", f"{reqs}x{toks} slots, D={D}, block {BLOCK}", indexer_cache_step,
             cache_inputs, min_bytes=n * (D + 4 + 8 + D * 4), check=_check_equal),
        Case("loop: causal [ks, ke) offsets", f"{reqs} requests x {toks} tokens", offsets_step, offsets_inputs,
             min_bytes=n * 8, check=_check_equal),
    ]


def run_case(case: Case) -> Result:
    """eager loop / stock compile (only with DSA_BENCH_STOCK_LOOPS=1) / compile after register_dsa_passes()."""
    torch._inductor.config.force_disable_caches = True
    args = case.make_inputs()
    stock_on = os.environ.get("DSA_BENCH_STOCK_LOOPS") == "1"
    with torch.no_grad():
        eager_out = case.fn(*args)
        eager_us = _median_us(case.fn, args)
        stock_us = math.nan
        if stock_on:
            dsa_inductor.unregister_dsa_passes()
            torch._dynamo.reset()
            stock = torch.compile(case.fn, dynamic=False)
            stock(*args)
            stock_us = _median_us(stock, args)
        torch._dynamo.reset()
        dsa_inductor.reset_report()
        dsa_inductor.register_dsa_passes()
        from dsa_inductor import loops

        assert read_indexer_cache in loops.LIFTED and causal_window_offsets in loops.LIFTED, dsa_inductor.report()
        ours = torch.compile(case.fn, dynamic=False)
        our_out = ours(*args)
        from dsa_inductor.report import match_count

        matches = 1 + match_count()  # the loop lifted, plus the rewrites in its graph (FP8 read: gather_dequant)
        ours_us = _median_us(ours, args)
        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
    problem = case.check(args, eager_out, our_out) if case.check else None
    roof = case.min_bytes / HBM_BYTES_PER_S.get(_gpu_name(), 3.35e12) * 1e6
    nan = math.nan
    return Result(case, eager_us, stock_us, ours_us, roof, matches, problem, nan, nan, nan, nan)


def device_times(case: Case, result: Result) -> Result:
    """``result`` with the GPU time of the lifted loop's compiled kernels (ours only, as before), taken after the
    run's wall-clock timings (harness.device_times says why)."""
    return harness_device_times(case, result, stock=False)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/bench_loops.py needs a CUDA GPU")
    for c in cases():
        r = device_times(c, run_case(c))
        print(f"{c.idiom:36s} {c.shape:32s} eager {r.eager_us:10.1f} stock {r.stock_us:10.1f} ours {r.ours_us:8.1f} "
              f"ours GPU time {r.ours_device_us:6.1f} eager/ours {r.eager_us / r.ours_us:7.1f}x "
              f"roof {r.roofline_us:6.1f} matches {r.matches} {r.problem or 'ok'}", flush=True)
        print(dsa_inductor.report(), flush=True)
