"""The rules fire inside transformers' GLM-5 and DeepSeek-V4 (code we did not write), and logits match eager.

Skipped where the installed transformers lacks the model (both are in 5.25).
"""

import pathlib

import pytest

from conftest import load_example

from dsa_inductor.report import _STATS

pytest.importorskip("transformers", minversion="5.23")

example = load_example("glm5_deepseek_v4_prefill")


def _build(name, **kw):
    try:
        return example.build(name, **kw)
    except ImportError as e:
        pytest.skip(f"transformers has no {name}: {e}")


def test_glm5_indexer_and_sparse_attention(fresh):
    model, ids = _build("glm5")
    res = example.compare(model, ids, with_stock=False)  # asserts logits == eager (fp32, 1e-4)
    report = res["report"]
    stats = _STATS
    assert sum(stats["index_score"].matches.values()) == 2, report  # the two "full" layers' indexers
    assert sum(stats["sparse_attention"].matches.values()) == 3, report  # every layer, "shared" included
    assert any("modeling_glm_moe_dsa.py" in loc for loc in stats["sparse_attention"].locations), report
    assert res["code_paths"], "no generated code calls a dsa_inductor op"


def test_deepseek_v4_indexer_and_attention(fresh):
    """V4's CSA indexer: a transposed-q score, an `arange >= row_ends` drop mask, picks past the end -> -1, then
    a scattered block bias; all of it compiles to index_score (bounded) + an unsorted masked_topk.  V4's
    attention in all three layer kinds (an additive finfo.min window mask of the config's constant width, the
    per-head sink cat'ed, max subtracted, softmax, sink dropped, one shared K = V head) compiles to sparse_attention
    over each query's key list with the sink: its window, then in the compressed layers (whose mask cats the
    window's with the compressor's block bias) the compressed keys under their causal bounds (HCA) or the
    indexer's picks (CSA)."""
    model, ids = _build("deepseek_v4")
    res = example.compare(model, ids, with_stock=False)
    report = res["report"]
    stats = _STATS
    assert any("modeling_deepseek_v4.py" in loc for loc in stats["index_score"].locations), report
    assert stats["mask_topk"].matches.get("causal_drop:sorted:indices") == 1, report
    assert "sorted -> unsorted" in report and "index score -> range top-k" in report, report
    code = "\n".join(pathlib.Path(p).read_text() for p in res["code_paths"])
    assert "dsa_inductor.index_score" in code and "dsa_inductor.masked_topk" in code
    wa = stats["windowed_attention"]
    assert wa.matches == {"sink:window:key_list:sparse_attention:fp32": 1,  # the sliding_attention layer
                          "sink:window:tail_picks:key_list:sparse_attention:fp32": 1,  # CSA: the indexer's picks
                          "sink:window:tail_keys:key_list:sparse_attention:fp32": 1}, report  # HCA: causal blocks
    assert any("modeling_deepseek_v4.py" in loc for loc in wa.locations), report
    assert "dsa_inductor.sparse_attention" in code and "dsa_inductor.windowed_attention" not in code


def test_deepseek_v4_decode_step(fresh):
    """One decode step after a prefill, with transformers' V4 caches: compiled logits equal eager's, and all three
    layers' attention compiles to sparse_attention over key lists (at decode the HCA layer pads the window's mask
    with zeros over its compressed keys instead of a block bias: every compressed key is in the list)."""
    import copy

    import torch

    model, ids = _build("deepseek_v4")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        ours_cache = copy.deepcopy(out.past_key_values)
        ref = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
        got = torch.compile(model)(nxt, past_key_values=ours_cache, use_cache=True).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    wa = _STATS["windowed_attention"]
    assert wa.matches == {"sink:window:key_list:sparse_attention:fp32": 1,
                          "sink:window:tail_picks:key_list:sparse_attention:fp32": 1,
                          "sink:window:tail_keys:key_list:sparse_attention:fp32": 1}, fresh.report()


def test_deepseek_v4_bf16_as_close_as_stock(fresh):
    """bf16 V4 (its sinks cast to bf16 too): eager's sink softmax runs on a bf16 `combined`, the op's in fp32.
    The compiled logits stay as close to eager as stock torch.compile's (compare's bf16 check), with all three
    layers' attention on the op."""
    import torch

    model, ids = _build("deepseek_v4", dtype=torch.bfloat16)
    res = example.compare(model, ids, with_stock=True)
    assert _STATS["windowed_attention"].matches == {
        "sink:window:key_list:sparse_attention:bf16": 1, "sink:window:tail_picks:key_list:sparse_attention:bf16": 1,
        "sink:window:tail_keys:key_list:sparse_attention:bf16": 1}, res["report"]
