"""Verify mode: ``register_dsa_passes(verify=True)`` checks each fused op against the eager subgraph it replaced.

The check is the opaque op ``dsa_inductor::rule_verify`` placed after the fused op in the rewritten graph
(``dsa_inductor/verify.py``), so it sees what the compiled code computed, on CPU (where the fused op's plain
torch path runs) and on CUDA (the Triton kernel).  A deliberately broken op implementation must raise
``DSAVerifyError`` naming the rule and the first differing element; correct ops must pass.
"""

import pytest
import torch
import torch.nn.functional as F

import dsa_inductor
from conftest import DEVICES, matches
from dsa_inductor.lowerings import gather_dequant as gd_mod
from dsa_inductor.lowerings import index_score as is_mod
from dsa_inductor.lowerings import masked_topk as mt_mod
from dsa_inductor.lowerings import windowed_softmax as ws_mod
from dsa_inductor.lowerings.gather_dequant import quantize_e4m3
from dsa_inductor.verify import DSAVerifyError

NEG_INF = float("-inf")
FP8 = torch.float8_e4m3fn


def topk_range(logits, ks, ke):
    pos = torch.arange(logits.shape[-1], device=logits.device)
    keep = (pos >= ks[:, None]) & (pos < ke[:, None])
    return logits.masked_fill(~keep, NEG_INF).topk(min(8, logits.shape[-1]))


def softmax_range(scores, ks, ke):
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep = (pos >= ks[:, None]) & (pos < ke[:, None])
    return scores.masked_fill(~keep, NEG_INF).softmax(-1)


def indexer_scores(q, k, w):
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * 0.125)
    return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)


def fp8_gather(k_cache, k_scale, idx):
    return k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)


def _inputs(rule, device):
    g = torch.Generator().manual_seed(0)
    if rule in ("mask_topk", "windowed_softmax"):
        x = torch.randn(6, 30, generator=g)
        ks = torch.randint(0, 5, (6,), generator=g)
        return x.to(device), ks.to(device), (ks + 20).to(device)
    if rule == "index_score":
        return (torch.randn(2, 5, 3, 16, generator=g).to(device), torch.randn(2, 7, 16, generator=g).to(device),
                torch.randn(2, 5, 3, generator=g).to(device))
    q, s = quantize_e4m3(torch.randn(12, 32, generator=g))
    return q.to(device), s.squeeze(-1).to(device), torch.randint(0, 12, (9,), generator=g).to(device)


# rule -> (user fn, op module, CPU implementation, CUDA implementation, output index perturbed, expected text)
CASES = {
    "mask_topk": (topk_range, mt_mod, "masked_topk_reference", "masked_topk_triton", (1, 2), "at (1, 2)"),
    "windowed_softmax": (softmax_range, ws_mod, "windowed_softmax_reference", "windowed_softmax_triton", (1, 7),
                         "element (1, 7)"),
    "index_score": (indexer_scores, is_mod, "index_score_reference", "index_score_triton", (1, 2, 3),
                    "element (1, 2, 3)"),
    "gather_dequant": (fp8_gather, gd_mod, "gather_dequant_reference", "gather_dequant_triton", (2, 5),
                       "element (2, 5)"),
}


def _broken(impl, at):
    def broken(*args, **kwargs):
        out = impl(*args, **kwargs)
        first = (out[0] if isinstance(out, tuple) else out).clone()
        first[at] = first[at] + 1.0  # one wrong element (a value of the top-k; a score; a probability)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    return broken


def _verified():
    dsa_inductor.register_dsa_passes(verify=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(CASES))
def test_verify_passes_when_the_op_is_right(fresh, rule, device):
    _verified()
    fn = CASES[rule][0]
    args = _inputs(rule, device)
    with torch.no_grad():
        out = torch.compile(fn, dynamic=True)(*args)
        ref = fn(*args)
    assert sum(matches(rule).values()) == 1, matches(rule)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    dsa_inductor.testing.assert_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(CASES))
def test_broken_op_raises_with_rule_and_first_differing_element(fresh, rule, device, monkeypatch):
    fn, mod, cpu_impl, cuda_impl, at, expected = CASES[rule]
    name = cuda_impl if device == "cuda" else cpu_impl
    monkeypatch.setattr(mod, name, _broken(getattr(mod, name), at))
    _verified()  # sets every op module's VERIFY; then the op's own kernel-vs-reference check is turned off:
    monkeypatch.setattr(mod, "VERIFY", False)  # it is not what is tested (on CUDA it would raise first)
    args = _inputs(rule, device)
    with pytest.raises(DSAVerifyError) as info, torch.no_grad():
        torch.compile(fn, dynamic=True)(*args)
    msg = str(info.value)
    assert f"rule {rule} " in msg and expected in msg, msg
    assert sum(matches(rule).values()) == 1


def test_verify_off_does_not_check(fresh, monkeypatch):
    """Without verify the broken op's result goes through unchecked (so the test above tests verify mode)."""
    monkeypatch.setattr(mt_mod, "masked_topk_reference", _broken(mt_mod.masked_topk_reference, (1, 2)))
    args = _inputs("mask_topk", "cpu")
    with torch.no_grad():
        values, _ = torch.compile(topk_range)(*args)
    assert values[1, 2] != topk_range(*args)[0][1, 2]


def test_verify_names_a_wrong_index(fresh, monkeypatch):
    """Indices-only top-k: a selection outside the kept range is reported at its (row, slot)."""
    def indices_only(logits, ks, ke):
        return topk_range(logits, ks, ke).indices

    impl = mt_mod.masked_topk_reference

    def wrong_index(*args, **kwargs):
        values, indices = impl(*args, **kwargs)
        indices = indices.clone()
        indices[4, 5] = 29  # ke = ks + 20 <= 24: position 29 is masked out, eager never selects it
        return values, indices

    monkeypatch.setattr(mt_mod, "masked_topk_reference", wrong_index)
    _verified()
    with pytest.raises(DSAVerifyError, match=r"rule mask_topk .*slot \(4, 5\) selects position 29"), \
            torch.no_grad():
        torch.compile(indices_only, dynamic=True)(*_inputs("mask_topk", "cpu"))
