"""The windowed softmax kernel itself, against eager's masked_fill(-inf) + softmax, on random inputs.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest) at small sizes with small tiles,
so windows of several tiles, windows crossing tile edges and all-zero tiles all run; on CUDA at larger
sizes with the real tile as well.
"""

import pytest
import torch
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_inductor.lowerings import windowed_softmax as mod
from dsa_inductor.lowerings.windowed_softmax import windowed_softmax_reference, windowed_softmax_triton
from dsa_inductor.testing import softmax_mismatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MAX_N = 5000 if CUDA else 70
BLOCKS = [None, 16, 128] if CUDA else [4, 16, 64]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def keep_of(x, s=None, e=None, mask=None):
    pos = torch.arange(x.shape[-1], device=x.device)
    keep = torch.ones_like(pos, dtype=torch.bool)
    if s is not None:
        keep = keep & (pos >= s[..., None])
    if e is not None:
        keep = keep & (pos < e[..., None])
    if mask is not None:
        keep = keep & mask
    return keep


def eager(x, s=None, e=None, mask=None, out_dtype=None):
    """What model code computes: masked_fill(~keep, -inf), then softmax (in out_dtype)."""
    keep = keep_of(x, s, e, mask)
    return torch.softmax(x.masked_fill(~keep, NEG_INF), dim=-1, dtype=out_dtype)


