"""Sweep the gather-dequant kernel's rows per program and warps at 4,194,304 FP8 slots, D = 128 (CUDA only).

    python bench/tune_gather_dequant.py

Prints the median time and the fraction of HBM bandwidth (datasheet) of each configuration, then the
default's, so ``default_config`` in ``dsa_inductor/lowerings/gather_dequant.py`` can be set from it.
"""

import sys

import torch
import triton.testing

from dsa_inductor.lowerings.gather_dequant import default_config, gather_dequant_reference, gather_dequant_triton

HBM = {"H100": 3.35e12, "H200": 4.8e12}


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    n, d = 4_194_304, 128
    k = torch.randint(0, 120, (n, d), dtype=torch.uint8, device="cuda")
    s = torch.rand(n, 1, device="cuda")
    slots = torch.randperm(n, device="cuda")
    slots[::97] = -1
    bw = next((v for key, v in HBM.items() if key in torch.cuda.get_device_name()), 3.35e12)
    for out_dtype in (torch.float32, torch.bfloat16):
        moved = n * (d + 4 + 8 + d * torch.empty((), dtype=out_dtype).element_size())
        ref = gather_dequant_reference(k, s, slots, zero_negative=True, out_dtype=out_dtype)
        results = []
        for block_rows in (8, 16, 32, 64, 128):
            for warps in (2, 4, 8):
                def run():
                    return gather_dequant_triton(k, s, slots, zero_negative=True, out_dtype=out_dtype,
                                                 block_rows=block_rows, num_warps=warps)
                assert torch.equal(run(), ref)
                us = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") * 1e3
                results.append((us, block_rows, warps))
                print(f"{out_dtype} block_rows={block_rows:4d} warps={warps}: {us:8.1f} us  "
                      f"{moved / (us * 1e-6) / bw:6.1%} of HBM", flush=True)
        us, br, w = min(results)
        print(f"best {out_dtype}: block_rows={br} warps={w} {us:.1f} us ({moved / (us * 1e-6) / bw:.1%}); "
              f"default is {default_config(d, out_dtype, 'e4m3')}")


if __name__ == "__main__":
    main()
