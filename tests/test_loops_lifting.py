"""Loop lifting (dsa_inductor.loops): per-token Python loops replaced, for Dynamo only, by vectorized code.

The loops below are written as serving code writes them (DeepSeek-V3.2 indexer FP8 cache read through
``slot_mapping``, vLLM/SGLang style; the causal ``[ks, ke)`` window offsets of indexer prefill).  They are
module-level functions of this (user) module, so ``register_dsa_passes()`` finds them by scanning.
"""

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dsa_inductor
from dsa_inductor import loops, testing
from dsa_inductor.loops import runtime

from conftest import DEVICES

BLOCK, D = 4, 8  # small paged layout: each page row = BLOCK*D fp8 bytes, then BLOCK fp32 scales


# ------------------------------------------------------------------------------------------------- loops
def read_indexer_cache(cache, slot_mapping, block_size: int, D: int):
    def scale_of(page, pos):
        base = block_size * D
        return cache[page, base + pos * 4:base + (pos + 1) * 4].view(torch.float32)

    out = torch.zeros(slot_mapping.shape[0], D, dtype=torch.float32, device=cache.device)
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        page, pos = divmod(slot, block_size)
        out[i] = cache[page, pos * D:(pos + 1) * D].view(torch.float8_e4m3fn).float() * scale_of(page, pos)
    return out


def causal_window_offsets(seq_lens, query_lens):
    ks, ke = [], []
    kv_start = 0
    for seq_len, q_len in zip(seq_lens.tolist(), query_lens.tolist()):
        for t in range(q_len):
            ks.append(kv_start)
            ke.append(kv_start + seq_len - q_len + t + 1)
        kv_start += seq_len
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32)


def gather_rows_range(table, idx, out):
    for i in range(idx.shape[0]):
        j = int(idx[i])
        if j < 0:
            continue
        out[i] = table[j] * 2.0
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


# callers: the substitution applies where compiled code calls the loop function
def indexer_step(cache, slot_mapping, block_size: int, D: int):
    return read_indexer_cache(cache, slot_mapping, block_size, D) * 1.0


def offsets_step(seq_lens, query_lens):
    ks, ke = causal_window_offsets(seq_lens, query_lens)
    return ks, ke - ks


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
    assert "refused near_miss_shifted_write" in rep and "out[i - 1]" in rep
    assert "`break`" in loops.REFUSED[near_miss_break].reason
    assert "mutates `seen`" in loops.REFUSED[near_miss_list_mutation].reason
    assert "out[i - 1]" in loops.REFUSED[near_miss_shifted_write].reason
    assert "refused near_miss_break" in rep and "refused near_miss_list_mutation" in rep
    # eager calls still run the original function object, untouched
    assert read_indexer_cache.__code__.co_name == "read_indexer_cache"


def test_near_misses_left_alone(fresh):
    for fn in (near_miss_shifted_write, near_miss_list_mutation, near_miss_break):
        assert fn not in loops.LIFTED and fn in loops.REFUSED, fn.__name__
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


def test_fp8_cache_read_compile_count_inductor(fresh):
    """20 calls, 16 to 64 requests x varying tokens and padding: at most 2 Inductor compilations."""
    be = CountingBackend(inductor=True)
    step = torch.compile(indexer_step, backend=be)
    rng = random.Random(1)
    pages, block, d = 64, 16, 32
    cache = torch.randint(0, 256, (pages, block * (d + 4)), dtype=torch.uint8)
    for call in range(20):
        reqs = rng.randint(16, 64)
        slots = []
        for _ in range(reqs):
            n = rng.randint(1, 24)
            slots += [rng.randint(0, pages * block - 1) for _ in range(n)] + [-1] * rng.randint(0, 3)  # padding
        sm = torch.tensor(slots, dtype=torch.int64)
        got = step(cache, sm, block, d)
        if call in (0, 1, 19):
            same(got, indexer_step(cache, sm, block, d))
    assert be.n <= 2, be.n


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
def test_offsets_lifted_equals_original_exactly(reqs):
    lifted = loops.lift_function(causal_window_offsets)
    seq = torch.tensor([s for s, _ in reqs], dtype=torch.int64)
    q = torch.tensor([min(s, ql) for s, ql in reqs], dtype=torch.int32)
    want, got = causal_window_offsets(seq, q), lifted.vectorized(seq, q)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_offsets_compile_count_exact(fresh):
    rng = random.Random(2)
    be = CountingBackend()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        f = torch.compile(offsets_step, backend=be)
        for _ in range(20):
            b = rng.randint(16, 64)
            q = torch.tensor([rng.randint(0, 40) for _ in range(b)])
            seq = q + torch.tensor([rng.randint(0, 100) for _ in range(b)])
            for g, w in zip(f(seq, q), offsets_step(seq, q)):
                assert g.dtype == w.dtype and torch.equal(g, w)
    assert be.n <= 2, be.n


def test_offsets_without_scalar_capture_falls_back_correctly(fresh):
    f = torch.compile(offsets_step, backend=CountingBackend())
    seq, q = torch.tensor([5, 9]), torch.tensor([2, 4])
    for g, w in zip(f(seq, q), offsets_step(seq, q)):
        assert torch.equal(g, w)


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