@st.composite
def problems(draw):
    rows = draw(st.integers(1, 5))
    n = draw(st.integers(1, MAX_N))
    dtype = draw(st.sampled_from(FLOATS))
    out_dtype = draw(st.sampled_from([None, torch.float32, dtype, torch.bfloat16]))  # bf16: rounds first
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(rows, n, generator=g) * draw(st.sampled_from([1.0, 30.0]))
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "-inf"]))
    if special != "none":
        x.view(-1)[torch.randint(0, rows * n, (max(1, rows * n // 40),), generator=g)] = float(special)
    idt = draw(st.sampled_from([torch.int32, torch.int64]))
    mode = draw(st.sampled_from(["range", "causal", "starts", "sliding", "mask", "none"]))
    kw = {}
    if mode in ("range", "starts"):
        kw["row_starts"] = torch.randint(-3, n + 3, (rows,), generator=g).to(idt)
    if mode in ("range", "causal"):
        kw["row_ends"] = torch.randint(-3, n + 3, (rows,), generator=g).to(idt)
        if draw(st.booleans()):  # an empty row and a full row
            kw["row_ends"][0] = kw.get("row_starts", torch.zeros(1, dtype=idt))[0]
            kw["row_ends"][-1] = n
    if mode == "sliding":
        w = draw(st.integers(1, n + 2))
        q = torch.randint(0, n, (rows,), generator=g)
        kw["row_starts"], kw["row_ends"] = (q - w + 1).to(idt), (q + 1).to(idt)
    if mode == "mask":
        kw["mask"] = torch.rand(rows, n, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return x.to(dtype), kw, out_dtype, draw(st.sampled_from(BLOCKS))


def _to(kw, device):
    return {k: v.to(device) for k, v in kw.items()}


@settings(max_examples=examples(cuda=300, cpu=60))
@given(problems())
def test_kernel_equals_eager(problem):
    x, kw, out_dtype, block = problem
    x, kw = x.to(DEVICE), _to(kw, DEVICE)
    out = windowed_softmax_triton(x, **kw, out_dtype=out_dtype, block=block)
    ref = eager(x, kw.get("row_starts"), kw.get("row_ends"), kw.get("mask"), out_dtype)
    why = softmax_mismatch(ref, out, keep_of(x, kw.get("row_starts"), kw.get("row_ends"), kw.get("mask")))
    assert why is None, why
    assert softmax_mismatch(ref, windowed_softmax_reference(x, **kw, out_dtype=out_dtype)) is None


def test_empty_and_nonfinite_rows_match_eager_nans():
    # rows: empty window; all -inf in the window; +inf in the window; NaN in the window; NaN only outside
    x = torch.randn(5, 20)
    x[1, 4:9] = NEG_INF
    x[2, 6] = float("inf")
    x[3, 7] = float("nan")
    x[4, 0] = float("nan")
    s = torch.tensor([5, 4, 4, 4, 4])
    e = torch.tensor([5, 9, 9, 9, 9])
    out = windowed_softmax_triton(x.to(DEVICE), s.to(DEVICE), e.to(DEVICE), block=4)
    ref = eager(x, s, e)
    assert ref[:4].isnan().all() and not ref[4].isnan().any()  # eager's behaviour, which the op copies
    assert softmax_mismatch(ref, out.cpu()) is None


def test_outside_window_never_read():
    # NaN everywhere outside the window: a kernel that read (and exp'd) it would give NaN rows.
    n = 300
    x = torch.full((3, n), float("nan"))
    s, e = torch.tensor([10, 0, 250]), torch.tensor([138, 128, 300])
    for i in range(3):
        x[i, s[i]:e[i]] = torch.randn(int(e[i] - s[i]))
    out = windowed_softmax_triton(x.to(DEVICE), s.to(DEVICE), e.to(DEVICE), block=16).cpu()
    assert not out.isnan().any()
    assert (out.sum(-1) - 1).abs().max() < 1e-5
    assert softmax_mismatch(eager(x, s, e), out, keep_of(x, s, e)) is None


@pytest.mark.parametrize("batch", [(2, 3), (1,), ()])
def test_batch_dims_and_broadcast_bounds(batch):
    g = torch.Generator().manual_seed(0)
    n = 40
    x = torch.randn(*batch, n, generator=g).to(DEVICE)
    e = torch.randint(0, n + 1, batch[-1:], generator=g).to(DEVICE)  # one bound per last batch index
    s = (e - 7).to(DEVICE)
    out = windowed_softmax_triton(x, s, e, block=16)
    assert out.shape == (*batch, n)
    assert softmax_mismatch(eager(x, s, e), out, keep_of(x, s, e)) is None


def test_non_contiguous_scores():
    x = torch.randn(40, 6).to(DEVICE).t()  # [6, 40], stride (1, 6)
    e = torch.arange(1, 7, device=DEVICE) * 6
    out = windowed_softmax_triton(x, None, e, block=16)
    assert softmax_mismatch(eager(x, None, e), out, keep_of(x, None, e)) is None


@pytest.mark.skipif(not CUDA, reason="the benchmark shape runs only on the device")
def test_sliding_window_8192():
    t, w = 8192, 128
    x = torch.randn(t, t, device="cuda")
    q = torch.arange(t, device="cuda")
    out = torch.ops.dsa_inductor.windowed_softmax(x, q - w + 1, q + 1, None, torch.float32)
    assert softmax_mismatch(eager(x, q - w + 1, q + 1), out, keep_of(x, q - w + 1, q + 1)) is None


@pytest.mark.parametrize("kw,err,name", [
    (dict(scores=torch.zeros(3, 8, dtype=torch.int32)), TypeError, "`scores`"),
    (dict(row_starts=torch.zeros(3)), TypeError, "`row_starts`"),
    (dict(row_ends=torch.zeros(3, dtype=torch.int16)), TypeError, "`row_ends`"),
    (dict(mask=torch.zeros(3, 8)), TypeError, "`mask`"),
    (dict(out_dtype=torch.float64), TypeError, "`out_dtype`"),
    (dict(row_ends=torch.zeros(4, dtype=torch.int64)), ValueError, "broadcast"),
])
def test_bad_input_names_the_argument(kw, err, name):
    args = dict(scores=torch.randn(3, 8), row_starts=None, row_ends=None, mask=None, out_dtype=torch.float32)
    args.update(kw)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(err, match=name):
        torch.ops.dsa_inductor.windowed_softmax(*args.values())
    with pytest.raises(err, match=name):
        windowed_softmax_triton(*args.values())


def test_opcheck():
    x = torch.randn(2, 3, 12, device=DEVICE)
    e = torch.tensor([1, 5, 12], device=DEVICE)
    torch.library.opcheck(torch.ops.dsa_inductor.windowed_softmax.default, (x, e - 4, e, None, torch.float32))


@pytest.mark.skipif(not CUDA, reason="verify mode checks the CUDA kernel against eager")
def test_verify_mode_names_rule_and_element(monkeypatch):
    x = torch.randn(4, 64, device="cuda")
    e = torch.tensor([3, 10, 64, 1], device="cuda")
    monkeypatch.setattr(mod, "VERIFY", True)
    torch.ops.dsa_inductor.windowed_softmax(x, None, e, None, torch.float32)
    real = mod.windowed_softmax_triton
    monkeypatch.setattr(mod, "windowed_softmax_triton", lambda *a, **k: real(*a, **k) * 0.5)
    with pytest.raises(AssertionError, match=r"rule windowed_softmax .* element \(0, 0\)"):
        torch.ops.dsa_inductor.windowed_softmax(x, None, e, None, torch.float32)
