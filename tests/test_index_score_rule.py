"""Rule index_score under torch.compile: matches, equivalence with eager, and near misses left alone.

Each user function is compiled once with dynamic shapes, then fed hypothesis examples with varying S and T;
the compile count is checked, so a test that silently recompiled per example would fail.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from conftest import DEVICES, matches
from dsa_inductor.testing import index_score_tolerance as tolerance, score_mismatch


# ---- user code, written as model code writes it (not through the rule's own search functions) -------------

def transformers_indexer(q, k, weights):
    # transformers 5.23 DeepseekV32Indexer.forward, verbatim
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * 0.088388
    scores = F.relu(scores)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
    return index_scores


def einsum_scale_after_mulsum(q, k, weights):
    scores = torch.einsum("bshd,btd->bsht", q.float(), k.float())
    scores = scores.relu() * 0.5
    return (scores * weights[..., None]).sum(dim=-2)


def einsum_einsum_no_scale(q, k, weights):
    scores = torch.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()))
    return torch.einsum("bsht,bsh->bst", scores, weights)


def matmul_negative_scale_mulsum(q, k, weights):
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * -0.25)
    return (scores * weights.unsqueeze(-1)).sum(2)


def v4_scorer_transposed_q(q, k, weights):
    # transformers DeepseekV4IndexerScorer.forward; V4's q is a transpose of [B, H, S, D] (not contiguous)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1))
    scores = F.relu(scores) * 0.125
    return (scores * weights.unsqueeze(-1)).sum(dim=2)


CASES = {  # fn -> (variant prefix, scale, scale_after_relu)
    transformers_indexer: ("matmul", 0.088388, False),
    einsum_scale_after_mulsum: ("einsum", 0.5, True),
    einsum_einsum_no_scale: ("einsum", 1.0, False),
    matmul_negative_scale_mulsum: ("matmul", -0.25, False),
    v4_scorer_transposed_q: ("matmul", 0.125, True),
}


@st.composite
def inputs(draw, dtype, device, batch):
    s = draw(st.integers(2, 12))
    t = draw(st.integers(2, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, s, 3, 16, generator=g).to(dtype)
    k = torch.randn(batch, t, 16, generator=g).to(dtype)
    w = torch.randn(batch, s, 3, generator=g)
    return q.to(device), k.to(device), w.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 2), (torch.bfloat16, 2), (torch.float16, 1)])
@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_compiled_equals_eager(fresh, fn, dtype, batch, device):
    prefix, scale, after = CASES[fn]
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()

    @settings(max_examples=8)
    @given(inputs(dtype, device, batch))
    def check(args):
        with torch.no_grad():
            out = compiled(*args)
            eager = fn(*args)
        q, k, w = args
        assert score_mismatch(out, eager, tolerance(q, k, w, scale)) is None

    check()
    got = matches("index_score")
    # batch 1 (Dynamo specializes it) may match a :bs1 variant or, once the contiguity clones are dropped
    # (IndexScoreRule.apply), the general one its graph then equals
    assert any(v.startswith(prefix) and (batch == 1 or not v.endswith(":bs1")) for v in got), got
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then dynamic


def test_fused_op_in_generated_code(fresh):
    q, k, w = torch.randn(2, 6, 3, 16), torch.randn(2, 9, 16), torch.randn(2, 6, 3)
    _, code = run_and_get_code(torch.compile(transformers_indexer), q, k, w)
    src = "\n".join(code)
    assert "dsa_inductor.index_score" in src
    assert "bmm" not in src  # neither [B,S,H,T] scores nor the head reduction is left
    assert "matmul:scale_pre:matmul" in fresh.report()


# ---- near misses: no rule may rewrite these ----------------------------------------------------------------

def nm_gelu(q, k, w):
    scores = F.gelu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * 0.125)
    return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)


def nm_sum_over_rows(q, k, w):
    scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * 0.125)
    return (scores * w[..., None]).sum(dim=1)  # over S, not the heads


def nm_per_head_scale(q, k, w):
    head_scale = torch.linspace(0.5, 1.5, q.shape[2])
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * head_scale[:, None]
    return torch.matmul(w.unsqueeze(-2), F.relu(scores)).squeeze(-2)


def nm_bf16_scores(q, k, w):
    scores = F.relu(torch.einsum("bshd,btd->bsht", q.bfloat16(), k.bfloat16()) * 0.125)  # rounded to bf16
    return (scores * w[..., None]).sum(dim=2)


def nm_scores_reused(q, k, w):
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * 0.125)
    return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2), scores.amax(-1)


def nm_broadcast_weights(q, k, w):
    scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()))
    return (scores * w[0, 0][:, None]).sum(dim=2)  # one weight per head for every row


NEAR_MISSES = [nm_gelu, nm_sum_over_rows, nm_per_head_scale, nm_bf16_scores, nm_scores_reused,
               nm_broadcast_weights]


@pytest.mark.parametrize("fn", NEAR_MISSES, ids=lambda f: f.__name__)
def test_near_miss_not_rewritten(fresh, fn):
    g = torch.Generator().manual_seed(0)
    q, k, w = torch.randn(2, 6, 3, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(2, 6, 3)
    with torch.no_grad():
        out = torch.compile(fn, dynamic=True)(q, k, w)
        ref = fn(q, k, w)
    assert matches("index_score") == {}, matches("index_score")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    from dsa_inductor.report import _STATS

    if fn is not nm_gelu:  # a relu of a batched matmul was seen, and the reason recorded
        assert sum(_STATS["index_score"].rejections.values()) >= 1, _STATS.get("index_score")


# ---- FP8 q/k (DeepSeek's fp8_index written in torch): the op reads the FP8 tensors directly ----------------

def fp8_index_torch(q, k, weights, k_scale):
    # DeepSeek-V3.2 reference semantics: q scale and softmax scale folded into the weights by the caller,
    # relu of the FP8 dot products, weighted head sum, then the per-token k scale
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)))
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
    return index_scores * k_scale.unsqueeze(1)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_q_k_compiled_equals_eager(fresh, device):
    compiled = torch.compile(fp8_index_torch, dynamic=True, fullgraph=True)

    @settings(max_examples=6)
    @given(inputs(torch.float32, device, 2))
    def check(args):
        q, k, w = args
        q8, k8 = (q * 4).to(torch.float8_e4m3fn), (k * 4).to(torch.float8_e4m3fn)
        ks = torch.rand(k.shape[:2], device=device) + 0.1
        with torch.no_grad():
            out = compiled(q8, k8, w, ks)
            eager = fp8_index_torch(q8, k8, w, ks)
        assert score_mismatch(out, eager, tolerance(q8, k8, w, 1.0, k_scale=ks)) is None

    check()
    assert any(v.startswith("matmul_upcast:scale_none") for v in matches("index_score")), matches("index_score")


def test_gpu_batch1_mm_form_matches(fresh, gpu_bmm_to_mm):
    """The pass undoes the GPU's batch-1 ``mm`` form while matching."""
    seen = []

    def spy(graph):
        seen.append({str(n.target) for n in graph.nodes})

    q, k, w = torch.randn(1, 5, 3, 16).half(), torch.randn(1, 7, 16).half(), torch.randn(1, 5, 3)
    with torch._inductor.config.patch(post_grad_custom_post_pass=spy), torch.no_grad():
        out = torch.compile(einsum_scale_after_mulsum, dynamic=True, fullgraph=True)(q, k, w)
    assert score_mismatch(out, einsum_scale_after_mulsum(q, k, w), tolerance(q, k, w, 0.5)) is None
    assert matches("index_score") == {"einsum_upcast:scale_post:mulsum:bs1": 1}, matches("index_score")
    assert "aten.bmm.default" not in seen[0] and "dsa_inductor.index_score.default" in seen[0], seen


