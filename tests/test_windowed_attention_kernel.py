"""The windowed attention kernel itself, against eager's dense chain (matmul, masked_fill(-inf), softmax, matmul).

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest) at small sizes with small tiles, so
several row blocks, several key tiles per block, windows crossing tile edges and empty windows all run; on
CUDA at larger sizes with the real tiles as well.
"""

import math
import os

import pytest
import torch
from conftest import examples, sanitizer_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_inductor.lowerings import windowed_attention as mod
from dsa_inductor.lowerings.windowed_attention import windowed_attention_reference, windowed_attention_triton
from dsa_inductor.testing import windowed_attention_mismatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MAX_T = 700 if CUDA else 50
TILES = [(None, None), (16, 16), (32, 64), (128, 32)] if CUDA else [(16, 16), (16, 32), (32, 16)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def on_oracle_device(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, on the CPU under compute-sanitizer (``DSA_SANITIZER=1``), the result moved back.
    The oracles' cuBLAS GEMMs are not the kernel under test, and racecheck aborted inside them ("failed to handle
    a hardware exception", H200: eager's at the 8192-key shape in session 10, the reference's in session 11)."""
    if os.environ.get("DSA_SANITIZER") != "1" or not args[0].is_cuda:
        return fn(*args, **kwargs)

    def cpu(x):
        return x.cpu() if isinstance(x, torch.Tensor) else x

    out = fn(*map(cpu, args), **{n: cpu(x) for n, x in kwargs.items()})
    return out.to(args[0].device)


def eager(q, k, v, s=None, e=None, scale=1.0, scores_dtype=None, sinks=None):
    """What model code computes, written independently of the op's reference (on the CPU under
    compute-sanitizer: ``on_oracle_device``).  ``sinks`` ([H] or broadcastable to the rows) as
    transformers' DeepSeek-V4 ``eager_attention_forward``: an additive finfo.min mask, the sink column cat'ed,
    the row max subtracted, softmax, the sink column dropped."""
    if sinks is not None:
        return on_oracle_device(_eager_sink, q, k, v, s, e, scale, scores_dtype, sinks)
    return on_oracle_device(_eager, q, k, v, s, e, scale, scores_dtype)


def _scores_and_keep(q, k, s, e, scale, scores_dtype):
    scores = (q @ k.transpose(-1, -2)).to(scores_dtype or q.dtype) * scale
    pos = torch.arange(k.shape[-2], device=q.device)
    keep = torch.ones_like(pos, dtype=torch.bool)
    if s is not None:
        keep = keep & (pos >= s[..., None])
    if e is not None:
        keep = keep & (pos < e[..., None])
    return scores, keep


def _eager_sink(q, k, v, s, e, scale, scores_dtype, sinks):
    scores, keep = _scores_and_keep(q, k, s, e, scale, scores_dtype)
    scores = scores + torch.where(keep, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
    sink = sinks[..., None].expand(*scores.shape[:-1], 1)
    combined = torch.cat([scores, sink], dim=-1)  # promoted to fp32 with fp32 sinks
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return probs.to(v.dtype) @ v


def _eager(q, k, v, s, e, scale, scores_dtype):
    scores, keep = _scores_and_keep(q, k, s, e, scale, scores_dtype)
    probs = torch.softmax(scores.masked_fill(~keep, NEG_INF), dim=-1, dtype=torch.float32)
    return probs.to(v.dtype) @ v


@st.composite
def problems(draw):
    t = draw(st.integers(0 if CUDA else 1, MAX_T))
    s = draw(st.integers(1, MAX_T))
    d, dv = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    batch = draw(st.sampled_from([(), (2,), (2, 3), (1, 2, 2)]))
    shared = draw(st.booleans()) and len(batch) >= 1  # k/v one head for all (a broadcast batch dim)
    kv_batch = (*batch[:-1], 1) if shared else batch
    dtype = draw(st.sampled_from(FLOATS))
    v_dtype = draw(st.sampled_from([dtype, torch.float32]))
    scores_dtype = draw(st.sampled_from([dtype, torch.float32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(*batch, s, d, generator=g).to(dtype)
    k = torch.randn(*kv_batch, t, d, generator=g).to(dtype)
    v = torch.randn(*kv_batch, t, dv, generator=g).to(v_dtype)
    idt = draw(st.sampled_from([torch.int32, torch.int64]))
    mode = draw(st.sampled_from(["sliding", "causal", "range", "starts", "none", "per_head"]))
    kw = {}
    qpos = torch.arange(s) + (t - s)
    if mode == "sliding":
        w = draw(st.integers(1, t + 3))  # window sizes from 1 to beyond T
        kw = dict(row_starts=qpos - w + 1, row_ends=qpos + 1)
    elif mode == "causal":
        kw = dict(row_ends=qpos + 1)
    elif mode in ("range", "starts"):
        kw["row_starts"] = torch.randint(-3, t + 3, (s,), generator=g)
        if mode == "range":
            kw["row_ends"] = torch.randint(-3, t + 3, (s,), generator=g)
            kw["row_ends"][0] = kw["row_starts"][0]  # an empty row: NaN, as eager
    elif mode == "per_head" and batch:  # bounds that vary along the last batch dim too
        kw["row_starts"] = torch.randint(-1, t + 1, (batch[-1], s), generator=g)
        kw["row_ends"] = kw["row_starts"] + torch.randint(0, 9, (batch[-1], s), generator=g)
    kw = {n: b.to(idt) for n, b in kw.items()}  # (sinks come after)
    # Scores of a few units, as attention's: q @ k^T is rounded to q's dtype, and one ulp of a large score from
    # another summation order (eager's matmul, the kernel's dot) would move its weight by more than the tolerance.
    scale = draw(st.sampled_from([1.0, 2.0])) / math.sqrt(d)
    if draw(st.booleans()):  # DeepSeek-V4's attention sink: one fp32 logit per head (the last batch dim)
        kw["sinks"] = (torch.randn(*((batch[-1], 1) if batch else (1,)), generator=g) * 2).to(draw(st.sampled_from([torch.float32, dtype])))
    return q, k, v, kw, scale, scores_dtype, draw(st.sampled_from(TILES))


def _to(kw, device):
    return {n: b.to(device) for n, b in kw.items()}


@settings(max_examples=examples(cuda=300, cpu=80))
@given(problems())
def test_kernel_equals_eager(problem):
    q, k, v, kw, scale, scores_dtype, (bm, bn) = problem
    q, k, v, kw = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), _to(kw, DEVICE)
    out = windowed_attention_triton(q, k, v, **kw, scale=scale, scores_dtype=scores_dtype, block_m=bm, block_n=bn)
    ref = eager(q, k, v, kw.get("row_starts"), kw.get("row_ends"), scale, scores_dtype, kw.get("sinks"))
    why = windowed_attention_mismatch(ref, out, q.dtype)
    assert why is None, why
    mine = on_oracle_device(windowed_attention_reference, q, k, v, **kw, scale=scale, scores_dtype=scores_dtype)
    assert windowed_attention_mismatch(ref, mine, q.dtype) is None


def test_empty_and_nonfinite_rows_match_eager_nans():
    # rows: empty window; a NaN key in the window; an inf key in the window; a NaN key only outside the window
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, 8, generator=g)
    k[10, 3] = float("nan")
    k[20] = float("inf")
    k[35, 0] = float("nan")
    s = torch.tensor([5, 8, 18, 24])
    e = torch.tensor([5, 12, 22, 30])
    out = windowed_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), s.to(DEVICE), e.to(DEVICE),
                                    block_m=16, block_n=16)
    ref = eager(q, k, v, s, e)
    assert ref[:3].isnan().all() and not ref[3].isnan().any()  # eager's behaviour, which the op copies
    assert windowed_attention_mismatch(ref, out.cpu(), q.dtype) is None


def test_keys_outside_the_windows_never_read():
    # k and v NaN outside the union of the windows [10, 40): a kernel that read (and multiplied) them would
    # give NaN rows; eager would too (0 * NaN in its dense p @ v), so the oracle is the NaN-free problem.
    g = torch.Generator().manual_seed(1)
    t, s = 60, 48
    q, k, v = torch.randn(s, 16, generator=g), torch.randn(t, 16, generator=g), torch.randn(t, 8, generator=g)
    starts = 10 + torch.arange(s) // 2
    ends = starts + 1 + torch.arange(s) % 7
    starts[5], ends[5] = 0, 0  # an empty window at 0 widens no block's span (NaN row, as eager)
    kn, vn = k.clone(), v.clone()
    kn[:10], kn[40:], vn[:10], vn[40:] = float("nan"), float("nan"), float("nan"), float("nan")
    out = windowed_attention_triton(q.to(DEVICE), kn.to(DEVICE), vn.to(DEVICE), starts.to(DEVICE), ends.to(DEVICE),
                                    block_m=16, block_n=16).cpu()
    assert out[5].isnan().all() and not out[torch.arange(s) != 5].isnan().any()
    assert windowed_attention_mismatch(eager(q, k, v, starts, ends), out, q.dtype) is None


def test_no_keys_gives_zeros_as_eager():
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 0, 8), torch.randn(2, 0, 4)
    ref = eager(q, k, v, None, torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(ref, torch.zeros(2, 5, 4))
    out = windowed_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None,
                                    torch.tensor([0, 1, 2, 3, 4], device=DEVICE))
    assert torch.equal(out.cpu(), ref)


def test_strided_operands():
    # q as a transposed view, k^T given as k.transpose of a [T, D] view of a [D, T] buffer, v sliced
    g = torch.Generator().manual_seed(2)
    q = torch.randn(16, 30, generator=g).to(DEVICE).t()  # [30, 16], stride (1, 30)
    k = torch.randn(16, 40, generator=g).to(DEVICE).t()  # [40, 16]
    v = torch.randn(40, 20, generator=g).to(DEVICE)[:, ::2]  # [40, 10], stride (20, 2)
    e = torch.arange(30, device=DEVICE) + 11
    out = windowed_attention_triton(q, k, v, e - 6, e, scale=0.25, block_m=16, block_n=16)
    assert windowed_attention_mismatch(eager(q, k, v, e - 6, e, 0.25), out, q.dtype) is None
    # three batch dims, the outer two swapped: they cannot merge into one stride (q is copied); k broadcast
    q = torch.randn(2, 3, 2, 20, 16, generator=g).to(DEVICE).permute(1, 0, 2, 3, 4)
    k, v = torch.randn(2, 1, 25, 16, generator=g).to(DEVICE), torch.randn(3, 1, 1, 25, 8, generator=g).to(DEVICE)
    e = torch.randint(0, 26, (2, 20), generator=g).to(DEVICE)
    out = windowed_attention_triton(q, k, v, None, e, scale=0.25, block_m=16, block_n=16)
    assert out.shape == (3, 2, 2, 20, 8)
    assert windowed_attention_mismatch(eager(q, k, v, None, e, 0.25), out, q.dtype) is None


@pytest.mark.skipif(not CUDA, reason="the benchmark shape runs only on the device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliding_window_8192(dtype):
    t, w = 8192, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, 128, device="cuda", generator=g).to(dtype) for _ in range(3))
    pos = torch.arange(t, device="cuda")
    rows = sanitizer_rows(t)  # under compute-sanitizer the last 1024 query rows (the eager GEMM shrinks)
    q, pos = q[t - rows:], pos[t - rows:]
    s, e = pos - w + 1, pos + 1
    out = torch.ops.dsa_inductor.windowed_attention(q, k, v, s, e, 128 ** -0.5, dtype)
    assert windowed_attention_mismatch(eager(q, k, v, s, e, 128 ** -0.5), out, q.dtype) is None


