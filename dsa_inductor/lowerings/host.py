"""Host-side helpers shared by the ops' launch code.

At decode sizes the host time of an op call is its latency (the GPU finishes first), so the Python that
runs on every call is kept cheap.  ``torch.broadcast_shapes`` goes through the symbolic-shape-aware
reference implementation (``torch._refs._broadcast_shapes``): 8 us a call on our 2-core CI host, more on
the H100 host, where replacing it cut a compiled windowed softmax's host time per call from 306 to 151 us.
Plain ints need none of that.
"""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: ``triton.cdiv`` in plain Python (Triton 3.9 wraps it as a constexpr function,
    a few us of host time per call, several calls per op launch)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= ``n`` for n >= 1, and 0 for 0: ``triton.next_power_of_2`` in plain Python."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def broadcast_shapes(*shapes) -> tuple:
    """``torch.broadcast_shapes`` for shapes of plain ints (the real call); symbolic shapes (fake
    tensors while tracing) go to torch.  Raises RuntimeError, as torch does, when they do not broadcast."""
    if not all(type(d) is int for s in shapes for d in s):
        return tuple(torch.broadcast_shapes(*shapes))
    out = [1] * max((len(s) for s in shapes), default=0)
    for s in shapes:
        off = len(out) - len(s)
        for i, d in enumerate(s):
            o = out[off + i]
            if d != o:
                if o == 1:
                    out[off + i] = d
                elif d != 1:
                    raise RuntimeError(f"shape mismatch: objects cannot be broadcast to a single shape: {shapes}")
    return tuple(out)


_MISS = object()
_BY_METADATA: dict = {}


def by_metadata(fn, *args):
    """``fn(*args)``, computed once per argument metadata and then remembered: the key holds, per argument, a
    tensor's type, shape, dtype and device, and anything else's type and value.  For the argument checks and launch
    arithmetic of an op's CUDA path, which read nothing else (never a tensor's values, strides or data pointer):
    a key seen before has passed the checks, and the result is the same.  On the H100 host the checks of a decode
    call cost more than a kernel launch.  An unhashable argument (a symbolic size while tracing) runs ``fn`` every
    time; so does a NaN (never equal to itself).  ``fn`` raising leaves nothing remembered."""
    try:
        key = (fn, *[(type(a), a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a)
                     for a in args])
        hit = _BY_METADATA.get(key, _MISS)
    except TypeError:
        return fn(*args)
    if hit is _MISS:
        hit = fn(*args)
        if len(_BY_METADATA) >= 4096:
            _BY_METADATA.clear()
        _BY_METADATA[key] = hit
    return hit


def refuse_miscompiled_tile(op: str, block_m: int, block_n: int, num_warps: int) -> None:
    """Raise ValueError naming ``block_m`` / ``block_n`` / ``num_warps`` for a tile that Triton 3.6 miscompiles on
    Hopper: ``block_m`` >= 64 query rows x ``block_n`` >= 64 keys with 4 warps, in the flash-style kernels that
    split Dqk into a power of two plus a rest (``windowed_attention``, ``sparse_attention``'s masked flash path).

    Found by the GPU property tests and sweeps on an H200 (torch 2.11, Triton 3.6):

    * windowed_attention (session 10): 64 x 64 gave the same wrong value on every run at D = 33, Dv = 2, fp16
      (0.1998 for eager's 0.1581; right at D = 128), 128 x 64 an illegal memory access; every other tile of
      {32, 64, 128} x {16, 32, 64} x {4, 8} warps x {1, 2, 3} stages was right on that input;
    * the masked flash kernel (session 11, ``.dev`` sweep at D in {17, 33, 40, 65, 100}, Dv in {2, 24, 128}):
      64 x 64 and 64 x 128 wrong at 7 of 15 head-dim pairs, 128 x 64 and 64 x 128 illegal accesses at 5; the
      same tiles with 8 warps, 64 x 32 with 4 warps and the defaults were right at all of them.

    Racecheck of the failing cases reports no hazard and the interpreter gives eager's value (session 7's failure
    at D = 40 was memcheck- and racecheck-clean too): a compiler fault, not a race in our code.  Refused rather
    than guessed around: a wrong result here would be silent.  The interpreter (``TRITON_INTERPRET=1``) runs any
    tile; callers skip this check there."""
    if block_m >= 64 and block_n >= 64 and num_warps == 4:
        raise ValueError(f"{op}: `block_m` / `block_n` / `num_warps`: a {block_m} x {block_n} tile with 4 warps is "
                         "miscompiled by Triton 3.6 on Hopper (wrong values or illegal accesses at some head dims); "
                         "use 8 warps or block_n <= 32")
