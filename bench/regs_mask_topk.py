"""Registers / spills of the masked_topk kernels for sm_90 without a GPU (AOT compile + bundled ptxas).

Usage: ``python bench/regs_mask_topk.py`` (TRITON_INTERPRET must be unset).  Compiles each variant with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` for the shapes of the tuning cases
(causal 8192 x 8192 fp32 ends-only; decode 64 x 65536), with the specializations a real launch gets
(unit last-dim stride, 16-byte aligned pointers), and prints ptxas ``-v --gpu-name sm_90a`` registers and spill bytes.
"""

import os
import re
import subprocess
import sys
import tempfile

assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsa_inductor.lowerings import masked_topk as mt  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Triton 3.9 assembles sm_90 with its newer ptxas (ptxas-blackwell, CUDA 13.x); the legacy one (CUDA 12.x, the
# generation Triton 3.6 ships) is run too on the same PTX with its .version lowered to one it accepts.
PTXAS = [(name, os.path.join(BIN, name)) for name in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(BIN, name))]
TARGET = GPUTarget("cuda", 90, 32)

COMMON = dict(HAS_STARTS=False, HAS_ENDS=True, MASK_MODE=0, HAS_BIAS=False, RANGE_ONLY=True, LOW_BIT=0,
              OUT_DTYPE=tl.float32)


def _signature(fn, consts, ptrs, floats=("fill",)):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith(("xs", "ms", "bs")) else "i32"
    return sig, attrs


def regs(fn, consts, ptrs, num_warps):
    consts = dict(consts)
    for unit in ("xs2", "ms2", "bs2"):  # unit strides: a launch specializes ints equal to 1
        if unit in fn.arg_names:
            consts[unit] = 1
    sig, attrs = _signature(fn, consts, ptrs)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    res = []
    for tool, path in PTXAS:
        ptx = k.asm["ptx"]
        if tool == "ptxas":
            ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.7", ptx, count=1, flags=re.M)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        out = subprocess.run([path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        r = re.search(r"Used (\d+) registers", out)
        sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        res.append(f"{tool}: {r.group(1)} regs, spill {sp.group(1)}/{sp.group(2)} B" if r and sp
                   else f"{tool}: {out.strip().splitlines()[-1] if out.strip() else '?'}")
    return " | ".join(res)


PTRS = ["x_ptr", "st_ptr", "en_ptr", "m_ptr", "b_ptr"]


def main():
    f32, i32 = "*fp32", "*i32"
    base_ptrs = {"x_ptr": f32, "st_ptr": i32, "en_ptr": i32, "m_ptr": f32, "b_ptr": f32}
    rows = []
    # v4 single-row program, causal (for calibration against bench/NOTES.md: 255 regs + spills at 4 warps).
    v4 = dict(COMMON, FROM_CANDIDATES=False, FINAL=True, WRITE_VALUES=False, BLOCK=8192, SMALL=256)
    ptrs = dict(base_ptrs, ck_ptr=i32, ci_ptr=i32, ok_ptr=i32, oi_ptr=i32, val_ptr=f32, idx_ptr=i32,
                sk_ptr=i32, si_ptr=i32)
    for w in (4, 8):
        rows.append((f"v4 row BLOCK 8192 warps {w}", regs(mt._masked_topk_kernel, v4, ptrs, w)))
    ptrs = dict(base_ptrs, val_ptr=f32, idx_ptr=i32, thr_ptr=i32)
    which = sys.argv[1:] or ["row", "split"]
    if "row" in which:
        for phase in (0, 1, 2):
            for bits in ((1, 2) if phase != 2 else (1,)):
                for tile in ((1024, 2048, 4096) if phase != 1 else (2048,)):
                    for w in (4, 8):
                        c = dict(COMMON, WRITE_VALUES=False, BLOCK=8192, TILE=tile, BITS=bits, PHASE=phase)
                        rows.append((f"v5 row phase {phase} bits {bits} tile {tile} warps {w}",
                                     regs(mt._v5_row_kernel, c, ptrs, w)))
        c = dict(COMMON, WRITE_VALUES=True, BLOCK=16384, TILE=2048, BITS=2, PHASE=0)
        rows.append(("v5 row phase 0 bits 2 tile 2048 BLOCK 16384 values warps 8",
                     regs(mt._v5_row_kernel, c, ptrs, 8)))
    if "split" in which:
        for tile in (2048, 4096):
            for w in (4, 8):
                for p in (0, 3):
                    c = dict(COMMON, TILE=tile, PASS=p, NPASS=4, DIGIT=8)
                    rows.append((f"v5 hist pass {p} tile {tile} warps {w}",
                                 regs(mt._v5_hist_kernel, c, dict(base_ptrs, h_ptr=i32), w)))
                c = dict(COMMON, WRITE_VALUES=False, TILE=tile, NPASS=4, DIGIT=8)
                rows.append((f"v5 split compact tile {tile} warps {w}",
                             regs(mt._v5_split_compact_kernel, c,
                                  dict(base_ptrs, h_ptr=i32, ctr_ptr="*i64", val_ptr=f32, idx_ptr=i32), w)))
    for name, r in rows:
        print(f"{name:55s} {r}", flush=True)


if __name__ == "__main__":
    main()
