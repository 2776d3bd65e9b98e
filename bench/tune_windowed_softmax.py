"""Sweep the windowed softmax kernel's tile size and warps at the benchmark shape; compare with a plain
dense fp32 write of the same size (``torch.zeros``), the practical floor of a dense output.

    python bench/tune_windowed_softmax.py [--t 8192] [--w 128]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from dsa_inductor.lowerings.windowed_softmax import (softmax_mismatch, window_keep, windowed_softmax_reference,
                                                     windowed_softmax_triton)


def _us(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--w", type=int, default=128)
    a = ap.parse_args()
    t, w = a.t, a.w
    x = torch.randn(t, t, device="cuda")
    q = torch.arange(t, device="cuda", dtype=torch.int32)
    s, e = (q - w + 1).clamp_min(0), q + 1
    ref = windowed_softmax_reference(x, s, e)
    keep = window_keep(t, s, e, device="cuda")
    write_us = _us(lambda: torch.zeros(t, t, device="cuda"))
    print(f"{torch.cuda.get_device_name()}: dense {t}x{t} fp32 write (torch.zeros) {write_us:.1f} us; "
          f"window {w}; eager {_us(lambda: windowed_softmax_reference(x, s, e)):.1f} us")
    for block, warps in itertools.product([256, 512, 1024, 2048, 4096], [2, 4, 8, 16]):
        try:
            out = windowed_softmax_triton(x, s, e, block=block, num_warps=warps)
        except Exception as err:  # noqa: BLE001  (a config the compiler refuses)
            print(f"block {block:5d} warps {warps:2d}: {type(err).__name__}")
            continue
        why = softmax_mismatch(ref, out, keep)
        us = _us(lambda: windowed_softmax_triton(x, s, e, block=block, num_warps=warps))
        print(f"block {block:5d} warps {warps:2d}: {us:8.1f} us  ({t * t * 4 / us / 1e6:.2f} TB/s written) "
              f"{why or 'ok'}", flush=True)


if __name__ == "__main__":
    main()
