"""The fused masked top-k kernel itself, against eager, on random inputs.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest) at small sizes with a small tile,
so the multi-tile, short-circuit and padding paths all run; on CUDA at larger sizes with the real tile.
"""

import struct
import pytest
import torch
from conftest import examples, sanitizer_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_inductor.lowerings.host import next_pow2
from dsa_inductor.lowerings.masked_topk import V7_MAX_CHUNKS, masked_logits, masked_topk_triton
from dsa_inductor.testing import topk_mismatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MAX_N = 9000 if CUDA else 200
BLOCK_MAX = [16384, 2048] if CUDA else [16, 32, 64, 256]
SMALL = [256, 16] if CUDA else [2, 4, 16]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
TILES = [2048, 256] if CUDA else [16, 64]
V7_CHUNKS = [4096, 512] if CUDA else [16, 32, 64]
IMPLS = ["v5", "v5", "v7", "v4"]  # v5 (the default) drawn twice as often as v7 and v4


@st.composite
def problems(draw, max_n=MAX_N):
    rows = draw(st.integers(1, 5))
    n = draw(st.integers(1, max_n))
    k = draw(st.one_of(st.integers(0, min(n, 64)), st.integers(0, n), st.just(n)))
    dtype = draw(st.sampled_from(FLOATS))
    mode = draw(st.sampled_from(["range", "causal", "starts", "keep", "drop", "bias", "none"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(rows, n, generator=g)
    if draw(st.booleans()):
        x = (x * 2).round()  # many ties
    special = draw(st.sampled_from(["none", "nan", "inf", "-inf"]))
    if special != "none":
        x.view(-1)[torch.randint(0, rows * n, (max(1, rows * n // 50),), generator=g)] = float(special)
    kw = {}
    idt = draw(st.sampled_from([torch.int32, torch.int64]))
    if mode in ("range", "starts"):
        kw["row_starts"] = torch.randint(-3, n + 3, (rows,), generator=g).to(idt)
    if mode in ("range", "causal"):
        kw["row_ends"] = torch.randint(-3, n + 3, (rows,), generator=g).to(idt)
        if draw(st.booleans()):  # empty rows and full rows
            kw["row_ends"][0] = 0 if draw(st.booleans()) else n
    if mode in ("keep", "drop"):
        kw["mask"] = torch.rand(rows, n, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
        kw["mask_keeps"] = mode == "keep"
    if mode == "bias":
        kw["bias"] = torch.where(torch.rand(rows, n, generator=g) > 0.5, 0.0, float("-inf")).to(
            draw(st.sampled_from([torch.float32, dtype])))
    fill = float("-inf") if mode == "bias" else draw(st.sampled_from([float("-inf"), -1e30, 0.0]))
    opts = dict(fill=fill, sorted=draw(st.booleans()), need_values=draw(st.booleans()),
                index_dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    opts["block_max"] = draw(st.sampled_from(BLOCK_MAX))
    opts["impl"] = impl = draw(st.sampled_from(IMPLS))
    if impl == "v4":
        # Phase-2 band size (ties and wide bands take the other path when it is small) and chunk size.
        opts["small"] = draw(st.sampled_from(SMALL))
        opts["chunk"] = draw(st.sampled_from([None, opts["block_max"] // 2]))
    elif impl == "v7":
        # Chunks small enough that rows take several (at most V7_MAX_CHUNKS); candidate lists from a few keys
        # (most rows overflow to the streaming path) to more than a row holds; coarse and exact chunk bounds.
        opts["chunk"] = max(draw(st.sampled_from(V7_CHUNKS)), next_pow2(-(-n // V7_MAX_CHUNKS)))
        opts["tile"] = draw(st.sampled_from(TILES))
        opts["bits"] = draw(st.sampled_from([1, 2]))
        opts["v7"] = dict(oversample=draw(st.sampled_from([1.0, 1.5, 2.0, 4.0])),
                          stop_bit=draw(st.sampled_from([0, 8, 16, 24, 31])),
                          cap=draw(st.sampled_from([16, 64, None, opts["block_max"]])), staircase=draw(st.booleans()),
                          row_bound=draw(st.booleans()))
    else:
        # Row program (fused or two kernels, 1 or 2 bits per reduction) or split rows (radix histograms
        # over chunks, forced at any length); tiles small enough that rows take several.
        opts["split"] = draw(st.sampled_from([None, True]))
        opts["bits"] = draw(st.sampled_from([1, 2]))
        opts["phases"] = draw(st.sampled_from(["fused", "two"]))
        opts["tile"] = draw(st.sampled_from(TILES))
        opts["chunk"] = draw(st.sampled_from([None, opts["block_max"] // 2, opts["block_max"]]))
    return x.to(dtype), k, kw, opts


def _to(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@settings(max_examples=examples(cuda=300, cpu=60))
@given(problems())
def test_kernel_equals_eager(problem):
    x, k, kw, opts = problem
    x, kw = x.to(DEVICE), _to(kw, DEVICE)
    values, indices = masked_topk_triton(x, k, **kw, **opts)
    masked = masked_logits(x, **{n: v for n, v in kw.items()}, fill=opts["fill"])
    why = topk_mismatch(masked, k, values, indices, opts["sorted"], opts["need_values"])
    assert why is None, why
    assert indices.dtype == opts["index_dtype"]


@st.composite
def tie_problems(draw, max_n=MAX_N):
    """Rows drawn from a tiny alphabet (runs of equal keys, -inf, NaN, -NaN (sign bit set: x86's default
    NaN, and what CUDA's radix sort put last), +inf), any row bounds."""
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_n))
    k = draw(st.one_of(st.integers(1, n), st.just(n)))
    alphabet = draw(st.lists(st.sampled_from([float("-inf"), -1.0, 0.0, 0.5, 1.0, float("nan"), -float("nan"),
                                                   float("inf")]), min_size=1, max_size=3,
                             unique_by=lambda v: struct.pack("<d", v)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.tensor(alphabet)[torch.randint(0, len(alphabet), (rows, n), generator=g)]
    kw = {}
    if draw(st.booleans()):
        kw["row_ends"] = torch.randint(0, n + 1, (rows,), generator=g)
        kw["row_starts"] = torch.randint(0, n + 1, (rows,), generator=g) if draw(st.booleans()) else None
    opts = dict(fill=draw(st.sampled_from([float("-inf"), 0.0])), sorted=draw(st.booleans()),
                need_values=draw(st.booleans()), split=draw(st.sampled_from([None, True])),
                bits=draw(st.sampled_from([1, 2])), tile=draw(st.sampled_from(TILES)),
                chunk=draw(st.sampled_from([None, 32])), block_max=draw(st.sampled_from(BLOCK_MAX)))
    return x.to(draw(st.sampled_from(FLOATS))), k, {n_: v for n_, v in kw.items() if v is not None}, opts


@settings(max_examples=examples(cuda=200, cpu=25))
@given(tie_problems())
def test_v5_ties_and_special_values(problem):
    """v5 takes exactly ``ties`` keys equal to the threshold (row program: lowest positions first;
    split rows: any, through the row's atomic counter)."""
    x, k, kw, opts = problem
    x, kw = x.to(DEVICE), _to(kw, DEVICE)
    values, indices = masked_topk_triton(x, k, **kw, impl="v5", **opts)
    masked = masked_logits(x, **kw, fill=opts["fill"])
    why = topk_mismatch(masked, k, values, indices, opts["sorted"], opts["need_values"])
    assert why is None, why


def test_auto_impl_follows_the_measurements():
    """The designs `_auto_impl` picks are the ones measured faster on the H100 (bench/NOTES.md, sessions 20, 22)."""
    from dsa_inductor.lowerings.masked_topk import _auto_impl
    assert _auto_impl(8192, 2048, 16384, 8192) == "v5"  # causal rows: v5's row program
    assert _auto_impl(65536, 2048, 16384, 64) == "v7"  # decode, fp32, 64 rows: bound, filter, resolve
    assert _auto_impl(65536, 2048, 16384, 64, torch.bfloat16) == "v7"
    assert _auto_impl(32768, 2048, 16384, 2048) == "v7"  # prefill rows past one program (session 22)
    assert _auto_impl(131072, 2048, 16384, 256) == "v5"  # a larger decode batch: v5's split rows
    assert _auto_impl(131072, 2048, 16384, 64, torch.bfloat16) == "v5"
    assert _auto_impl(131072, 2048, 16384, 64) == "v4"  # fp32, 64 rows past 65536: v4 (session 20)
    assert _auto_impl(65536, 16384, 16384, 4) == "v5"  # 2 k > block_max: v4 would fall back to torch


def test_impl_knobs_are_checked():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="`impl`"):
        masked_topk_triton(x, 2, impl="v3")
    with pytest.raises(ValueError, match="`bits`"):
        masked_topk_triton(x, 2, impl="v5", bits=3)
    with pytest.raises(ValueError, match="`phases`"):
        masked_topk_triton(x, 2, impl="v5", phases="three")
    with pytest.raises(ValueError, match="`bits`"):
        masked_topk_triton(x, 2, impl="v7", bits=3)
    with pytest.raises(ValueError, match="`chunk`"):
        masked_topk_triton(x, 2, impl="v7", chunk=1 << 16)


@pytest.mark.parametrize("batch", [(2, 3), (1,), ()])
def test_kernel_batch_dims_and_broadcast_mask(batch):
    g = torch.Generator().manual_seed(0)
    n, k = 70, 9
    x = torch.randn(*batch, n, generator=g).to(DEVICE)
    mask = (torch.rand(n, generator=g) > 0.3).to(DEVICE)  # broadcast over every row
    values, indices = masked_topk_triton(x, k, mask=mask, block_max=BLOCK_MAX[-1])
    assert topk_mismatch(masked_logits(x, mask=mask), k, values, indices) is None


@st.composite
def row_layouts(draw):
    """A tensor and the ``(*batch, last)`` it broadcasts to: batch dims of size 1 or more, some absent or of size 1
    in the tensor (broadcast), the tensor's dims permuted (strides that do not nest), sliced, or expanded."""
    nb = draw(st.integers(0, 4))
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=nb, max_size=nb)))
    last = draw(st.integers(1, 5))
    keep = draw(st.integers(0, nb))  # the tensor has the last ``keep`` batch dims (the rest broadcast)
    shape = [b if draw(st.booleans()) else 1 for b in batch[nb - keep:]] + [draw(st.sampled_from([last, 1]))]
    order = draw(st.permutations(range(len(shape))))
    base = torch.arange(1, 1 + 2 * max(1, torch.Size(shape).numel()), dtype=torch.float32)
    t = base[:: 2 if draw(st.booleans()) else 1][: torch.Size(shape).numel()]
    t = t.reshape([shape[i] for i in order]).permute([order.index(i) for i in range(len(shape))])
    return t, batch, last


@settings(max_examples=300, deadline=None)
@given(row_layouts())
def test_rows3_strides_walk_the_broadcast_rows(layout):
    """``_rows3``'s strides read exactly ``t.expand(*batch, last)`` viewed as [A, S, last], with no view made
    unless the batch dims cannot be walked by one stride (then the copy ``reshape`` makes)."""
    from dsa_inductor.lowerings.masked_topk import _rows3
    t, batch, last = layout
    want = t.expand(*batch, last).reshape(-1, batch[-1] if batch else 1, last)
    got, strides = _rows3(t, batch, last)
    seen = torch.as_strided(got, want.shape, strides, got.storage_offset())
    assert torch.equal(seen, want)


def test_kernel_permuted_batch_and_broadcast_bounds():
    """Batch dims whose strides do not nest (two leading dims swapped: the row array is copied), and bounds
    broadcast from [S] over the other batch dims."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, 40, generator=g).to(DEVICE).transpose(0, 1)  # [2, 3, 5, 40], strides 200, 400, 40, 1
    ends = torch.tensor([0, 3, 17, 40, 29], device=DEVICE)  # [S], the same bound for every leading index
    values, indices = masked_topk_triton(x, 6, row_ends=ends, block_max=BLOCK_MAX[-1])
    assert topk_mismatch(masked_logits(x, row_ends=ends), 6, values, indices) is None


def test_kernel_non_contiguous_logits():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g).to(DEVICE).t()  # [6, 40], last-dim stride 6
    ends = torch.tensor([0, 1, 5, 17, 40, 33], device=DEVICE)
    values, indices = masked_topk_triton(x, 8, row_ends=ends, block_max=BLOCK_MAX[-1])
    assert topk_mismatch(masked_logits(x, row_ends=ends), 8, values, indices) is None


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter is too slow at these sizes)")
@pytest.mark.parametrize("impl", ["v5", "v7", "v4"])
@pytest.mark.parametrize("rows,n,k", [(8192, 8192, 2048), (64, 65536, 2048), (4, 200000, 2048), (16, 8192, 8192)])
def test_kernel_deepseek_shapes(rows, n, k, impl):
    rows = sanitizer_rows(rows)
    x = torch.randn(rows, n, device="cuda")
    if impl == "v7" and rows > 2:
        x[rows // 2:] += torch.arange(n, device="cuda") / 64.0  # rising rows: candidates past v7's list
    ends = torch.randint(0, n + 1, (rows,), device="cuda")
    for sorted_ in (True, False):
        values, indices = masked_topk_triton(x, k, row_ends=ends, sorted=sorted_, impl=impl)
        assert topk_mismatch(masked_logits(x, row_ends=ends), k, values, indices, sorted_) is None


@pytest.mark.parametrize("bad,err", [
    (dict(k=-1), "`k`"), (dict(k=100), "`k`"),
    (dict(row_ends=torch.zeros(3)), "`row_ends`"),
    (dict(mask=torch.zeros(3, 8)), "`mask`"),
    (dict(index_dtype=torch.float32), "`index_dtype`"),
])
def test_bad_input_names_the_argument(bad, err):
    x = torch.randn(3, 8, device=DEVICE)
    kw = dict(k=2)
    kw.update({n: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for n, v in bad.items()})
    k = kw.pop("k")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=err):
        masked_topk_triton(x, k, **kw)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=err):
        torch.ops.dsa_inductor.masked_topk(x, k, kw.get("row_starts"), kw.get("row_ends"), kw.get("mask"), True,
                                           None, float("-inf"), True, kw.get("index_dtype", torch.int64), True)


@pytest.mark.skipif(not CUDA, reason="verify mode checks the CUDA kernel against eager")
def test_verify_mode_names_rule_and_element(monkeypatch):
    from dsa_inductor.lowerings import masked_topk as mod

    x = torch.randn(4, 64, device="cuda")
    mask = torch.rand(4, 64, device="cuda") > 0.5
    monkeypatch.setattr(mod, "VERIFY", True)
    torch.ops.dsa_inductor.masked_topk(x, 5, None, None, mask, True, None, float("-inf"), True, torch.int64, True)
    real = mod.masked_topk_triton

    def broken(*args, **kwargs):
        v, i = real(*args, **kwargs)
        return v, torch.zeros_like(i)  # every slot picks position 0

    monkeypatch.setattr(mod, "masked_topk_triton", broken)
    with pytest.raises(AssertionError, match=r"rule mask_topk .*index 0 at \(0, 1\) was already selected"):
        torch.ops.dsa_inductor.masked_topk(x, 5, None, None, mask, True, None, float("-inf"), True, torch.int64, True)


@pytest.mark.parametrize("block_max", [8, 64])  # 8: 2k > block_max, the plain-torch fallback; 64: the kernel
def test_short_rows_never_use_their_scores(block_max):
    """Rows of at most k in-range positions select them all, whatever the scores there (the index score
    leaves them undefined): the register-budget fallback path too."""
    from dsa_inductor.lowerings.masked_topk import masked_topk_triton

    g = torch.Generator().manual_seed(5)
    n, k = 40, 6
    logits = torch.randn(3, 5, n, generator=g)
    starts = torch.tensor([0, 2, 10, 30, 39]).expand(3, 5).contiguous()
    ends = torch.tensor([3, 8, 40, 36, 40]).expand(3, 5).contiguous()  # lengths 3, 6, 30, 6, 1
    short = (ends - starts) <= k
    garbage = logits.clone()
    garbage[short] = float("-inf")  # undefined entries may hold anything, -inf included
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _, idx = masked_topk_triton(garbage.to(dev), k, starts.to(dev), ends.to(dev), sorted=False,
                                need_values=False, block_max=block_max)
    _, ref = masked_topk_triton(logits.to(dev), k, starts.to(dev), ends.to(dev), sorted=False,
                                need_values=False, block_max=block_max)
    idx, ref = idx.cpu(), ref.cpu()
    for r in zip(*short.nonzero(as_tuple=True)):
        want = set(range(int(starts[r]), int(ends[r])))
        assert want <= set(idx[r].tolist()), (r, idx[r])
