"""Issue 6, bar 4: every compiled example also runs under CUDA graphs (``mode="reduce-overhead"``) and
matches eager.  The examples are the bench idioms (bench/bench_*.py, at small sizes) and transformers'
DeepseekV32ForCausalLM, GLM-5 and DeepSeek-V4; each must also have been rewritten (a fused op inside the
graph).  CUDA only.
"""

import pathlib
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

_ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(_ROOT / "bench"))

import bench_gather_dequant as bg  # noqa: E402
import bench_index_score as bi  # noqa: E402
import bench_mask_topk as bm  # noqa: E402
import bench_windowed_softmax as bw  # noqa: E402
from dsa_inductor.lowerings.gather_dequant import gather_dequant_reference  # noqa: E402
from dsa_inductor.lowerings.masked_topk import masked_logits, topk_mismatch  # noqa: E402
from conftest import load_example  # noqa: E402
from dsa_inductor.report import match_count  # noqa: E402


def _graphed(fn):
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def _run_graphed(fn, args, calls=4):
    """Warm-up, record, then replays; every output is checked (a replay overwrites the previous one)."""
    compiled = _graphed(fn)
    return [_clone(compiled(*args)) for _ in range(calls)]


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else type(x)(_clone(o) for o in x)


def test_mask_topk_range(fresh):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(512, 1024, device="cuda", generator=g)
    ends = torch.arange(1, 513, device="cuda", dtype=torch.int32)
    starts = (ends - 700).clamp_min(0)
    for out in _run_graphed(bm.indexer_range_topk, (logits, starts, ends, 64)):
        why = topk_mismatch(masked_logits(logits, starts, ends), 64, None, out, sorted=True, need_values=False)
        assert why is None, why
    assert match_count() >= 1


def test_topk_to_scatter_mask(fresh):
    g = torch.Generator(device="cuda").manual_seed(1)
    scores = torch.randn(1, 256, 256, device="cuda", generator=g)
    mask = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()[None]
    eager = bm.indexer_topk_to_mask(scores, mask, 32)
    for out in _run_graphed(bm.indexer_topk_to_mask, (scores, mask, 32)):
        assert torch.equal(out, eager)
    assert match_count() >= 1


def test_gather_dequant(fresh):
    g = torch.Generator(device="cuda").manual_seed(2)
    cache = torch.randint(0, 256, (4096, 128), dtype=torch.uint8, device="cuda", generator=g)
    cache[(cache & 0x7F) == 0x7F] = 0
    scale = torch.rand(4096, device="cuda", generator=g)
    slots = torch.randint(-1, 4096, (1000,), device="cuda", generator=g)
    ref = gather_dequant_reference(cache, scale.unsqueeze(-1), slots, zero_negative=True)
    for out in _run_graphed(bg.decode_read, (cache, scale, slots)):
        assert torch.equal(out, ref)
    assert match_count() >= 1


def test_windowed_softmax(fresh):
    g = torch.Generator(device="cuda").manual_seed(3)
    scores = torch.randn(300, 300, device="cuda", generator=g)
    eager = bw.sliding_window_softmax(scores, 17)
    for out in _run_graphed(bw.sliding_window_softmax, (scores, 17)):
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-5)
    assert match_count() >= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_windowed_attention(fresh, dtype):
    from dsa_inductor.report import _STATS

    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1000, 128, device="cuda", generator=g).to(dtype) for _ in range(3))
    eager = bw.sliding_window_attention(q, k, v, 37)
    for out in _run_graphed(bw.sliding_window_attention, (q, k, v, 37)):
        why = bw._check_attention((q, k, v, 37), eager, out)
        assert why is None, why
    assert sum(_STATS["windowed_attention"].matches.values()) >= 1


def test_index_score(fresh):
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(1, 200, 8, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 300, 128, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, 200, 8, device="cuda", generator=g)
    eager = bi.transformers_index_score(q, k, w)
    for out in _run_graphed(bi.transformers_index_score, (q, k, w)):
        why = bi._check((q, k, w), eager, out)
        assert why is None, why
    assert match_count() >= 1


def _check_graphed_model(model, ids):
    """A causal LM under CUDA graphs: four calls (warm-up, record, replays), each's logits == eager (fp32)."""
    with torch.no_grad():
        eager = model(ids).logits
        compiled = _graphed(model)
        for _ in range(4):
            torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-4, rtol=1e-4)
    assert match_count() >= 1


def test_transformers_model(fresh):
    pytest.importorskip("transformers", minversion="5.23")
    example = load_example("deepseek_v32_prefill")
    # Every layer dense: transformers' MoE layer (its fp32 grouped-matmul fallback) calls offs.tolist(),
    # which no CUDA graph can capture, with or without dsa_inductor.  The indexer is in every layer.
    cfg = example.small_config(False)
    cfg.first_k_dense_replace = cfg.num_hidden_layers
    cfg.mlp_layer_types = ["dense"] * cfg.num_hidden_layers  # (derived from the above only at __init__)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = example.DeepseekV32ForCausalLM(cfg).to(device="cuda", dtype=torch.float32).eval()
    _check_graphed_model(model, torch.randint(0, cfg.vocab_size, (2, 96), device="cuda"))


@pytest.mark.parametrize("name", ["glm5", "deepseek_v4"])
def test_glm5_deepseek_v4_models(fresh, name):
    """examples/glm5_deepseek_v4_prefill.py's two models under CUDA graphs.  Their MoE layers run the
    `batched_mm` experts (transformers' default fp32 path calls ``offs.tolist()``, which no graph captures)."""
    pytest.importorskip("transformers", minversion="5.23")
    try:
        model, ids = load_example("glm5_deepseek_v4_prefill").build(name)
    except ImportError as e:
        pytest.skip(f"transformers has no {name}: {e}")
    model.set_experts_implementation("batched_mm")
    _check_graphed_model(model, ids)


def test_serving_fp8_cache_read_loop(fresh):
    """examples/serving_loops.py's per-token FP8 read, lifted: its graph (gather_dequant inside, no
    `.tolist()` left) is captured and replayed, and equals the eager loop bit for bit."""
    sys.path.insert(0, str(_ROOT / "examples"))
    import serving_loops
    from dsa_inductor import loops
    from dsa_inductor.report import _STATS

    assert serving_loops.read_indexer_cache in loops.LIFTED
    block, d, pages = 16, 64, 40
    g = torch.Generator(device="cuda").manual_seed(6)
    cache = torch.randint(0, 256, (pages, block * (d + 4)), dtype=torch.uint8, device="cuda", generator=g)
    cache[:, : block * d] &= 0x77  # no fp8 NaN bytes, so torch.equal compares values
    cache[:, block * d:] = torch.rand(pages, block, device="cuda", generator=g).view(torch.uint8).view(pages, -1)
    slots = torch.randint(-1, pages * block, (300,), device="cuda", generator=g)

    def step(c, s):
        return serving_loops.indexer_step(c, s, block, d)

    eager = step(cache, slots)
    for out in _run_graphed(step, (cache, slots)):
        assert torch.equal(out, eager)
    assert sum(_STATS["gather_dequant"].matches.values()) >= 1