def odd_dim_mismatches(**tile):
    """Mismatches against eager of the kernel with ``tile`` (default: the op's) at head dims that are not powers of
    two: Dqk = DA + DB, Dv padded (the GPU property test found the 64 x 64, 4-warp tile wrong at D = 33, Dv = 2)."""
    bad = []
    for dtype in (torch.float16, torch.bfloat16):
        for d in (17, 33, 40, 65, 100):
            for dv in (2, 24, 128):
                g = torch.Generator(device="cuda").manual_seed(d * 1000 + dv)
                q = torch.randn(2, 70, d, device="cuda", generator=g).to(dtype)
                k = torch.randn(2, 150, d, device="cuda", generator=g).to(dtype)
                v = torch.randn(2, 150, dv, device="cuda", generator=g).to(dtype)
                e = torch.arange(70, device="cuda") + 81
                out = windowed_attention_triton(q, k, v, e - 40, e, d ** -0.5, dtype, **tile)
                why = windowed_attention_mismatch(eager(q, k, v, e - 40, e, d ** -0.5, dtype), out, dtype)
                if why is not None:
                    bad.append((dtype, d, dv, why))
    return bad


@pytest.mark.skipif(not CUDA, reason="a compiler fault of the GPU build")
def test_default_tile_at_odd_head_dims():
    assert odd_dim_mismatches() == []