def _compiled_post_grad_targets(fn, *args):
    """Compile ``fn`` (dynamic), check it equals eager on ``args``, return each graph's node targets as the
    post-grad passes left them (after ours)."""
    seen = []
    with torch._inductor.config.patch(post_grad_custom_post_pass=lambda g: seen.append(
            [str(n.target) for n in g.nodes])), torch.no_grad():
        out = torch.compile(fn, dynamic=True, fullgraph=True)(*args)
    torch.testing.assert_close(out, fn(*args))
    return seen


def test_gpu_batch1_mm_form_is_restored_when_nothing_matches(fresh, gpu_bmm_to_mm):
    """A batch-1 mm that no rule takes leaves the pass in Inductor's mm form."""
    def plain_bmm(q, k, weights):  # a near miss: gelu, not relu
        return torch.einsum("bsht,bsh->bst", F.gelu(torch.einsum("bshd,btd->bsht", q, k)), weights)

    seen = _compiled_post_grad_targets(plain_bmm, torch.randn(1, 5, 3, 16), torch.randn(1, 7, 16),
                                       torch.randn(1, 5, 3))
    assert matches("index_score") == {}
    # q . k (batch 1) stays Inductor's mm; the head reduction (batch B*S) is a bmm either way
    assert seen[0].count("aten.mm.default") == 1 and seen[0].count("aten.bmm.default") == 1, seen


def test_contiguity_clone_restored_when_nothing_matches(fresh):
    """The rule drops the contiguity clone of a transposed q before matching; a near miss gets it back."""
    def over_rows_transposed_q(q, k, weights):  # the weighted sum over S (dim 1), not the heads
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        scores = F.relu(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)))
        return (scores * weights.unsqueeze(-1)).sum(dim=1)

    seen = _compiled_post_grad_targets(over_rows_transposed_q, torch.randn(2, 5, 3, 16), torch.randn(2, 7, 16),
                                       torch.randn(2, 5, 3))
    assert matches("index_score") == {}
    assert seen[0].count("aten.clone.default") >= 1, seen
