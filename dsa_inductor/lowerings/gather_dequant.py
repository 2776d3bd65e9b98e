"""``dsa_inductor::gather_dequant``: gather quantized K-cache rows by slot / page and dequantize, in one pass.

Idiom (DeepSeek-V3.2 indexer FP8 K cache; vLLM ``indexer_k_quant_and_cache`` writes it and
``cp_gather_indexer_k_quant_cache`` reads it back; DeepSeek-V4's indexer keeps its cache as MXFP4)::

    idx = slot_mapping.clamp(min=0)
    k = k_cache[idx].view(torch.float8_e4m3fn).float() * k_scale[idx].unsqueeze(-1)   # or [page, pos]
    k = torch.where((slot_mapping < 0).unsqueeze(-1), 0.0, k)                        # padding slots -> 0

Semantics (``gather_dequant_reference`` is the definition)::

    q   = values[index0]            or values[index0, index1]      (eager indexing, negative indices wrap)
    x   = decode(q, fmt)            fp32, [..., D]
    x   = x * decode(scales[same indices]) broadcast over groups of D // G elements
    x   = where(drop[..., None] | (zero_negative & (index0 < 0)), 0, x)
    out = x.to(out_dtype)

Storage formats (``fmt``):

* ``"e4m3"``: one byte per element, FP8 e4m3fn (``float8_e4m3fn``; 0x7F/0xFF are NaN).  ``values`` is
  uint8 (the cache as serving stacks allocate it) or float8_e4m3fn; ``Dq = D``.
* ``"e2m1"``: MXFP4 (OCP MX): two FP4 e2m1 elements per byte, element ``2j`` in the low nibble of byte
  ``j``; values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives.  ``values`` is uint8, ``Dq = D / 2``.

Scales (``scales``, optional; ``G`` scales per token, each covering ``D / G`` consecutive elements):

* float32 / bfloat16 / float16: multiplied as fp32 (the per-token fp32 scale of the V3.2 indexer cache
  is ``G = 1``; per-128-element block scales are ``G = D / 128``);
* uint8 or float8_e8m0fnu: UE8M0, the scale is ``2 ** (byte - 127)`` (0xFF is NaN), as MXFP4's
  32-element block scales and ``scale_fmt="ue8m0"`` caches store it.

Layouts and addressing.  ``values`` is ``[P, Dq]`` (one row per slot) or ``[P, B, Dq]`` (pages of
``B`` tokens), any strides, so the vLLM / DeepSeek-V3.2 inline page layout, where each page holds
``B x D`` FP8 bytes followed by ``B`` fp32 scales, is two strided views of one uint8 buffer::

    pages  = kv_cache.view(num_pages, -1)                                  # uint8 [P, B * (D + 4)]
    values = pages[:, : B * D].view(num_pages, B, D)                       # [P, B, D], strides (B*(D+4), D, 1)
    scales = pages[:, B * D :].view(torch.float32)                         # [P, B]

With ``scale_bytes=True`` the op takes those scale bytes themselves, uint8 ``[P, B, 4]``, and views them as
float32 (no copy; the rule passes them so, since Inductor copies a strided byte table to take the view).
``scales`` has the rank of ``values`` with ``G`` last, e.g. ``[P, B, 1]``; it is indexed like ``values``
(its indexed dims have their own sizes, as in eager), and a non-indexed page dim may be 1 (broadcast).
Indices (int32 / int64, any shape, broadcast together):

* ``index1`` given: token ``t`` reads ``values[index0[t], index1[t]]`` (page, position);
* ``block_size > 0``: ``index0`` holds slots, ``slot = page * block_size + pos``, read as
  ``values[slot // block_size, slot % block_size]`` (``block_size`` must equal ``B``);
* otherwise ``values[index0[t]]``, i.e. a slot of a ``[P, Dq]`` cache or a whole page of a
  ``[P, B, Dq]`` cache (output ``[..., B, D]``).

Result: ``out_dtype`` (float32, bfloat16 or float16) of shape ``index shape (+ [B]) + [D]``: the fp32
product ``decode(q) * decode(scale)`` rounded once to ``out_dtype``.

Invalid and out-of-range indices.  ``drop`` (bool, index shape) and, with ``zero_negative``, negative
``index0`` (a padding slot, -1 in vLLM's ``slot_mapping``) give zeros and are never read.  Other
negative indices wrap once, as eager indexing does.  An index still outside the cache raises
``IndexError`` on the CPU path, as eager does; the CUDA kernel cannot raise without a host sync, so
there such a token is never read and gives zeros (eager would hit a device-side assert).
``register_dsa_passes(verify=True)`` raises on it instead.

CUDA path: ``_gather_dequant_kernel``, one Triton program per ``BLOCK_R`` output rows of ``D``
elements, loading each row's bytes with 16-byte vector loads (row bases are multiples of 16 when the
strides are), converting in registers and writing the result once; offsets are int64.  Host-side hints
(``EVEN_D``: no column mask; ``VEC_V`` / ``VEC_O``: row offsets' power-of-two divisors) make the vector
width independent of argument specialization; ``tiles`` / ``store_cs`` are tuning knobs.
CPU path: plain torch (the reference); the compiled graph calls the op as an extern kernel, so these
torch ops run eagerly inside it (Inductor does not trace into the op).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .host import broadcast_shapes, by_metadata, cdiv, next_pow2
from .registry import fused_op

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::gather_dequant"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against eager
FORMATS = ("e4m3", "e2m1")
_FLOAT_SCALES = (torch.float32, torch.bfloat16, torch.float16)
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_UE8M0_SCALES = (torch.uint8,) + ((_E8M0,) if _E8M0 is not None else ())
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _name(arg: str) -> str:
    return f"gather_dequant: `{arg}`"


def _check_args(values, scales, index0, index1, block_size, drop, fmt, out_dtype):
    """Raise TypeError / ValueError naming the offending argument."""
    if fmt not in FORMATS:
        raise ValueError(f"{_name('fmt')} must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(values, torch.Tensor) or values.dim() not in (2, 3):
        raise ValueError(f"{_name('values')} must be a 2-d [P, Dq] or 3-d [P, B, Dq] tensor")
    ok = (torch.uint8, torch.float8_e4m3fn) if fmt == "e4m3" else (torch.uint8,)
    if values.dtype not in ok:
        raise TypeError(f"{_name('values')} must be {' or '.join(map(str, ok))} for fmt={fmt!r}, got {values.dtype}")
    dev = values.device
    for name, t in (("index0", index0), ("index1", index1)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_name(name)} must be an int32 or int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != dev:
            raise ValueError(f"{_name(name)} is on {t.device}, `values` on {dev}")
    if index0 is None:
        raise ValueError(f"{_name('index0')} is required")
    if block_size < 0:
        raise ValueError(f"{_name('block_size')} must be >= 0, got {block_size}")
    if index1 is not None or block_size > 0:
        if values.dim() != 3:
            raise ValueError(f"{_name('values')} must be 3-d [P, B, Dq] with (page, position) addressing")
        if index1 is not None and block_size > 0:
            raise ValueError(f"{_name('block_size')} must be 0 when `index1` is given")
        if block_size > 0:
            torch._check_value(values.shape[1] == block_size,
                               lambda: f"{_name('block_size')} ({block_size}) != values.shape[1] ({values.shape[1]})")
    if drop is not None:
        if not isinstance(drop, torch.Tensor) or drop.dtype != torch.bool:
            raise TypeError(f"{_name('drop')} must be a bool tensor, got {getattr(drop, 'dtype', type(drop).__name__)}")
        if drop.device != dev:
            raise ValueError(f"{_name('drop')} is on {drop.device}, `values` on {dev}")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dtype not in _FLOAT_SCALES + _UE8M0_SCALES:
            raise TypeError(f"{_name('scales')} must be float32/bfloat16/float16 or uint8/float8_e8m0fnu (UE8M0), "
                            f"got {getattr(scales, 'dtype', type(scales).__name__)}")
        if scales.device != dev:
            raise ValueError(f"{_name('scales')} is on {scales.device}, `values` on {dev}")
        if scales.dim() != values.dim():
            raise ValueError(f"{_name('scales')} must have the rank of `values` ({values.dim()}) with the "
                             f"scale groups last, got shape {tuple(scales.shape)}")
        # The indexed dims are indexed in `scales` as in `values` (each wraps and is bounded by its own size);
        # a page's middle dim, when whole pages are gathered, must match or broadcast (size 1).
        if values.dim() == 3 and index1 is None and block_size == 0:
            sb, vb = scales.shape[1], values.shape[1]
            if isinstance(sb, int) and isinstance(vb, int) and sb not in (vb, 1):
                raise ValueError(f"{_name('scales')} dim 1 ({sb}) must be 1 or the page size of `values` ({vb})")
        d = _elements(values, fmt)
        g = scales.shape[-1]
        torch._check_value(g >= 1 and d % g == 0,
                           lambda: f"{_name('scales')}: {g} scale groups do not divide D = {d}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{_name('out_dtype')} must be float32, bfloat16 or float16, got {out_dtype}")
    shape = tuple(index0.shape)
    for name, t in (("index1", index1), ("drop", drop)):
        if t is None:
            continue
        try:
            shape = tuple(broadcast_shapes(shape, tuple(t.shape)))
        except RuntimeError:
            raise ValueError(f"{_name(name)} has shape {tuple(t.shape)}, which does not broadcast with the tokens "
                             f"{shape} of `index0`") from None


def _elements(values, fmt):
    return values.shape[-1] * (2 if fmt == "e2m1" else 1)


def _token_shape(values, index0, index1, drop):
    shapes = [index0.shape] + [t.shape for t in (index1, drop) if t is not None]
    return broadcast_shapes(*shapes)


def _out_shape(values, index0, index1, block_size, drop, fmt):
    tok = _token_shape(values, index0, index1, drop)
    middle = tuple(values.shape[1:-1]) if (index1 is None and block_size == 0) else ()
    return (*tok, *middle, _elements(values, fmt))


# ---- plain torch: the definition, the CPU path and the oracle of every test ---------------------------------

def decode_e4m3(q: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3fn bytes (uint8) or float8_e4m3fn -> float32."""
    if q.dtype == torch.uint8:
        q = q.view(torch.float8_e4m3fn)
    return q.float()


def decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Packed MXFP4 bytes [..., Dq] -> float32 [..., 2 * Dq]; element 2j is the low nibble of byte j."""
    def nib(n):
        n = n.to(torch.int32)
        e = (n >> 1) & 3
        m = (n & 1).float()
        pow2 = torch.where(e == 3, 4.0, torch.where(e == 2, 2.0, 1.0))
        mag = torch.where(e == 0, 0.5 * m, pow2 * (1.0 + 0.5 * m))
        return torch.where((n & 8) != 0, -mag, mag)

    lo, hi = nib(packed & 15), nib(packed >> 4)
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def decode_ue8m0(e: torch.Tensor) -> torch.Tensor:
    """UE8M0 exponent bytes -> float32 ``2 ** (e - 127)`` (0 -> 2**-127, 0xFF -> NaN), as float8_e8m0fnu."""
    if e.dtype != torch.uint8:
        e = e.view(torch.uint8)
    e = e.to(torch.int32)
    bits = torch.where(e == 0, 0x00400000, torch.where(e == 255, 0x7FC00000, e << 23))
    return bits.view(torch.float32)


def decode_scales(scales: torch.Tensor) -> torch.Tensor:
    return decode_ue8m0(scales) if scales.dtype in _UE8M0_SCALES else scales.float()


def _wrap(i, n):
    return torch.where(i < 0, i + n, i)


def gather_dequant_reference(values, scales, index0, index1=None, block_size=0, drop=None, zero_negative=False,
                             fmt="e4m3", out_dtype=torch.float32):
    """Plain-torch definition of the op (see the module docstring); raises IndexError like eager indexing."""
    tok = _token_shape(values, index0, index1, drop)
    i0 = index0.expand(tok)
    neg = (i0 < 0) if zero_negative else None
    if neg is not None:
        i0 = torch.where(neg, 0, i0)
    if block_size > 0:
        i0, i1 = torch.div(i0, block_size, rounding_mode="floor"), torch.remainder(i0, block_size)
    else:
        i1 = None if index1 is None else index1.expand(tok)
    idx = (i0,) if i1 is None else (i0, i1)
    x = decode_e4m3(values[idx]) if fmt == "e4m3" else decode_e2m1(values[idx])
    if scales is not None:
        d, g = x.shape[-1], scales.shape[-1]
        if values.dim() == 3 and len(idx) == 1:
            scales = scales.expand(scales.shape[0], values.shape[1], g)  # the page's middle dim broadcasts
        s = decode_scales(scales[idx])
        x = (x.unflatten(-1, (g, d // g)) * s.unsqueeze(-1)).flatten(-2)
    zero = drop.expand(tok) if drop is not None else None
    if neg is not None:
        zero = neg if zero is None else zero | neg
    if zero is not None:
        zero = zero.reshape(*tok, *([1] * (x.dim() - len(tok))))
        x = torch.where(zero, 0.0, x)
    return x.to(out_dtype)


# ---- helpers for tests and benchmarks: the write side of the cache --------------------------------------------

def quantize_e4m3(x: torch.Tensor, group: Optional[int] = None, ue8m0: bool = False):
    """``x [..., D]`` -> (uint8 FP8 bytes [..., D], scales [..., D // group]): amax / 448 per group, rounded
    up to a power of two with ``ue8m0`` (vLLM ``indexer_k_quant_and_cache``, DeepSeek's ``act_quant``).
    Scales are fp32, or UE8M0 bytes when ``ue8m0``."""
    d = x.shape[-1]
    group = d if group is None else group
    xg = x.float().unflatten(-1, (d // group, group))
    s = (xg.abs().amax(-1) / 448.0).clamp(min=1e-10)
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xg / s.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).flatten(-2)
    if ue8m0:
        s = (torch.log2(s).round().to(torch.int32) + 127).clamp(0, 254).to(torch.uint8)
    return q.view(torch.uint8), s


_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def quantize_mxfp4(x: torch.Tensor, group: int = 32):
    """``x [..., D]`` -> (packed e2m1 bytes [..., D // 2], UE8M0 bytes [..., D // group]) (OCP MX: scale
    ``2 ** (floor(log2(amax)) - 2)``, elements rounded to the nearest e2m1 value, saturating at 6)."""
    d = x.shape[-1]
    xg = x.float().unflatten(-1, (d // group, group))
    amax = xg.abs().amax(-1).clamp(min=2.0 ** -120)
    e = torch.floor(torch.log2(amax)) - 2
    y = (xg / torch.exp2(e).unsqueeze(-1)).flatten(-2)
    grid = torch.tensor(_E2M1_GRID, device=x.device)
    code = (y.abs().unsqueeze(-1) - grid).abs().argmin(-1).to(torch.uint8) | ((y < 0).to(torch.uint8) << 3)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, (e.to(torch.int32) + 127).clamp(0, 254).to(torch.uint8)


# ---- Triton ------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _e4m3_to_f32(b):
        """uint8 bytes -> fp32 (hardware conversion on sm89+); 0x7F / 0xFF are NaN in e4m3fn."""
        v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return tl.where((b & 0x7F) == 0x7F, float("nan"), v)

    @triton.jit
    def _e2m1_to_f32(n):
        """Nibbles (0..15, uint8) -> fp32 e2m1 values."""
        e = (n >> 1) & 3
        m = (n & 1).to(tl.float32)
        pow2 = tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0))
        mag = tl.where(e == 0, 0.5 * m, pow2 * (1.0 + 0.5 * m))
        return tl.where((n & 8) != 0, -mag, mag)

    @triton.jit
    def _ue8m0_to_f32(e):
        e = e.to(tl.int32)
        bits = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_bf16(x):
        """fp32 -> the nearest bf16 value (ties to even), still as fp32, so the final cast is exact.  The GPU
        cast rounds this way by itself; Triton's interpreter truncates, and both must equal torch."""
        b = x.to(tl.uint32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)

    @triton.jit(do_not_specialize=["n_rows", "P", "SP"])
    def _gather_dequant_kernel(
        v_ptr, vs0, vs1, vs2,  # values [P, B, Dq] (bytes)
        s_ptr, ss0, ss1, ss2,  # scales broadcast to [P, B, G]
        i0_ptr, i1_ptr, drop_ptr, out_ptr,
        n_rows, R, P, B, SP, SB, D, GROUP,  # SP, SB: the scale table's dims 0 and 1
        MODE: tl.constexpr,  # 0: values[i0] (+ row r % R of dim 1), 1: values[i0, i1], 2: slots, B per page
        FMT: tl.constexpr,  # 0: e4m3, 1: e2m1 (packed pairs)
        SCALE: tl.constexpr,  # 0: none, 1: float, 2: UE8M0 bytes
        ONE_GROUP: tl.constexpr,
        HAS_DROP: tl.constexpr, ZERO_NEG: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, OUT_DTYPE: tl.constexpr,
        EVEN_D: tl.constexpr = False,  # D == BLOCK_D: no column mask (full-width vector loads and stores)
        VEC_V: tl.constexpr = 0,  # >= 1: unit inner stride and row byte offsets multiples of VEC_V; 0: strided
        VEC_O: tl.constexpr = 1,  # the output's row offsets (elements) are multiples of this (a hint)
        TILES: tl.constexpr = 1,  # tiles of BLOCK_R rows per program, one after the other
        STORE_CS: tl.constexpr = False,  # streaming stores (.cs): the output is not re-read from L2
    ):
        """Rows ``[(pid * TILES + t) * BLOCK_R, +BLOCK_R)``, t < TILES, of the ``[n_rows, D]`` output."""
        for t in tl.static_range(TILES):
            rows = (tl.program_id(0).to(tl.int64) * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
            _gather_dequant_tile(
                rows, v_ptr, vs0, vs1, vs2, s_ptr, ss0, ss1, ss2, i0_ptr, i1_ptr, drop_ptr, out_ptr,
                n_rows, R, P, B, SP, SB, D, GROUP, MODE, FMT, SCALE, ONE_GROUP, HAS_DROP, ZERO_NEG,
                BLOCK_R, BLOCK_D, OUT_DTYPE, EVEN_D, VEC_V, VEC_O, STORE_CS)

    @triton.jit
    def _gather_dequant_tile(
        rows, v_ptr, vs0, vs1, vs2, s_ptr, ss0, ss1, ss2, i0_ptr, i1_ptr, drop_ptr, out_ptr,
        n_rows, R, P, B, SP, SB, D, GROUP,
        MODE: tl.constexpr, FMT: tl.constexpr, SCALE: tl.constexpr, ONE_GROUP: tl.constexpr,
        HAS_DROP: tl.constexpr, ZERO_NEG: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, OUT_DTYPE: tl.constexpr,
        EVEN_D: tl.constexpr, VEC_V: tl.constexpr, VEC_O: tl.constexpr, STORE_CS: tl.constexpr,
    ):
        live = rows < n_rows
        if MODE == 0:
            tok = rows // R
            pos = rows % R
        else:
            tok = rows
        raw = tl.load(i0_ptr + tok, mask=live, other=0, eviction_policy="evict_first").to(tl.int64)
        ok = live
        if ZERO_NEG:
            ok = ok & (raw >= 0)
        if HAS_DROP:
            ok = ok & (tl.load(drop_ptr + tok, mask=live, other=1, eviction_policy="evict_first") == 0)
        if MODE == 2:
            page = raw // B  # floor division whichever way `//` rounds
            pos = raw - page * B
            page = tl.where(pos < 0, page - 1, page)
            pos = tl.where(pos < 0, pos + B, pos)
        else:
            page = raw
        if MODE == 1:
            pos = tl.load(i1_ptr + tok, mask=live, other=0, eviction_policy="evict_first").to(tl.int64)
        # eager indexes `values` and `scales` separately: each wraps negative indices by its own size
        vpage = tl.where(page < 0, page + P, page)
        ok = ok & (vpage >= 0) & (vpage < P)
        vpos = pos
        spos = pos
        if MODE != 0:
            vpos = tl.where(pos < 0, pos + B, pos)
            ok = ok & (vpos >= 0) & (vpos < B)
        if SCALE != 0:
            spage = tl.where(page < 0, page + SP, page)
            ok = ok & (spage >= 0) & (spage < SP)
            if MODE != 0:
                spos = tl.where(pos < 0, pos + SB, pos)
                ok = ok & (spos >= 0) & (spos < SB)
            srow = spage * ss0 + spos * ss1
        vrow = vpage * vs0 + vpos * vs1  # int64 byte offsets of the rows
        if VEC_V > 1:
            vrow = tl.multiple_of(vrow, VEC_V)
        cols = tl.arange(0, BLOCK_D)
        if EVEN_D:
            cmask = cols < BLOCK_D  # all true, known at compile time: the row mask alone
        else:
            cmask = cols < D
        if FMT == 0:
            # no `other`: lanes not loaded are zeroed below (and an fp8 pointer takes no int fill)
            vcol = cols if VEC_V >= 1 else cols * vs2
            b = tl.load(v_ptr + vrow[:, None] + vcol[None, :], mask=ok[:, None] & cmask[None, :],
                        eviction_policy="evict_first")
            x = _e4m3_to_f32(b.to(tl.uint8, bitcast=True))
        else:
            half = tl.arange(0, BLOCK_D // 2)
            hmask = (half < BLOCK_D // 2) if EVEN_D else (half < D // 2)
            vcol = half if VEC_V >= 1 else half * vs2
            b = tl.load(v_ptr + vrow[:, None] + vcol[None, :], mask=ok[:, None] & hmask[None, :],
                        eviction_policy="evict_first").to(tl.uint8, bitcast=True)
            x = tl.join(_e2m1_to_f32(b & 15), _e2m1_to_f32(b >> 4)).reshape(BLOCK_R, BLOCK_D)
        if SCALE != 0:
            if ONE_GROUP:
                s = tl.load(s_ptr + srow, mask=ok, other=0, eviction_policy="evict_first")
                s = _ue8m0_to_f32(s) if SCALE == 2 else s.to(tl.float32)
                x = x * s[:, None]
            else:
                grp = cols // GROUP
                s = tl.load(s_ptr + srow[:, None] + grp[None, :] * ss2, mask=ok[:, None] & cmask[None, :], other=0,
                            eviction_policy="evict_first")
                s = _ue8m0_to_f32(s) if SCALE == 2 else s.to(tl.float32)
                x = x * s
        x = tl.where(ok[:, None], x, 0.0)
        if OUT_DTYPE == tl.bfloat16:
            x = _round_to_bf16(x)
        orow = rows * D
        if VEC_O > 1:
            orow = tl.multiple_of(orow, VEC_O)
        optr = out_ptr + orow[:, None] + cols[None, :]
        omask = live[:, None] & cmask[None, :]
        if STORE_CS:
            tl.store(optr, x.to(OUT_DTYPE), mask=omask, cache_modifier=".cs")
        else:
            tl.store(optr, x.to(OUT_DTYPE), mask=omask)


_TL_OUT = {}
if triton is not None:
    _TL_OUT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _flat(t, tok):
    """``t`` broadcast to the token shape, as a flat contiguous vector (no copy when it already is one)."""
    return t.expand(tok).reshape(-1)


def default_config(d: int, out_dtype: torch.dtype, fmt: str):
    """(BLOCK_R, num_warps): about 16 KB of output per program, 4 warps (enough bytes in flight per SM to
    stream HBM at D = 128; see bench/tune_gather_dequant.py)."""
    out_bytes = d * out_dtype.itemsize
    block_r = max(1, min(128, next_pow2(max(1, 16384 // out_bytes))))
    return block_r, 4


def _static_multiple(x, m: int) -> bool:
    """``x % m == 0`` for a plain int; False (no hint, no guard) for a symbolic size or stride."""
    return isinstance(x, int) and x % m == 0


def _vec_hint(strides, m_max: int) -> int:
    """The largest power of two <= m_max dividing every stride (row offsets are then its multiples)."""
    m = m_max
    while m > 1 and not all(_static_multiple(x, m) for x in strides):
        m //= 2
    return m


def _launch_plan(values, scales, index0, index1, block_size, drop, fmt, out_dtype, block_rows, tiles):
    """What the arguments' metadata decides of a launch (the checks first): ``(tok, out_shape, mode, r, n_rows,
    d, g, scale_kind, block_r, warps, block_d, vec_o, grid, tiles)``.  Computed once per metadata
    (``host.by_metadata``); nothing here reads a stride, a data pointer or a value."""
    _check_args(values, scales, index0, index1, block_size, drop, fmt, out_dtype)
    d = _elements(values, fmt)
    tok = _token_shape(values, index0, index1, drop)
    b = values.shape[1] if values.dim() == 3 else 1
    if index1 is not None:
        mode, r = 1, 1
    elif block_size > 0:
        mode, r = 2, 1
    else:
        mode, r = 0, (b if values.dim() == 3 else 1)
    n_rows = math.prod(tok) * r
    if scales is not None:
        g = scales.shape[-1]
        scale_kind = 2 if scales.dtype in _UE8M0_SCALES else 1
    else:
        g, scale_kind = 1, 0
    block_r, warps = default_config(d, out_dtype, fmt)
    block_r = block_rows or block_r
    tiles = max(1, int(tiles))
    return (tok, _out_shape(values, index0, index1, block_size, drop, fmt), mode, r, n_rows, d, g, scale_kind,
            block_r, warps, max(16, next_pow2(d)), _vec_hint((d,), 16), (cdiv(n_rows, block_r * tiles),), tiles)


def gather_dequant_triton(values, scales, index0, index1=None, block_size=0, drop=None, zero_negative=False,
                          fmt="e4m3", out_dtype=torch.float32, block_rows=None, num_warps=None,
                          tiles=1, store_cs=False):
    """Run the Triton kernel (the op's CUDA path; tests and tuning call it directly).

    ``block_rows``, ``num_warps``, ``tiles`` (tiles of ``block_rows`` rows per program) and ``store_cs``
    (streaming stores) are tuning knobs (bench/tune_gather_dequant.py); they never change the result."""
    if triton is None:
        raise RuntimeError("gather_dequant: triton is not installed")
    (tok, out_shape, mode, r, n_rows, d, g, scale_kind, block_r, warps, block_d, vec_o, grid,
     tiles) = by_metadata(_launch_plan, values, scales, index0, index1, block_size, drop, fmt, out_dtype, block_rows,
                          tiles)
    out = values.new_empty(out_shape, dtype=out_dtype)
    if out.numel() == 0:
        return out
    v3 = values if values.dim() == 3 else values.unsqueeze(1)
    p, b = v3.shape[0], v3.shape[1]
    i0 = _flat(index0, tok)
    i1 = _flat(index1, tok) if index1 is not None else i0
    dr = _flat(drop, tok) if drop is not None else i0
    if scales is not None:
        s3 = scales if scales.dim() == 3 else scales.unsqueeze(1)
        if mode == 0:
            s3 = s3.expand(s3.shape[0], b, s3.shape[-1])  # the page's middle dim broadcasts
        if _E8M0 is not None and s3.dtype == _E8M0:
            s3 = s3.view(torch.uint8)
    else:
        s3 = v3
    sp, sb = s3.shape[0], s3.shape[1]
    vs = v3.stride()
    # unit inner stride: contiguous row bytes; the row offsets' largest power-of-two divisor (<= 16) lets the
    # loads be 16-byte vectors without relying on argument specialization (under Inductor too)
    vec_v = _vec_hint((vs[0], vs[1]), 16) if _static_multiple(vs[2], 1) and vs[2] == 1 else 0
    _gather_dequant_kernel[grid](
        v3, *vs, s3, *s3.stride(), i0, i1, dr, out,
        n_rows, r, p, b, sp, sb, d, d // g,
        MODE=mode, FMT=FORMATS.index(fmt), SCALE=scale_kind, ONE_GROUP=g == 1,
        HAS_DROP=drop is not None, ZERO_NEG=bool(zero_negative),
        BLOCK_R=block_r, BLOCK_D=block_d, OUT_DTYPE=_TL_OUT[out_dtype],
        EVEN_D=_static_multiple(d, block_d), VEC_V=vec_v, VEC_O=vec_o, TILES=tiles, STORE_CS=bool(store_cs),
        num_warps=num_warps or warps,
    )
    return out


def out_of_range(values, index0, index1=None, block_size=0, drop=None, zero_negative=False, scales=None) -> bool:
    """Does an index fall outside the cache or the scale table where eager raises (dropped tokens included)?"""
    tok = _token_shape(values, index0, index1, drop)
    i0 = index0.expand(tok)
    if zero_negative:
        i0 = torch.where(i0 < 0, 0, i0)  # replaced by index 0 before the gather, as eager's clamp does
    if block_size > 0:
        pages, pos = torch.div(i0, block_size, rounding_mode="floor"), torch.remainder(i0, block_size)
    else:
        pages, pos = i0, (index1.expand(tok) if index1 is not None else None)
    bad = torch.zeros(tok, dtype=torch.bool, device=values.device)
    for table in (values, scales):
        if table is None:
            continue
        wrapped = _wrap(pages, table.shape[0])
        bad = bad | (wrapped < 0) | (wrapped >= table.shape[0])
        if pos is not None:
            wp = _wrap(pos, table.shape[1])
            bad = bad | (wp < 0) | (wp >= table.shape[1])
    return bool(bad.any())


def _verify(out, values, scales, index0, index1, block_size, drop, zero_negative, fmt, out_dtype):
    if out_of_range(values, index0, index1, block_size, drop, zero_negative, scales):
        raise AssertionError("dsa_inductor verify: rule gather_dequant (dsa_inductor::gather_dequant): an index "
                             "is out of range of the cache (eager raises IndexError / a device-side assert)")
    ref = gather_dequant_reference(values, scales, index0, index1, block_size, drop, zero_negative, fmt, out_dtype)
    diff = ~((ref == out) | (ref.isnan() & out.isnan()))
    if diff.any():
        first = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(f"dsa_inductor verify: rule gather_dequant ({OP_NAME}) differs from eager at {first}: "
                             f"{out[first].item()} != {ref[first].item()}")


def scales_from_bytes(scales, scale_bytes: bool, name: str = "gather_dequant: `scales`"):
    """The scales an op reads: with ``scale_bytes``, the fp32 view of uint8 ``scales`` (a view, never a copy).
    Raises ValueError naming the argument (``name``) when they are not uint8 bytes with such a view (4-aligned
    offset and strides, last dim contiguous and a multiple of 4)."""
    if not scale_bytes:
        return scales
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8:
        raise ValueError(f"{name} must be a uint8 tensor of fp32 bytes here, got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)}")
    try:
        return scales.view(torch.float32)
    except RuntimeError as e:
        raise ValueError(f"{name}: its bytes have no float32 view ({e})") from None


@fused_op(OP_NAME)
def gather_dequant(
    values: torch.Tensor,
    scales: Optional[torch.Tensor],
    index0: torch.Tensor,
    index1: Optional[torch.Tensor],
    block_size: int,
    drop: Optional[torch.Tensor],
    zero_negative: bool,
    fmt: str,
    out_dtype: torch.dtype,
    scale_bytes: bool = False,
) -> torch.Tensor:
    """Fused gather + dequantize of a quantized (paged) K cache.

    Args:
        values: uint8 (or float8_e4m3fn) ``[P, Dq]`` or ``[P, B, Dq]`` cache, any strides.
        scales: None, or ``[Ps, (Bs,) G]`` indexed like ``values`` (``Bs`` may be 1 when whole pages are
            gathered): fp32/bf16/fp16, or UE8M0 uint8 / float8_e8m0fnu; ``G`` divides ``D``.
        index0: int32/int64 slots (``block_size > 0``), pages (with ``index1``) or rows (neither).
        index1: optional int32/int64 positions within the page.
        block_size: tokens per page for slot addressing (must equal ``B``), or 0.
        drop: optional bool, True gives a zero row (broadcast with the indices).
        zero_negative: negative ``index0`` gives a zero row and is not read.
        fmt: ``"e4m3"`` (FP8) or ``"e2m1"`` (packed MXFP4).
        out_dtype: float32, bfloat16 or float16.
        scale_bytes: ``scales`` is uint8 ``[Ps, (Bs,) 4 G]``, the bytes of fp32 scales: the op reads
            ``scales.view(torch.float32)`` (no copy; the inline page layout's scale bytes, strided inside the
            cache, which Inductor would copy whole to take that view in the graph).

    Returns:
        ``[*index shape, (B,) D]`` in ``out_dtype``.

    Raises:
        TypeError / ValueError naming the argument (dtype, rank, device, block size, scale groups);
        IndexError on the CPU path for an index outside the cache (as eager).
    """
    scales = scales_from_bytes(scales, scale_bytes)
    if values.device.type != "cuda":  # (on CUDA, the *_triton function checks them)
        _check_args(values, scales, index0, index1, block_size, drop, fmt, out_dtype)
        return gather_dequant_reference(values, scales, index0, index1, block_size, drop, zero_negative, fmt,
                                        out_dtype)
    out = gather_dequant_triton(values, scales, index0, index1, block_size, drop, zero_negative, fmt, out_dtype)
    if VERIFY:
        _verify(out, values, scales, index0, index1, block_size, drop, zero_negative, fmt, out_dtype)
    return out


@gather_dequant.register_fake
def _gather_dequant_fake(values, scales, index0, index1, block_size, drop, zero_negative, fmt, out_dtype,
                         scale_bytes=False):
    # Shapes only (the launch arithmetic would specialize dynamic sizes).
    _check_args(values, scales_from_bytes(scales, scale_bytes), index0, index1, block_size, drop, fmt, out_dtype)
    return values.new_empty(_out_shape(values, index0, index1, block_size, drop, fmt), dtype=out_dtype)
