"""Sweep the gather-dequant kernel's knobs at 4,194,304 FP8 slots, D = 128, and diagnose the paged case (CUDA only).

    python bench/tune_gather_dequant.py            # decode sweep (fp32 and bf16 out), then the paged diagnosis
    python bench/tune_gather_dequant.py --paged    # the paged diagnosis only (a few seconds)
    python bench/tune_gather_dequant.py --quick    # a smaller decode sweep
    python bench/tune_gather_dequant.py --ceiling  # what bounds the decode case (slot orders, write-only kernels)

Decode sweep: block_rows x num_warps x tiles (tiles of block_rows rows per program) x store_cs (streaming
stores); prints the median time and the fraction of HBM bandwidth (datasheet) of each, the best, and the
default's, so ``default_config`` in ``dsa_inductor/lowerings/gather_dequant.py`` can be set from it.

Ceiling (``--ceiling``): the op's kernel on three slot orders of the same 4,194,304 slots (a random permutation,
pages of 64 slots in random page order, sequential), and two store-only Triton kernels that write the same
2 GiB fp32 output: one with no loads, one that also reads an 8-byte index per 512-byte output row (the stores
do not depend on it), beside torch's fill and copy.  Session 19 on an H100: fill 98%, the store-only kernel 98%,
with the index read 86-88%, copy 90%: any read mixed into the write stream costs ~10% of HBM bandwidth.

Paged diagnosis (bench case "vLLM inline paged, block table", 8192 tokens, pages of 64): the direct kernel
call, the eager / stock / dsa_inductor compiled function, host time per call (wall clock, synchronized), and
a torch.profiler table of the compiled call, so a slow path (host overhead, an extra copy kernel) is named.
"""

import os
import sys
import time

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gather_dequant as bg  # noqa: E402
from dsa_inductor.lowerings.gather_dequant import default_config, gather_dequant_reference, gather_dequant_triton  # noqa: E402

HBM = {"H100": 3.35e12, "H200": 4.8e12}


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def _host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6  # enqueue time per call
    torch.cuda.synchronize()
    return host


def copy_ceiling() -> float:
    """The achievable HBM bandwidth of this card (METHOD.md: measure the ceiling, the datasheet is a lead): a
    device-to-device copy of 2 GiB (bytes read + bytes written per second), and a 2 GiB fill (written only)."""
    src = torch.randn(2 ** 29, device="cuda")
    dst = torch.empty_like(src)
    copy_us = _bench(lambda: dst.copy_(src))
    fill_us = _bench(lambda: dst.fill_(1.0))
    copy_bw = 2 * src.numel() * 4 / (copy_us * 1e-6)
    print(f"copy 2 GiB: {copy_us:.1f} us = {copy_bw / 1e12:.3f} TB/s (read + write); fill 2 GiB: {fill_us:.1f} us = "
          f"{src.numel() * 4 / (fill_us * 1e-6) / 1e12:.3f} TB/s", flush=True)
    del src, dst
    return copy_bw


