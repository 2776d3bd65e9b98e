"""Loop lifting (dsa_inductor.loops): per-token Python loops replaced, for Dynamo only, by vectorized code.

The serving loops (DeepSeek-V3.2 indexer FP8 cache read through ``slot_mapping``, vLLM/SGLang style; the
causal ``[ks, ke)`` window offsets of indexer prefill) live in ``examples/serving_loops.py``, shared with
``bench/bench_loops.py``; the near misses and a ``range`` loop are module-level functions of this (user)
module.  ``register_dsa_passes()`` finds all of them by scanning.
"""

import os
import random
import sys

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import dsa_inductor
from dsa_inductor import loops, testing
from dsa_inductor.loops import runtime

from conftest import DEVICES, matches

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import serving_loops  # noqa: E402
from serving_loops import causal_window_offsets, indexer_step, offsets_step, read_indexer_cache  # noqa: E402

BLOCK, D = 4, 8  # small paged layout: each page row = BLOCK*D fp8 bytes, then BLOCK fp32 scales
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------- loops
def gather_rows_range(table, idx, out):
    for i in range(idx.shape[0]):
        j = int(idx[i])
        if j < 0:
            continue
        out[i] = table[j] * 2.0
    return out


def tile_rows(table, idx, out):
    # the slice start is c + w * s with s = j % 3 and c >= w: tile s of the [M, 4] view from column 6
    for i, j in enumerate(idx.tolist()):
        r, s = divmod(j, 3)
        out[i] = table[r, 6 + s * 4:6 + (s + 1) * 4]
    return out


def slice_rows(table, idx, out):
    # the start is a plain loop int (not a remainder): gathered column by column
    for i, j in enumerate(idx.tolist()):
        out[i] = table[0, j:j + 4]
    return out


# near misses: each must be refused, and compiled must still equal eager
def near_miss_shifted_write(cache, slot_mapping, D: int):
    out = torch.zeros(slot_mapping.shape[0] + 1, D, device=cache.device)
    for i, slot in enumerate(slot_mapping.tolist()):
        out[i - 1] = cache[slot, :D].float()
    return out


def near_miss_list_mutation(cache, slot_mapping, D: int):
    out = torch.zeros(slot_mapping.shape[0], D, device=cache.device)
    seen = []
    for i, slot in enumerate(slot_mapping.tolist()):
        seen.append(slot)
        out[i] = cache[slot, :D].float()
    return out, len(seen)


def near_miss_break(cache, slot_mapping, D: int):
    out = torch.zeros(slot_mapping.shape[0], D, device=cache.device)
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            break
        out[i] = cache[slot, :D].float()
    return out


# ------------------------------------------------------------------------------------------------- helpers
class CountingBackend:
    """Counts Dynamo compilations; runs the graph as traced (or through Inductor)."""

    def __init__(self, inductor=False):
        self.n, self.inductor = 0, inductor

    def __call__(self, gm, example_inputs):
        self.n += 1
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward


def make_cache(pages, device="cpu", seed=0):
    """uint8 [pages, BLOCK*D + BLOCK*4]: random fp8 bytes (NaNs included), then random fp32 scale bytes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (pages, BLOCK * (D + 4)), dtype=torch.uint8, generator=g).to(device)


def same(a, b):
    testing.assert_exact(a, b)  # bit-equal (dsa_inductor.testing: loop lifting's contract)


slots_strategy = st.integers(1, 6).flatmap(lambda pages: st.tuples(
    st.just(pages),
    st.lists(st.one_of(st.sampled_from([-1, -7, 0, BLOCK - 1, pages * BLOCK - 1, (pages - 1) * BLOCK] +
                                       ([BLOCK, 2 * BLOCK - 1] if pages > 1 else [pages * BLOCK])),
                       st.integers(-3, pages * BLOCK - 1)), min_size=0, max_size=40),
    st.sampled_from([torch.int32, torch.int64])))


# ------------------------------------------------------------------------------------------------- tests
def test_found_by_scanning_and_reported(fresh):
    assert read_indexer_cache in loops.LIFTED and loops.LIFTED[read_indexer_cache].plan.kinds == ["map"]
    assert causal_window_offsets in loops.LIFTED and loops.LIFTED[causal_window_offsets].plan.kinds == ["ragged"]
    assert gather_rows_range in loops.LIFTED
    rep = dsa_inductor.report()
    assert "lifted read_indexer_cache" in rep and "lifted causal_window_offsets" in rep
    assert "unbacked size" in rep and "capture_scalar_outputs" not in rep
    assert "refused near_miss_shifted_write" in rep and "out[i - 1]" in rep
    assert "refused near_miss_break" in rep and "refused near_miss_list_mutation" in rep
    # the loops of this module's tests (over calls, examples) are not per-token: neither lifted nor reported
    assert not [r for r in loops.REFUSED.values() if r.name.startswith("test_")
                and r.location.startswith("tests/test_loops_lifting.py")], dsa_inductor.report()
    # eager calls still run the original function object, untouched
    assert read_indexer_cache.__code__.co_name == "read_indexer_cache"


def test_near_misses_left_alone_with_reason(fresh):
    """out[i-1] writes, a list mutated and used after the loop, a `break`: refused, and compiled == eager."""
    reasons = {near_miss_shifted_write: "only `out[i]` with the loop index i",
               near_miss_list_mutation: "mutates `seen`",
               near_miss_break: "`break`: the trip count depends on the data"}
    for fn, reason in reasons.items():
        assert fn not in loops.LIFTED and fn in loops.REFUSED, fn.__name__
        assert reason in loops.REFUSED[fn].reason, loops.REFUSED[fn].reason
        assert f"refused {fn.__name__} at " in dsa_inductor.report()
    cache = torch.randn(6, D)
    sm = torch.tensor([3, 0, -1, 5])
    for fn in (near_miss_shifted_write, near_miss_break):
        got = torch.compile(fn, backend=CountingBackend())(cache, sm, D)
        same(got, fn(cache, sm, D))
    got = torch.compile(near_miss_list_mutation, backend=CountingBackend())(cache, sm.abs(), D)
    want = near_miss_list_mutation(cache, sm.abs(), D)
    same(got[0], want[0])
    assert got[1] == want[1]


@settings(max_examples=200)
@given(slots_strategy, st.booleans())
@example((3, [-1, -2, -7, -1], torch.int32), False)  # all slots invalid
@example((3, [-1, -2, -7, -1], torch.int64), True)
@example((2, [], torch.int64), False)  # empty batch
@example((2, [], torch.int32), True)
@example((3, [0, BLOCK - 1, BLOCK, 2 * BLOCK - 1, 2 * BLOCK, 3 * BLOCK - 1], torch.int32), False)  # page boundaries
@example((3, [3 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK - 1, BLOCK, BLOCK - 1, 0], torch.int64), True)
def test_fp8_cache_read_lifted_equals_original(case, slots_on_cpu):
    pages, slots, dtype = case
    lifted = loops.lift_function(read_indexer_cache)
    assert isinstance(lifted, loops.Lifted)
    for device in DEVICES:
        cache = make_cache(pages, device, seed=len(slots))
        sm = torch.tensor(slots, dtype=dtype, device="cpu" if slots_on_cpu else device)
        try:
            want = read_indexer_cache(cache, sm, BLOCK, D)
        except IndexError:  # a slot past the last page: the lifted version must fail too
            if device == "cpu":  # on CUDA it is a device-side assert, which would poison the context
                with pytest.raises((IndexError, RuntimeError)):
                    lifted.vectorized(cache, sm, BLOCK, D)
            continue
        same(lifted.vectorized(cache, sm, BLOCK, D), want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_fp8_cache_read_slots_and_cache_on_different_devices_meta(dtype):
    """CPU slot_mapping, cache on another device: the device plumbing of the lifted code (slots, masks and
    indices moved to the cache's device, output on the cache's device) without a GPU, on the `meta` device
    (shapes, dtypes and devices only: meta tensors have no values).  The value check is the CUDA test below."""
    lifted = loops.lift_function(read_indexer_cache)
    cache = torch.empty(5, BLOCK * (D + 4), dtype=torch.uint8, device="meta")
    for slots in ([0, -1, 5 * BLOCK - 1, BLOCK], [], [-1, -1]):
        sm = torch.tensor(slots, dtype=dtype)
        want = read_indexer_cache(cache, sm, BLOCK, D)
        got = lifted.vectorized(cache, sm, BLOCK, D)
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device) == \
            ((len(slots), D), torch.float32, torch.device("meta"))
        assert sm.device.type == "cpu"  # the caller's slot_mapping is left where it was


@pytest.mark.skipif(not CUDA, reason="needs CUDA: a CPU slot_mapping with the cache on the GPU")
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_fp8_cache_read_cpu_slots_cuda_cache(fresh, dtype):
    cache = make_cache(6, "cuda", seed=3)
    lifted = loops.lift_function(read_indexer_cache)
    step = torch.compile(indexer_step, backend=CountingBackend(inductor=True), dynamic=True)
    for slots in ([0, -1, 6 * BLOCK - 1, BLOCK, BLOCK - 1], [-1] * 5, [], list(range(6 * BLOCK))):
        sm = torch.tensor(slots, dtype=dtype)  # stays on the CPU
        want = read_indexer_cache(cache, sm, BLOCK, D)
        assert want.device.type == "cuda"
        same(lifted.vectorized(cache, sm, BLOCK, D), want)
        same(step(cache, sm, BLOCK, D), indexer_step(cache, sm, BLOCK, D))


def test_fp8_cache_read_compiled_many_examples(fresh):
    """One dynamic compile, many examples: all-invalid, empty, page boundaries, int32/int64, CPU slots."""
    rng = random.Random(0)
    for device in DEVICES:
        for dtype in (torch.int32, torch.int64):  # dtype is static: one graph family per dtype
            torch._dynamo.reset()
            be = CountingBackend()
            step = torch.compile(indexer_step, backend=be, dynamic=True)
            pages = 5
            cache = make_cache(pages, device)
            examples = [[-1] * 7, [0, BLOCK - 1, BLOCK, pages * BLOCK - 1], [-1, 3, -1], []]
            examples += [[rng.randint(-4, pages * BLOCK - 1) for _ in range(rng.randint(1, 50))] for _ in range(30)]
            for k, slots in enumerate(examples):
                sm = torch.tensor(slots, dtype=dtype, device="cpu" if k % 3 == 0 else device)
                same(step(cache, sm, BLOCK, D), indexer_step(cache, sm, BLOCK, D))
            # one dynamic graph, plus Dynamo's 0/1 specializations (empty batch, one slot); on a GPU the
            # slot_mapping alternates between CPU and the device, a static property: twice that
            assert be.n <= (3 if device == "cpu" else 6), be.n


# 16 to 64 requests x up to 1024 tokens on a GPU; on the CPU the same property at fewer tokens per request
MAX_TOKENS = 1024 if CUDA else 48


def _serving_batch(rng, max_tokens):
    """(requests, tokens per request): 16 to 64 requests of 1..max_tokens tokens."""
    return [rng.randint(1, max_tokens) for _ in range(rng.randint(16, 64))]


def test_fp8_cache_read_compile_count_inductor(fresh):
    """The loop as written, 20 calls of 16 to 64 requests x varying tokens and padding (no config set):
    at most 2 Inductor compilations, outputs equal to the eager loop."""
    assert not torch._dynamo.config.capture_scalar_outputs
    device = DEVICES[-1]
    be = CountingBackend(inductor=True)
    step = torch.compile(indexer_step, backend=be)
    rng = random.Random(1)
    block, d = 16, 32
    pages = 64 * MAX_TOKENS // block + 1
    cache = torch.randint(0, 256, (pages, block * (d + 4)), dtype=torch.uint8).to(device)
    for call in range(20):
        slots = []
        for n in _serving_batch(rng, MAX_TOKENS):
            slots += [rng.randint(0, pages * block - 1) for _ in range(n)] + [-1] * rng.randint(0, 7)  # padding
        sm = torch.tensor(slots, dtype=torch.int64, device=device)
        got = step(cache, sm, block, d)
        if call in (0, 1, 19):
            same(got, indexer_step(cache, sm, block, d))
    assert be.n <= 2, be.n
    # the lifted read is then caught by the gather-dequant rule: FP8 bytes and inline fp32 scale bytes read
    # as tile `pos` of the page row's [B, D] / [B, 4] views, indexed by the same (page, pos) nodes
    assert matches("gather_dequant") == {"u8_after:idx2:keepdim:f32_bytes": be.n}, dsa_inductor.report()
    assert "drop in the kernel" in dsa_inductor.report()  # the skipped rows' zeros: no where pass after it


@pytest.mark.parametrize("width", [18, 21, 17])
def test_tile_and_slice_gathers_equal_original(width):
    """Slices at ``c + w * (j % m)`` read one tile of a [M, w] view (one index per row); a slice past the
    row (width 17: tile 2 needs columns 14..17) raises in both, as the original's short slice fails
    to fill ``out[i]``; negative rows wrap as in the loop."""
    lifted = loops.lift_function(tile_rows)
    assert "('tile'," in lifted.plan.source and "('slice'," in loops.lift_function(slice_rows).plan.source
    g = torch.Generator().manual_seed(width)
    table = torch.randn(5, width, generator=g)
    idx = torch.tensor([0, 1, 2, 14, -1, -15, 7, 8])
    try:
        want = tile_rows(table, idx, torch.zeros(8, 4))
    except RuntimeError:
        assert width < 18
        with pytest.raises(RuntimeError):
            lifted.vectorized(table, idx, torch.zeros(8, 4))
    else:
        same(lifted.vectorized(table, idx, torch.zeros(8, 4)), want)
    starts = torch.tensor([0, width - 4, 3])
    same(loops.lift_function(slice_rows).vectorized(table, starts, torch.zeros(3, 4)),
         slice_rows(table, starts, torch.zeros(3, 4)))


def test_range_loop_with_item(fresh):
    be = CountingBackend()
    f = torch.compile(gather_rows_range, backend=be)
    table = torch.randn(9, 3)
    for n in (5, 11, 17, 3):
        idx = torch.randint(-2, 9, (n,))
        same(f(table, idx, torch.zeros(n, 3)), gather_rows_range(table, idx, torch.zeros(n, 3)))
    assert be.n <= 2, be.n


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(-2, 12)), min_size=0, max_size=10))
@example([])  # empty batch
@example([(5, 0), (0, 0), (7, 0)])  # every request padded (no query token)
@example([(4, 4), (9, 1), (0, 0), (3, 3)])
def test_offsets_lifted_equals_original_exactly(reqs):
    lifted = loops.lift_function(causal_window_offsets)
    seq = torch.tensor([s for s, _ in reqs], dtype=torch.int64)
    q = torch.tensor([min(s, ql) for s, ql in reqs], dtype=torch.int32)
    want, got = causal_window_offsets(seq, q), lifted.vectorized(seq, q)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.device == w.device and torch.equal(g, w)


def test_offsets_compile_count_without_config(fresh):
    """20 calls of 16 to 64 requests x up to 1024 tokens, padded requests and context, no Dynamo config:
    one graph per call (the output length is an unbacked size), at most 2 compilations, exact outputs."""
    from torch._dynamo.utils import counters

    assert not torch._dynamo.config.capture_scalar_outputs
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    counters.clear()
    rng = random.Random(2)
    be = CountingBackend(inductor=True)
    f = torch.compile(offsets_step, backend=be)
    for call in range(20):
        q = torch.tensor([n if rng.random() > 0.15 else 0 for n in _serving_batch(rng, 1024)])  # 0: padded
        seq = q + torch.tensor([rng.randint(0, 2048) for _ in range(q.shape[0])])  # context before the queries
        for g, w in zip(f(seq, q), offsets_step(seq, q)):
            assert g.dtype == w.dtype and torch.equal(g, w)
    assert be.n <= 2, be.n
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_offsets_fullgraph_and_scalar_capture(fresh):
    """With fullgraph=True (or capture_scalar_outputs) the same single graph: ragged_rows' size allocation
    takes the public ``new_dynamic_size`` path."""
    seq, q = torch.tensor([5, 9, 3]), torch.tensor([2, 4, 0])
    for g, w in zip(torch.compile(offsets_step, fullgraph=True, backend=CountingBackend())(seq, q),
                    offsets_step(seq, q)):
        assert torch.equal(g, w)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        for g, w in zip(torch.compile(offsets_step, backend=CountingBackend())(seq, q), offsets_step(seq, q)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("fn,rule", [(serving_loops.prefill_topk_indices, "mask_topk"),
                                     (serving_loops.prefill_window_softmax, "windowed_softmax")],
                         ids=["topk", "softmax"])
def test_lifted_offsets_feed_the_window_rules(fresh, fn, rule):
    """The lifted offsets loop, then a mask over each token's [ks, ke) and topk / softmax: the graph holds
    the offsets as tensors (unbacked length = the logits' rows), so the mask-then-topk / windowed-softmax
    rule replaces the mask with row bounds.  Two compiles (static, dynamic) across batches of 2 to 6 requests."""
    be = CountingBackend(inductor=True)
    f = torch.compile(fn, backend=be)
    rng = random.Random(5)
    for call in range(12):
        q = [rng.randint(1, 6) for _ in range(rng.randint(2, 6))]  # >= 2 rows, > k keys: no 0/1, min(k, N)
        seq = torch.tensor([n + rng.randint(2, 5) for n in q])  # specializations beyond the dynamic graph
        q = torch.tensor(q)
        logits = torch.randn(int(q.sum()), int(seq.sum()))
        logits[0, 0] = float("nan") if call % 3 == 0 else logits[0, 0]  # a NaN in the window of row 0
        args = (logits, seq, q) + ((4,) if rule == "mask_topk" else ())
        got, want = f(*args), fn(*args)
        if rule == "mask_topk":
            keep = serving_loops._in_window(logits, seq, q)
            testing.assert_topk(logits.masked_fill(~keep, float("-inf")), min(4, logits.shape[-1]), None, got,
                                need_values=False)
        else:
            testing.assert_softmax(want, got)
    assert be.n <= 2, be.n
    assert sum(matches(rule).values()) == be.n, dsa_inductor.report()


def test_ragged_rows_op():
    rid, pos = runtime.ragged_rows(torch.tensor([2, 0, -3, 3]))
    assert rid.tolist() == [0, 0, 3, 3, 3] and pos.tolist() == [0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="reps"):
        runtime.ragged_rows(torch.tensor([[1]]))
    torch.library.opcheck(runtime.ragged_rows, (torch.tensor([1, 4, 0, 2]),),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_verify_mode_catches_a_wrong_lift(fresh, monkeypatch):
    dsa_inductor.register_dsa_passes(verify=True)
    cache = make_cache(3)
    sm = torch.tensor([0, -1, 5, 11])
    step = torch.compile(indexer_step, backend=CountingBackend())
    same(step(cache, sm, BLOCK, D), indexer_step(cache, sm, BLOCK, D))  # correct lift passes
    torch._dynamo.reset()
    monkeypatch.setattr(runtime, "keep", lambda valid, cond: valid)  # a wrong translation of `continue`
    with pytest.raises(loops.LoopVerifyError, match="read_indexer_cache"):
        torch.compile(indexer_step, backend=CountingBackend())(cache, sm, BLOCK, D)


def test_unregister_restores_stock_behaviour(fresh):
    dsa_inductor.unregister_dsa_passes()
    assert not runtime.ENABLED and "inactive" in dsa_inductor.report()
    be = CountingBackend()
    f = torch.compile(indexer_step, backend=be)
    cache = make_cache(3)
    for sm in (torch.tensor([0, 1]), torch.tensor([2, -1, 4])):
        same(f(cache, sm, BLOCK, D), indexer_step(cache, sm, BLOCK, D))
    assert be.n >= 2  # the loop is traced per batch again
    dsa_inductor.register_dsa_passes()
