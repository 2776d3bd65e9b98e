"""Host cost of one Triton launch on this machine: JIT launch (binder + specialization + cache lookup) vs
the compiled kernel's runner vs the bare C launcher.  python bench/launch_cost.py"""
import time
import torch
import triton
import triton.language as tl
from triton.runtime import driver

from host_overhead import host_us as us  # (bench/ is the script's directory)


@triton.jit
def _k(a, b, c, d, e, f, g, h, n0, n1, n2, n3, n4, n5, n6, n7, s0, s1, s2, s3, s4, s5, s6, s7,
       B: tl.constexpr, C: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    x = tl.load(a + i, mask=i < n0, other=0.0)
    tl.store(b + i, x * 2, mask=i < n0)


x = torch.randn(4096, device="cuda")
y = torch.empty_like(x)
ts = [torch.empty(16, device="cuda") for _ in range(6)]
ints = [4096, 33, 7, 123456, 1, 16, 8, 99] + [1, 128, 4096, 3, 5, 64, 1, 2]
args = [x, y] + ts + ints
grid = (4, 1, 1)
ck = _k[grid](*args, B=1024, C=3)
print("torch.empty", round(us(lambda: torch.empty(16, device="cuda")), 2))
print("x.add_(0)", round(us(lambda: x.add_(0)), 2))
print("jit launch", round(us(lambda: _k[grid](*args, B=1024, C=3)), 2))
run = ck[grid]
print("CompiledKernel runner", round(us(lambda: run(*args, 1024, 3)), 2))
dev = driver.active.get_current_device()
stream = driver.active.get_current_stream(dev)
fn, pm = ck.function, ck.packed_metadata
md = ck.launch_metadata(grid, stream, *args, 1024, 3)
print("bare ck.run", round(us(lambda: ck.run(4, 1, 1, stream, fn, pm, md, None, None, *args, 1024, 3)), 2))
print("get stream", round(us(lambda: driver.active.get_current_stream(driver.active.get_current_device())), 2))
torch.cuda.synchronize()
assert torch.equal(y, x * 2)