@triton.jit
def _store_rows(out_ptr, idx_ptr, n, READ_INDEX: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    """Write rows ``[pid * R, +R)`` of an fp32 ``[n, D]`` output (values from the row number); READ_INDEX: also
    read one int64 per row that no store depends on (a store that never happens keeps the load)."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    cols = tl.arange(0, D)
    live = rows < n
    if READ_INDEX:
        raw = tl.load(idx_ptr + rows, mask=live, other=0)
        tl.store(idx_ptr + rows, raw, mask=live & (raw == -12345))
    x = rows.to(tl.float32)[:, None] + cols[None, :].to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], x, mask=live[:, None])


def _decode_cache(n, d):
    """The decode sweep's FP8 cache bytes (no NaN codes) ``[n, d]`` and fp32 scales ``[n, 1]``."""
    return torch.randint(0, 120, (n, d), dtype=torch.uint8, device="cuda"), torch.rand(n, 1, device="cuda")


def slot_orders(n):
    """The decode case's slot orders, each with every 97th slot -1 (padding): a random permutation, pages of 64
    slots in random page order (a paged cache's context read, ``bench_gather_dequant.paged_slots``), sequential."""
    g = torch.Generator(device="cuda").manual_seed(0)
    orders = {"random permutation": torch.randperm(n, device="cuda", generator=g),
              "pages of 64": bg.paged_slots(n, g, "cuda", 64),
              "sequential": torch.arange(n, device="cuda")}
    for slots in orders.values():
        slots[::97] = -1
    return orders


def ceiling(bw):
    copy_ceiling()
    n, d = 4_194_304, 128
    k, s = _decode_cache(n, d)
    moved = n * (d + 4 + 8 + d * 4)
    for name, slots in slot_orders(n).items():
        us = _bench(lambda: gather_dequant_triton(k, s, slots, zero_negative=True))
        print(f"gather_dequant, {name:18s}: {us:7.1f} us  {moved / (us * 1e-6) / bw:6.1%} of HBM", flush=True)
    out = torch.empty(n, d, device="cuda")
    idx = torch.arange(n, device="cuda")
    fill_us = _bench(lambda: out.fill_(1.0))
    print(f"torch fill of the [{n}, {d}] fp32 output: {fill_us:7.1f} us  {out.numel() * 4 / (fill_us * 1e-6) / bw:6.1%}")
    for rows, warps in ((32, 4), (64, 8)):
        for read in (False, True):
            us = _bench(lambda: _store_rows[(triton.cdiv(n, rows),)](out, idx, n, READ_INDEX=read, R=rows, D=d,
                                                                     num_warps=warps))
            nbytes = n * (d * 4 + (8 if read else 0))
            print(f"store-only kernel, {rows} rows / {warps} warps, {'an index read per row' if read else 'no loads':21s}: "
                  f"{us:7.1f} us  {nbytes / (us * 1e-6) / bw:6.1%} of HBM", flush=True)


def decode_sweep(bw, quick):
    ceiling = copy_ceiling()
    n, d = 4_194_304, 128
    k, s = _decode_cache(n, d)
    slots = torch.randperm(n, device="cuda")
    slots[::97] = -1
    grid = [(br, w, t, cs) for br in ((16, 32, 64) if quick else (8, 16, 32, 64, 128)) for w in (2, 4, 8)
            for t in ((1, 4) if quick else (1, 2, 4, 8)) for cs in (False, True)]
    for out_dtype in (torch.float32, torch.bfloat16):
        moved = n * (d + 4 + 8 + d * out_dtype.itemsize)
        ref = gather_dequant_reference(k, s, slots, zero_negative=True, out_dtype=out_dtype)
        results = []
        for block_rows, warps, tiles, cs in grid:
            if block_rows * tiles > 512:
                continue

            def run():
                return gather_dequant_triton(k, s, slots, zero_negative=True, out_dtype=out_dtype,
                                             block_rows=block_rows, num_warps=warps, tiles=tiles, store_cs=cs)
            try:
                assert torch.equal(run(), ref)
                us = _bench(run)
            except Exception as e:  # a config Triton cannot compile: report it and go on
                print(f"{out_dtype} block_rows={block_rows} warps={warps} tiles={tiles} store_cs={cs}: failed: "
                      f"{type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            results.append((us, block_rows, warps, tiles, cs))
            print(f"{out_dtype} block_rows={block_rows:4d} warps={warps} tiles={tiles} store_cs={cs!s:5}: "
                  f"{us:8.1f} us  {moved / (us * 1e-6) / bw:6.1%} of HBM, {moved / (us * 1e-6) / ceiling:6.1%} of the "
                  "measured copy bandwidth", flush=True)
        results.sort()
        print(f"top 5 {out_dtype}:")
        for us, br, w, t, cs in results[:5]:
            print(f"    block_rows={br} warps={w} tiles={t} store_cs={cs}: {us:.1f} us ({moved / (us * 1e-6) / bw:.1%}; "
                  f"{moved / (us * 1e-6) / ceiling:.1%} of copy)")
        dr, dw = default_config(d, out_dtype, "e4m3")
        us = _bench(lambda: gather_dequant_triton(k, s, slots, zero_negative=True, out_dtype=out_dtype))
        print(f"default {out_dtype}: block_rows={dr} warps={dw} tiles=1 store_cs=False: {us:.1f} us "
              f"({moved / (us * 1e-6) / bw:.1%}; {moved / (us * 1e-6) / ceiling:.1%} of copy)", flush=True)


def paged_diagnosis(bw):
    import dsa_inductor
    from dsa_inductor.lowerings import gather_dequant as gd

    case = next(c for c in bg.cases() if "paged" in c.idiom)
    args = case.make_inputs()
    cache, table, positions = args
    b, d = bg.BLOCK, bg.D
    pages = cache.view(cache.shape[0], -1)
    values = pages[:, : b * d].view(-1, b, d)
    scales = pages[:, b * d:].view(torch.float32).unsqueeze(-1)
    page = table[positions // b]
    pos = positions % b
    ref = case.fn(*args)
    print(f"\npaged: {case.shape}; roofline {case.min_bytes / bw * 1e6:.1f} us")

    def direct():
        return gather_dequant_triton(values, scales, page, pos)
    assert torch.equal(direct(), ref)
    print(f"  direct kernel call (indices precomputed): {_bench(direct):7.1f} us   host {_host_us(direct):6.1f} us/call")
    for br in (16, 32, 64, 128):
        for w in (2, 4, 8):
            def run():
                return gather_dequant_triton(values, scales, page, pos, block_rows=br, num_warps=w)
            print(f"    block_rows={br:3d} warps={w}: {_bench(run):7.1f} us")
    torch._inductor.config.force_disable_caches = True
    with torch.no_grad():
        print(f"  eager:                {_bench(lambda: case.fn(*args)):7.1f} us   host {_host_us(lambda: case.fn(*args)):6.1f} us/call")
        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
        stock = torch.compile(case.fn, dynamic=False)
        stock(*args)
        print(f"  stock compile:        {_bench(lambda: stock(*args)):7.1f} us   host {_host_us(lambda: stock(*args)):6.1f} us/call")
        for label, patterns in (("dsa_inductor (all)", None), ("dsa_inductor (gather_dequant only)", ["gather_dequant"])):
            torch._dynamo.reset()
            dsa_inductor.reset_report()
            dsa_inductor.register_dsa_passes(patterns)
            ours = torch.compile(case.fn, dynamic=False)
            out = ours(*args)
            ok = torch.equal(out, ref)
            print(f"  {label + ':':22s}{_bench(lambda: ours(*args)):7.1f} us   host {_host_us(lambda: ours(*args)):6.1f} us/call"
                  f"   equal={ok}")
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    ours(*args)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
        # the generated wrapper of the compiled call: which kernels run, which copies Inductor inserted
        from torch._inductor.utils import run_and_get_code
        dsa_inductor.register_dsa_passes(["gather_dequant"])
        _, code = run_and_get_code(torch.compile(case.fn, dynamic=False), *args)
        src = "\n".join(code)
        i = src.find("def call(")
        print(src[i: i + 4000] if i >= 0 else src[-4000:])
        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
    del gd


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    bw = next((v for key, v in HBM.items() if key in torch.cuda.get_device_name()), 3.35e12)
    if "--ceiling" in sys.argv:
        ceiling(bw)
        return
    if "--paged" not in sys.argv:
        decode_sweep(bw, "--quick" in sys.argv)
    paged_diagnosis(bw)


if __name__ == "__main__":
    main()