@pytest.mark.skipif(not CUDA, reason="the interpreter (CPU) runs any tile")
def test_miscompiled_tile_is_refused():
    q = torch.randn(8, 33, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="`block_m` / `block_n` / `num_warps`: a 64 x 64 tile with 4 warps"):
        windowed_attention_triton(q, q, q, block_m=64, block_n=64, num_warps=4)
    windowed_attention_triton(q, q, q, block_m=64, block_n=64, num_warps=8)  # 8 warps: allowed


def test_opcheck():
    q, k, v = (torch.randn(2, 3, 12, 8, device=DEVICE) for _ in range(3))
    e = torch.arange(1, 13, device=DEVICE)
    torch.library.opcheck(torch.ops.dsa_inductor.windowed_attention.default,
                          (q, k[:, :1], v[:, :1], e - 4, e, 0.5, torch.float32))


@pytest.mark.skipif(not CUDA, reason="verify mode checks the CUDA kernel against eager")
def test_verify_mode_names_rule_and_element(monkeypatch):
    q, k, v = (torch.randn(64, 16, device="cuda") for _ in range(3))
    e = torch.arange(1, 65, device="cuda")
    monkeypatch.setattr(mod, "VERIFY", True)
    torch.ops.dsa_inductor.windowed_attention(q, k, v, e - 8, e, 0.25, torch.float32)
    real = mod.windowed_attention_triton
    monkeypatch.setattr(mod, "windowed_attention_triton", lambda *a, **kw: real(*a, **kw) * 0.5)
    with pytest.raises(AssertionError, match=r"rule windowed_attention .* element \(0, 0\)"):
        torch.ops.dsa_inductor.windowed_attention(q, k, v, e - 8, e, 0.25, torch.float32)


