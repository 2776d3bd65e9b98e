"""The gather-dequant kernel and op against the plain-torch dequant, for every cache layout.

Round trips: a float K is quantized the way the cache writers do (vLLM ``indexer_k_quant_and_cache``,
MXFP4 per OCP MX), written into the layout, gathered back by the kernel, and compared with the plain-torch
dequant (exactly) and with the original K (within the format's error).  On CPU the Triton kernel runs
under ``TRITON_INTERPRET=1`` (set by conftest).
"""

import pytest
import torch
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_inductor.lowerings import gather_dequant as gd
from dsa_inductor.lowerings.gather_dequant import (decode_e2m1, decode_e4m3, decode_ue8m0, gather_dequant_reference,
                                                   gather_dequant_triton, quantize_e4m3, quantize_mxfp4)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
E8M0 = getattr(torch, "float8_e8m0fnu", None)


def assert_same(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    same = (out == ref) | (out.isnan() & ref.isnan())
    assert bool(same.all()), f"first difference at {same.logical_not().nonzero()[0].tolist()}"


def inline_cache(k, block_size):
    """vLLM / DeepSeek-V3.2 indexer layout: per page, block_size x D FP8 bytes then block_size fp32 scales.

    Returns (the uint8 cache [P, block_size * (D + 4)], the values view [P, B, D], the scales view [P, B, 1])."""
    n, d = k.shape
    pages = n // block_size
    q, s = quantize_e4m3(k)
    cache = torch.empty(pages, block_size * (d + 4), dtype=torch.uint8, device=k.device)
    cache[:, : block_size * d] = q.view(pages, block_size * d)
    cache[:, block_size * d:] = s.view(pages, block_size).contiguous().view(torch.uint8)
    values = cache[:, : block_size * d].view(pages, block_size, d)
    scales = cache[:, block_size * d:].view(torch.float32).unsqueeze(-1)
    return cache, values, scales


def test_decoders_match_torch_dtypes():
    b = torch.arange(256, dtype=torch.uint8)
    assert_same(decode_e4m3(b), b.view(torch.float8_e4m3fn).float())
    if E8M0 is not None:
        assert_same(decode_ue8m0(b), b.view(E8M0).float())
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    want = torch.cat([grid, -grid])  # nibble n: sign bit 3, then the magnitude code
    both = decode_e2m1(b)
    assert_same(both[0::2], want[(b & 15).long()])
    assert_same(both[1::2], want[(b >> 4).long()])
    assert torch.signbit(decode_e2m1(torch.tensor([8], dtype=torch.uint8)))[0]  # -0


def test_kernel_decodes_every_byte():
    # every FP8 byte (NaNs included) times a per-token scale, and every UE8M0 scale byte
    values = torch.arange(256, dtype=torch.uint8).view(2, 128).to(DEVICE)
    scales = torch.tensor([[0.5], [3.0]], device=DEVICE)
    idx = torch.tensor([1, 0, 1], device=DEVICE)
    assert_same(gather_dequant_triton(values, scales, idx), gather_dequant_reference(values, scales, idx))
    e = torch.arange(256, dtype=torch.uint8).view(256, 1).to(DEVICE)
    v = torch.full((256, 16), 0x38, dtype=torch.uint8, device=DEVICE)  # 1.0 in e4m3
    rows = torch.arange(256, device=DEVICE)
    out = gather_dequant_triton(v, e, rows)
    assert_same(out, gather_dequant_reference(v, e, rows))
    assert out[127, 0].item() == 1.0 and out[0, 0].item() == 2.0 ** -127 and out[255, 0].isnan()


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_inline_layout_round_trip(block_size):
    g = torch.Generator().manual_seed(block_size)
    d = 128
    k = (torch.randn(8 * block_size, d, generator=g) * torch.rand(8 * block_size, 1, generator=g) * 10).to(DEVICE)
    cache, values, scales = inline_cache(k, block_size)
    slots = torch.randint(-1, k.shape[0], (37,), generator=g).to(DEVICE)
    out = gather_dequant_triton(values, scales, slots, block_size=block_size, zero_negative=True)
    # eager, as a model writes it: clamp, split slot into page/pos, view, upcast, scale, mask
    idx = slots.clamp(min=0)
    page, pos = idx // block_size, idx % block_size
    sc = cache[:, block_size * d:].view(torch.float32)
    eager = values.view(torch.float8_e4m3fn)[page, pos].float() * sc[page, pos].unsqueeze(-1)
    eager = torch.where((slots < 0).unsqueeze(-1), 0.0, eager)
    assert_same(out, eager)
    valid = slots >= 0
    amax = k.abs().amax(-1, keepdim=True)[slots[valid]]
    # e4m3 keeps 3 mantissa bits: error <= 2**-4 relative, and amax / 448 * 2**-9 near zero
    assert bool(((out[valid] - k[slots[valid]]).abs() <= amax * 2.0 ** -4 + 1e-6).all())
    assert bool((out[~valid] == 0).all())


def test_separate_scale_tensor_and_page_gather():
    g = torch.Generator().manual_seed(1)
    p, b, d = 6, 8, 128
    k = torch.randn(p, b, d, generator=g).to(DEVICE)
    q, s = quantize_e4m3(k)  # [P, B, D], [P, B, 1]
    pages = torch.tensor([[5, 0], [2, -1]], device=DEVICE)  # -1 wraps to the last page, as eager
    out = gather_dequant_triton(q, s, pages)
    assert out.shape == (2, 2, b, d)
    assert_same(out, q.view(torch.float8_e4m3fn)[pages].float() * s[pages])
    rows = q.view(p * b, d)
    slots = torch.tensor([0, 47, 13, -2], device=DEVICE)
    out = gather_dequant_triton(rows, s.view(p * b, 1), slots)
    assert_same(out, rows.view(torch.float8_e4m3fn)[slots].float() * s.view(-1)[slots].unsqueeze(-1))


@pytest.mark.parametrize("group,ue8m0", [(128, False), (128, True), (64, True), (32, False)])
def test_block_scales_round_trip(group, ue8m0):
    g = torch.Generator().manual_seed(group)
    d = 256
    k = torch.randn(40, d, generator=g).to(DEVICE) * 5
    q, s = quantize_e4m3(k, group=group, ue8m0=ue8m0)
    assert s.dtype == (torch.uint8 if ue8m0 else torch.float32) and s.shape == (40, d // group)
    idx = torch.randint(0, 40, (19,), generator=g).to(DEVICE)
    out = gather_dequant_triton(q, s, idx, out_dtype=torch.float32)
    assert_same(out, gather_dequant_reference(q, s, idx))
    amax = k.unflatten(-1, (d // group, group)).abs().amax(-1).repeat_interleave(group, -1)[idx]
    tol = amax * (2.0 ** -4) * (2 if ue8m0 else 1) + 1e-6  # a power-of-two scale leaves up to 2x less headroom
    assert bool(((out - k[idx]).abs() <= tol).all())
    if ue8m0 and E8M0 is not None:
        assert_same(gather_dequant_triton(q, s.view(E8M0), idx), out)


@pytest.mark.parametrize("d", [128, 64])
def test_mxfp4_round_trip(d):
    g = torch.Generator().manual_seed(d)
    p, b = 5, 16
    k = torch.randn(p, b, d, generator=g).to(DEVICE)
    packed, s = quantize_mxfp4(k)  # [P, B, D/2], [P, B, D/32] UE8M0
    assert packed.shape == (p, b, d // 2) and s.shape == (p, b, d // 32)
    page = torch.randint(0, p, (23,), generator=g).to(DEVICE)
    pos = torch.randint(0, b, (23,), generator=g).to(DEVICE)
    out = gather_dequant_triton(packed, s, page, pos, fmt="e2m1", out_dtype=torch.bfloat16)
    assert_same(out, gather_dequant_reference(packed, s, page, pos, fmt="e2m1", out_dtype=torch.bfloat16))
    # e2m1 with a 2**floor(log2(amax)) - 2 scale: |error| <= half a step of the top binade (1 of 6) -> amax / 4
    amax = k.unflatten(-1, (d // 32, 32)).abs().amax(-1).repeat_interleave(32, -1)[page, pos]
    assert bool(((out.float() - k[page, pos]).abs() <= amax / 4 + 1e-6).all())


@st.composite
def problems(draw):
    fmt = draw(st.sampled_from(["e4m3", "e2m1"]))
    d = draw(st.sampled_from([16, 32, 64, 96, 128] if fmt == "e4m3" else [32, 64, 128]))
    p = draw(st.integers(1, 9))
    b = draw(st.integers(1, 5))
    rank = draw(st.sampled_from([2, 3]))
    mode = draw(st.sampled_from(["rows", "pagepos", "slots"] if rank == 3 else ["rows"]))
    n = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dq = d if fmt == "e4m3" else d // 2
    shape = (p, b, dq) if rank == 3 else (p, dq)
    values = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if fmt == "e4m3" and draw(st.booleans()):
        values = values.view(torch.float8_e4m3fn)
    if draw(st.booleans()):  # strided: a page row with a gap (as the inline layout has)
        wide = torch.randint(0, 256, (*shape[:-1], dq + 16), generator=g, dtype=torch.uint8).view(values.dtype)
        wide[..., :dq] = values
        values = wide[..., :dq]
    kind = draw(st.sampled_from(["none", "f32", "bf16", "ue8m0"] + (["e8m0"] if E8M0 is not None else [])))
    scales = None
    if kind != "none":
        groups = draw(st.sampled_from([gg for gg in (1, 2, 4, d // 32) if gg >= 1 and d % gg == 0]))
        sshape = list(shape[:-1]) + [groups]
        sshape[0] += draw(st.sampled_from([0, 0, 3]))  # a larger scale table: indexed (and wrapped) on its own
        if rank == 3 and draw(st.booleans()):
            sshape[1] = 1  # one scale per page row, broadcast over its tokens
        if kind in ("ue8m0", "e8m0"):
            scales = torch.randint(100, 150, sshape, generator=g, dtype=torch.uint8)
            scales.view(-1)[0] = draw(st.sampled_from([127, 255]))  # (0, 2**-127, is tested apart: the
            # interpreter flushes subnormal bf16 results)
            if kind == "e8m0":
                scales = scales.view(E8M0)
        else:
            scales = (torch.rand(sshape, generator=g) * 4).to(torch.float32 if kind == "f32" else torch.bfloat16)
    idt = draw(st.sampled_from([torch.int32, torch.int64]))
    zero_negative = draw(st.booleans())
    if mode == "slots":
        i0 = torch.randint(-p * b if not zero_negative else -3, p * b, (n,), generator=g)
        i1, bs = None, b
    elif mode == "pagepos":
        i0 = torch.randint(-p, p, (n,), generator=g)
        i1, bs = torch.randint(-b, b, (n,), generator=g).to(idt), 0
    else:
        i0 = torch.randint(-p, p, (n,), generator=g)
        i1, bs = None, 0
    drop = (torch.rand(n, generator=g) < 0.3) if draw(st.booleans()) else None
    out_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return values, scales, i0.to(idt), i1, bs, drop, zero_negative, fmt, out_dtype


def _dev(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


@settings(max_examples=examples(cuda=300, cpu=80))
@given(problems())
def test_kernel_equals_reference(problem):
    args = _dev(problem)
    values, scales, i0, i1, bs, drop, zn = args[:7]
    knobs = dict(tiles=1 + i0.numel() % 2, store_cs=i0.numel() % 3 == 0)  # tuning knobs never change the result
    out = gather_dequant_triton(*args, block_rows=8 if not CUDA else None, **knobs)
    if gd.out_of_range(values, i0, i1, bs, drop, zn, scales):
        # Eager raises IndexError on CPU; on CUDA it would hit a device-side assert that poisons the context,
        # so eager never sees these indices on the device.  The kernel gives zeros there without reading.
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in problem]
        with pytest.raises(IndexError):
            gather_dequant_reference(*cpu)
        _check_out_of_range_rows(out, cpu)
        return
    assert_same(out, gather_dequant_reference(*args))
    assert_same(torch.ops.dsa_inductor.gather_dequant(*args), gather_dequant_reference(*args))


def _check_out_of_range_rows(out, cpu_args):
    """Out-of-range tokens gave zero rows; every other token equals the reference (computed on CPU with the
    bad tokens dropped, so eager never indexes out of range)."""
    values, scales, i0, i1, bs, drop, zn, fmt, out_dtype = cpu_args
    tok = gd._token_shape(values, i0, i1, drop)
    bad = torch.zeros(tok, dtype=torch.bool)
    for t in range(bad.numel()):
        one = [x.expand(tok).reshape(-1)[t:t + 1] if isinstance(x, torch.Tensor) else None for x in (i0, i1, drop)]
        bad.view(-1)[t] = gd.out_of_range(values, one[0], one[1], bs, one[2], zn, scales)
    assert bool(bad.any())
    flat = out.cpu().reshape(bad.numel(), -1)
    assert bool((flat[bad.reshape(-1)] == 0).all())
    # the remaining tokens: a dropped bad token reads index 0 in the reference (zeroed anyway)
    safe0 = torch.where(bad, 0, i0.expand(tok))
    safe1 = torch.where(bad, 0, i1.expand(tok)) if i1 is not None else None
    ref = gather_dequant_reference(values, scales, safe0, safe1, bs, bad if drop is None else (drop.expand(tok) | bad),
                                   zn, fmt, out_dtype)
    assert_same(out.cpu(), ref)


def test_out_of_range_never_read():
    values = torch.randint(0, 120, (4, 2, 32), dtype=torch.uint8).to(DEVICE)
    scales = torch.ones(4, 2, 1, device=DEVICE)
    slots = torch.tensor([0, 7, 8, 1000, -1, -9], device=DEVICE)
    out = gather_dequant_triton(values, scales, slots, block_size=2)
    ref_rows = values.view(8, 32).view(torch.float8_e4m3fn).float()
    assert_same(out[:2], ref_rows[[0, 7]])
    assert bool((out[2:4] == 0).all())  # past the cache: zeros, never read (eager raises)
    assert_same(out[4], ref_rows[7])  # -1 wraps like eager indexing: last page, last position
    assert bool((out[5] == 0).all())  # -9: still outside after one wrap
    with pytest.raises(IndexError):
        gather_dequant_reference(values.cpu(), scales.cpu(), slots.cpu(), block_size=2)
    assert gd.out_of_range(values, slots, block_size=2)
    assert not gd.out_of_range(values, slots[:2], block_size=2)


def test_cpu_op_raises_like_eager():
    values = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(IndexError):
        torch.ops.dsa_inductor.gather_dequant(values, None, torch.tensor([4]), None, 0, None, False, "e4m3",
                                              torch.float32)


V = torch.zeros(4, 2, 32, dtype=torch.uint8)
I = torch.tensor([0, 1])
S = torch.ones(4, 2, 1)


@pytest.mark.parametrize("kw,err,name", [
    (dict(values=V.float()), TypeError, "values"),
    (dict(values=V[0, 0]), ValueError, "values"),
    (dict(fmt="e5m2"), ValueError, "fmt"),
    (dict(values=V.view(torch.float8_e4m3fn), fmt="e2m1"), TypeError, "values"),
    (dict(index0=I.float()), TypeError, "index0"),
    (dict(index1=I.to(torch.int16)), TypeError, "index1"),
    (dict(index1=I, block_size=2), ValueError, "block_size"),
    (dict(block_size=3), ValueError, "block_size"),
    (dict(block_size=-1), ValueError, "block_size"),
    (dict(drop=I), TypeError, "drop"),
    (dict(scales=S.to(torch.int32)), TypeError, "scales"),
    (dict(scales=S[0]), ValueError, "scales"),
    (dict(scales=torch.ones(4, 2, 3)), ValueError, "scales"),
    (dict(scales=torch.ones(4, 3, 1)), ValueError, "scales"),  # whole pages: a 3-token scale row for 2
    (dict(out_dtype=torch.int32), TypeError, "out_dtype"),
])
def test_bad_input_names_the_argument(kw, err, name):
    args = dict(values=V, scales=S, index0=I, index1=None, block_size=0, drop=None, zero_negative=False, fmt="e4m3",
                out_dtype=torch.float32)
    args.update(kw)
    with pytest.raises(err, match=f"`{name}`"):
        torch.ops.dsa_inductor.gather_dequant(*args.values())
    if CUDA:
        args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        with pytest.raises(err, match=f"`{name}`"):
            gather_dequant_triton(*args.values())


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 120, (6, 4, 32), dtype=torch.uint8, generator=g)
    scales = torch.rand(6, 4, 1, generator=g)
    slots = torch.tensor([3, -1, 20, 7])
    torch.library.opcheck(torch.ops.dsa_inductor.gather_dequant.default,
                          (values, scales, slots, None, 4, None, True, "e4m3", torch.bfloat16))


@pytest.mark.skipif(not CUDA, reason="the verify path runs on CUDA only")
def test_verify_mode_catches_out_of_range(monkeypatch):
    monkeypatch.setattr(gd, "VERIFY", True)
    values = torch.zeros(4, 32, dtype=torch.uint8, device="cuda")
    with pytest.raises(AssertionError, match="gather_dequant"):
        torch.ops.dsa_inductor.gather_dequant(values, None, torch.tensor([9], device="cuda"), None, 0, None, False,
                                              "e4m3", torch.float32)


@pytest.mark.skipif(not CUDA, reason="needs a GPU for the large case")
def test_int64_offsets_past_2gb():
    # 4M slots x 128 B = 512 MB of cache, 2 GB of fp32 output: row * D and page * stride exceed int32 in bytes
    n, d = 1 << 22, 128
    values = torch.randint(0, 120, (n, d), dtype=torch.uint8, device="cuda")
    scales = torch.rand(n, 1, device="cuda")
    slots = torch.arange(n - 1, -1, -1, device="cuda")
    out = gather_dequant_triton(values, scales, slots)
    for t in (0, n // 2, n - 1):
        s = n - 1 - t
        ref = values[s].view(torch.float8_e4m3fn).float() * scales[s]
        assert torch.equal(out[t], ref)
