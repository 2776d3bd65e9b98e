"""Pass machinery: registration, chaining with other passes, uuid / FX graph cache correctness, report."""

import pathlib
import shutil

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import dsa_inductor
from dsa_inductor.pass_manager import DSAPassManager, package_source_hash, source_hash


def masked_topk_fn(x, mask):
    return x.masked_fill(~mask, float("-inf")).topk(3).indices


class Recorder(CustomGraphPass):
    def __init__(self, tag="r"):
        self.calls = 0
        self.tag = tag

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return ("recorder", self.tag)


@pytest.fixture(autouse=True)
def clean_slot():
    saved = inductor_config.post_grad_custom_pre_pass
    dsa_inductor.unregister_dsa_passes()
    inductor_config.post_grad_custom_pre_pass = None
    yield
    dsa_inductor.unregister_dsa_passes()
    inductor_config.post_grad_custom_pre_pass = saved


def test_register_is_idempotent_and_unregister_restores():
    prior = Recorder()
    inductor_config.post_grad_custom_pre_pass = prior
    a = dsa_inductor.register_dsa_passes()
    b = dsa_inductor.register_dsa_passes(verify=True)
    assert a is b and inductor_config.post_grad_custom_pre_pass is a and a.prior is prior and a.verify
    dsa_inductor.unregister_dsa_passes()
    assert inductor_config.post_grad_custom_pre_pass is prior


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="no_such_rule"):
        dsa_inductor.register_dsa_passes(patterns=["no_such_rule"])


@pytest.mark.parametrize("as_list", [False, True])
def test_prior_passes_run_first_and_enter_uuid(as_list):
    r1, r2 = Recorder("a"), Recorder("b")
    inductor_config.post_grad_custom_pre_pass = [r1, r2] if as_list else r1
    mgr = dsa_inductor.register_dsa_passes()
    with inductor_config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        torch.compile(masked_topk_fn)(torch.randn(4, 9), torch.rand(4, 9) > 0.5)
    assert r1.calls == 1 and (r2.calls == 1 or not as_list)
    uid = mgr.uuid()
    assert uid[1] == ("recorder", "a") and (not as_list or uid[2] == ("recorder", "b"))


def test_plain_callable_prior_forces_cache_bypass():
    inductor_config.post_grad_custom_pre_pass = lambda graph: None
    assert dsa_inductor.register_dsa_passes().uuid() is None


def test_uuid_stable_and_sensitive_to_rules_and_verify():
    mgr = DSAPassManager(rules={"mask_topk": object()}, verify=False)
    assert mgr.uuid() == mgr.uuid()
    assert DSAPassManager(rules={}, verify=False).uuid() != mgr.uuid()
    assert DSAPassManager(rules={"mask_topk": object()}, verify=True).uuid() != mgr.uuid()
    mgr.enabled = False
    assert DSAPassManager(rules={"mask_topk": object()}, verify=False).uuid() != mgr.uuid()


def test_uuid_sensitive_to_kernel_source(tmp_path):
    pkg = pathlib.Path(dsa_inductor.__file__).parent
    copy = tmp_path / "dsa_inductor"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_hash(copy) == source_hash(pkg) == package_source_hash()
    kernel = copy / "lowerings" / "masked_topk.py"
    kernel.write_text(kernel.read_text().replace("BLOCK_MAX = 16384", "BLOCK_MAX = 8192"))
    assert source_hash(copy) != package_source_hash()


def test_cached_graph_without_rules_is_not_served_with_rules(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, m = torch.randn(5, 11), torch.rand(5, 11) > 0.3
    with inductor_config.patch(fx_graph_cache=True, force_disable_caches=False):
        torch._dynamo.reset()
        counters.clear()
        torch.compile(masked_topk_fn)(x, m)  # rules off: cached
        assert counters["inductor"]["fxgraph_cache_miss"] == 1

        dsa_inductor.reset_report()
        dsa_inductor.register_dsa_passes()
        torch._dynamo.reset()
        counters.clear()
        torch.compile(masked_topk_fn)(x, m)  # rules on: must not hit the rules-off entry
        assert counters["inductor"]["fxgraph_cache_hit"] == 0
        assert "1 match(es)" in dsa_inductor.report()

        torch._dynamo.reset()
        counters.clear()
        torch.compile(masked_topk_fn)(x, m)  # same rules again: served from the cache, pass not run
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        assert "came from the FX graph cache" in dsa_inductor.report()

        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
        counters.clear()
        torch.compile(masked_topk_fn)(x, m)  # rules off again: the rules-on entry is not served
        assert counters["inductor"]["fxgraph_cache_hit"] == 1  # the first, rules-off entry
    torch._dynamo.reset()
