"""No recompiles: sweeping the sequence length T over 10 values compiles each example model at most twice.

Plain ``torch.compile(model)`` (default ``dynamic=None``, default duck sizing): the first T compiles a
static graph, the second a dynamic one, and every later T must reuse it.  Graphs are counted with
``CompileCounterWithBackend("inductor")``; the rules must have fired (caches off, so the pass really ran).
T stays >= 2 (Dynamo specializes 0 and 1 by design) and avoids the other input sizes, so that neither
0/1 specialization nor duck sizing is what the sweep measures.
"""


import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dsa_inductor
from conftest import load_example, matches
from dsa_inductor import testing
from dsa_inductor.lowerings.gather_dequant import quantize_e4m3
from test_properties import gather_slots, index_matmul, softmax_range, topk_range, topk_keep_mask_int32

T_SWEEP = [11, 17, 23, 29, 34, 40, 47, 53, 58, 64]


@pytest.fixture
def plain():
    """As ``fresh`` but with Dynamo's default shape settings (duck sizing on), as users compile."""
    torch._dynamo.reset()
    dsa_inductor.reset_report()
    with torch._inductor.config.patch(force_disable_caches=True):
        dsa_inductor.register_dsa_passes()
        yield
        dsa_inductor.unregister_dsa_passes()
    torch._dynamo.reset()


class Toy(torch.nn.Module):
    """A toy model around one rule's idiom: a projection makes the per-T input, the idiom consumes it."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        self.proj = torch.nn.Linear(16, 16)
        self.wq, self.wk, self.ww = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 2)

    def forward(self, h, *extra):
        x = self.proj(h)  # [B, T, 16]
        if self.rule == "mask_topk":
            scores = x @ x.transpose(1, 2)  # [B, T, T]
            return topk_range(scores, *extra)
        if self.rule == "windowed_softmax":
            return softmax_range(x @ x.transpose(1, 2), *extra)
        if self.rule == "index_score":
            b, t, _ = h.shape  # as transformers' DeepseekV32Indexer: q, k and head weights projected
            return index_matmul(self.wq(h).view(b, t, 2, 8), self.wk(h), self.ww(h))
        cache, scale, slots = extra
        # row t of the gathered bf16 keys scaled by position t's mean projection (a product: Inductor may
        # skip rounding the fused bf16 intermediate, as torch 2.11 does, which a product keeps within the
        # relative bf16 tolerance; a sum could cancel to an absolute error at any scale)
        return gather_slots(cache, scale, slots) * x.mean(dim=(0, 2))[:, None].to(torch.bfloat16)


def _toy_inputs(rule, t, g):
    b = 3
    h = torch.randn(b, t, 16, generator=g)
    if rule in ("mask_topk", "windowed_softmax"):
        ks = torch.randint(0, t, (b, t), generator=g)
        return h, ks, ks + 5
    if rule == "index_score":
        return (h,)
    q, s = quantize_e4m3(torch.randn(48, 32, generator=g))
    return h, q, s.squeeze(-1), torch.randint(-1, 48, (t,), generator=g)


@pytest.mark.parametrize("rule", ["mask_topk", "windowed_softmax", "index_score", "gather_dequant"])
def test_toy_model_sweep_compiles_at_most_twice(plain, rule):
    model = Toy(rule).eval()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt)
    g = torch.Generator().manual_seed(0)
    for t in T_SWEEP:
        args = _toy_inputs(rule, t, g)
        with torch.no_grad():
            out, ref = compiled(*args), model(*args)
        out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
        if rule == "mask_topk":
            continue  # values of a top-k over computed scores: checked by the property suite
        testing.assert_close(out, ref, **({} if out.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))
    assert cnt.frame_count <= 2, f"{cnt.frame_count} compiles for {len(T_SWEEP)} sequence lengths"
    assert sum(matches(rule).values()) >= 1, matches(rule)


transformers = pytest.importorskip("transformers", minversion="5.23")
example = load_example("deepseek_v32_prefill")


def test_deepseek_v32_sweep_compiles_at_most_twice(plain):
    """transformers' DeepseekV32ForCausalLM (examples/deepseek_v32_prefill.py's small random config, cut to
    one dense layer for CI time: the DSA indexer and attention are in every layer)."""
    cfg = example.small_config(False)
    cfg.num_hidden_layers, cfg.first_k_dense_replace = 1, 1
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(cfg).eval()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt)
    g = torch.Generator().manual_seed(0)
    for t in [cfg.index_topk + d for d in (3, 7, 12, 18, 21, 26, 33, 39, 44, 50)]:
        ids = torch.randint(0, cfg.vocab_size, (2, t), generator=g)
        with torch.no_grad():
            out = compiled(ids).logits
            ref = model(ids).logits
        testing.assert_close(out, ref, **({} if out.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))
    assert cnt.frame_count <= 2, f"{cnt.frame_count} compiles for 10 sequence lengths"
    assert sum(matches("mask_topk").values()) >= 1, matches("mask_topk")