def test_sink_rows_without_keys_as_eager():
    """With a finite sink a row whose window is empty gets all the weight on the sink: zeros, as eager (its
    finfo.min mask leaves the sink the row max); a -inf sink leaves nothing: NaN, as eager's all -inf softmax."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    s = torch.tensor([0, 2, 4, 4, 1, 6])
    e = torch.tensor([0, 5, 4, 6, 1, 6])  # rows 0, 2, 4, 5 empty
    for sink, want in ((torch.tensor([[0.5], [-1.0]]), 0.0), (torch.full((2, 1), NEG_INF), float("nan"))):
        out = windowed_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), s.to(DEVICE), e.to(DEVICE),
                                        scale=0.3, sinks=sink.to(DEVICE), block_m=16, block_n=16).cpu()
        ref = windowed_attention_reference(q, k, v, s, e, 0.3, sinks=sink)
        assert windowed_attention_mismatch(ref, out, q.dtype) is None
        empty = out[:, [0, 2, 4, 5]]
        assert (empty.isnan().all() if want != want else (empty == 0).all()), empty
        if want == 0.0:
            assert windowed_attention_mismatch(eager(q, k, v, s, e, 0.3, None, sink), out, q.dtype) is None


def test_bad_sinks_named():
    q = torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(TypeError, match="`sinks`"):
        windowed_attention_triton(q, q, q, sinks=torch.ones(2, 1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="`sinks`"):
        windowed_attention_triton(q, q, q, sinks=torch.ones(3, 1, device=DEVICE))
    with pytest.raises(ValueError, match="`sinks`"):  # the CPU path checks too
        torch.ops.dsa_inductor.windowed_attention(q.cpu(), q.cpu(), q.cpu(), None, None, 1.0, q.dtype,
                                                  torch.ones(3, 1))


@pytest.mark.skipif(not CUDA, reason="the wide-head default tile at DeepSeek-V4's head dim runs on the device")
@pytest.mark.parametrize("d", [320, 512])
def test_wide_heads_default_tile(d):
    """DeepSeek-V4's head dim (512) and an odd one past 256: the CONFIG_WIDE tile, with a sink, shared K = V."""
    g = torch.Generator(device="cuda").manual_seed(d)
    q = torch.randn(2, 4, 300, d, device="cuda", generator=g).to(torch.bfloat16)
    kv = torch.randn(2, 1, 300, d, device="cuda", generator=g).to(torch.bfloat16)
    sinks = torch.randn(4, 1, device="cuda", generator=g)
    e = torch.arange(1, 301, device="cuda")
    out = windowed_attention_triton(q, kv, kv, e - 128, e, d ** -0.5, torch.bfloat16, sinks)
    ref = eager(q, kv, kv, e - 128, e, d ** -0.5, torch.bfloat16, sinks)
    assert windowed_attention_mismatch(ref, out, q.dtype) is None


def _eager_tail(q, k, v, s, e, scale, scores_dtype, sinks, tail, ts, te, tb):
    """DeepSeek-V4's compressed layers as transformers writes them: the window's additive finfo.min mask over the
    first ``tail`` keys cat'ed with the compressed keys' block bias (``tb``, or a 0 / -inf causal one from
    ``ts`` / ``te``), the sink cat'ed, max subtracted, softmax, sink dropped."""
    scores = (q @ k.transpose(-1, -2)).to(scores_dtype or q.dtype) * scale
    t = k.shape[-2]
    pos = torch.arange(tail, device=q.device)
    keep = (pos >= s[..., None]) & (pos < e[..., None])
    head = torch.where(keep, 0.0, torch.finfo(scores.dtype).min)
    j = torch.arange(t - tail, device=q.device)
    rest = torch.zeros(t - tail, device=q.device)
    if ts is not None:
        rest = rest.masked_fill(j < ts[..., None], NEG_INF)
    if te is not None:
        rest = rest.masked_fill(j >= te[..., None], NEG_INF)
    if tb is not None:
        rest = rest + tb
    rows = torch.broadcast_shapes(head.shape[:-1], rest.shape[:-1])
    mask = torch.cat([head.expand(*rows, tail), rest.expand(*rows, t - tail)], dim=-1).to(scores.dtype)
    scores = scores + mask
    combined = torch.cat([scores, sinks[..., None].expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return probs.to(v.dtype) @ v


@settings(max_examples=examples(cuda=200, cpu=40))
@given(st.data())
def test_tail_segment_equals_eager(data):
    """Keys [0, tail) under a sliding window, keys [tail, T) under their own causal bounds (V4's HCA) or an
    additive 0 / -inf block bias (V4's CSA, the indexer's picks), a per-head sink: kernel == eager."""
    draw = data.draw
    dtype = draw(st.sampled_from(FLOATS))
    tail, extra = draw(st.integers(1, MAX_T)), draw(st.integers(0, 24))
    t, s, d = tail + extra, draw(st.integers(1, MAX_T)), draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(2, 3, s, d, generator=g).to(dtype)
    kv = torch.randn(2, 1, t, d, generator=g).to(dtype)
    qpos = torch.arange(s) + (tail - s)
    w = draw(st.integers(1, tail + 2))
    starts, ends = qpos - w + 1, qpos + 1
    ts = te = tb = None
    kind = draw(st.sampled_from(["causal", "bias", "both", "none"]))
    if kind in ("causal", "both"):
        te = (qpos + 1) // draw(st.integers(1, 8))
    if kind in ("bias", "both"):
        tb = torch.where(torch.rand(2, 1, s, extra, generator=g) < 0.5, 0.0, NEG_INF)
    if draw(st.booleans()) and kind != "none":
        ts = torch.randint(-2, extra + 2, (s,), generator=g)
    sinks = (torch.randn(3, 1, generator=g) * 2).to(draw(st.sampled_from([torch.float32, dtype])))
    scale = 1.0 / math.sqrt(d)
    bm, bn = draw(st.sampled_from(TILES))
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    out = windowed_attention_triton(dev(q), dev(kv), dev(kv), dev(starts), dev(ends), scale, dtype, dev(sinks),
                                    tail, dev(ts), dev(te), dev(tb), block_m=bm, block_n=bn)
    ref = on_oracle_device(_eager_tail, dev(q), dev(kv), dev(kv), dev(starts), dev(ends), scale, dtype, dev(sinks),
                           tail, dev(ts), dev(te), dev(tb))
    why = windowed_attention_mismatch(ref, out, dtype)
    assert why is None, why
    mine = windowed_attention_reference(q, kv, kv, starts, ends, scale, dtype, sinks, tail, ts, te, tb)
    assert windowed_attention_mismatch(ref.cpu(), mine, dtype) is None
