"""Cache correctness (issue 6, bar 5): the FX graph cache never serves a graph compiled under other rules.

Inductor puts ``post_grad_custom_pre_pass.uuid()`` into the FX graph cache key and ignores the config field
itself (``torch/_inductor/codecache.py``), so the uuid of ``DSAPassManager`` is all that separates a graph
compiled with rules from one compiled without, or with other rules, or with an older version of them.

* ``uuid()`` changes with every rule source (``patterns/*.py``), kernel / op source (``lowerings/*.py``), any
  other package source, the enabled rule set and the verify flag; it is stable otherwise (same config, rule
  order, unrelated files, another checkout path).  Sources are changed in a temporary copy of the package
  (``source_hash``) or through a monkeypatched ``package_source_hash``, never in the real files.
* With the FX graph cache on, in a temporary cache dir: a graph cached with the passes unregistered is not
  served once they are registered (the rule matches, the fused op is in the generated code); the same
  compile again *is* served from the cache and ``report()`` says so; other rule sets, the verify flag and a
  changed package source each miss.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_inductor_cache, run_and_get_code

import dsa_inductor
from dsa_inductor import pass_manager
from dsa_inductor.pass_manager import DSAPassManager, package_source_hash, source_hash
from dsa_inductor.report import match_count

PKG = pathlib.Path(dsa_inductor.__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py"))
RULE_AND_KERNEL_SOURCES = [s for s in SOURCES if s.startswith(("patterns/", "lowerings/"))]


@pytest.fixture(autouse=True)
def clean_slot():
    saved = inductor_config.post_grad_custom_pre_pass
    dsa_inductor.unregister_dsa_passes()
    inductor_config.post_grad_custom_pre_pass = None
    torch._dynamo.reset()
    yield
    dsa_inductor.unregister_dsa_passes()
    inductor_config.post_grad_custom_pre_pass = saved
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    copy = tmp_path_factory.mktemp("pkg") / "dsa_inductor"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


# ---- uuid ---------------------------------------------------------------------------------------------------------

def test_rule_and_kernel_sources_are_all_hashed():
    rules = {f"patterns/{m}.py" for m in ("mask_topk", "index_score", "gather_dequant", "windowed_softmax",
                                          "windowed_attention")}
    kernels = {f"lowerings/{m}.py" for m in ("masked_topk", "index_score", "gather_dequant", "windowed_softmax",
                                            "windowed_attention")}
    assert rules <= set(RULE_AND_KERNEL_SOURCES) and kernels <= set(RULE_AND_KERNEL_SOURCES)
    assert "pass_manager.py" in SOURCES and "canonicalize.py" in SOURCES


@pytest.mark.parametrize("rel", RULE_AND_KERNEL_SOURCES)
def test_source_hash_changes_with_each_rule_and_kernel_source(package_copy, rel):
    path = package_copy / rel
    original = path.read_bytes()
    try:
        assert source_hash(package_copy) == package_source_hash()
        path.write_bytes(original + b"\n# edited\n")
        assert source_hash(package_copy) != package_source_hash()
        path.write_bytes(original.replace(b"(", b"( ", 1))  # a one-byte edit anywhere
        assert source_hash(package_copy) != package_source_hash()
    finally:
        path.write_bytes(original)
    assert source_hash(package_copy) == package_source_hash()


def test_source_hash_stable_otherwise(package_copy, tmp_path):
    base = package_source_hash()
    assert source_hash(PKG) == base  # recomputed, not the cached value
    elsewhere = tmp_path / "elsewhere" / "dsa_inductor"
    shutil.copytree(package_copy, elsewhere)
    assert source_hash(elsewhere) == base  # relative paths: the checkout location does not matter
    (elsewhere / "notes.txt").write_text("not a source")
    (elsewhere / "__pycache__").mkdir(exist_ok=True)
    (elsewhere / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0" * 16)
    for p in elsewhere.rglob("*.py"):
        p.touch()  # mtimes are not hashed
    assert source_hash(elsewhere) == base
    (elsewhere / "patterns" / "new_rule.py").write_text("RULE = 1\n")  # a new source file is
    assert source_hash(elsewhere) != base


def _uuid(rules=("mask_topk",), verify=False, enabled=True, prior=None):
    mgr = DSAPassManager({r: object() for r in rules}, verify, prior=prior)
    mgr.enabled = enabled
    return mgr.uuid()


def test_uuid_follows_the_package_source_hash(monkeypatch):
    before = _uuid()
    assert before == _uuid()
    monkeypatch.setattr(pass_manager, "package_source_hash", lambda: "0" * 64)  # as if a rule or kernel changed
    assert _uuid() != before
    assert _uuid() == _uuid()


def test_uuid_changes_with_enabled_set_and_verify():
    names = list(dsa_inductor.RULES)
    seen = {}
    for subset in [names, names[:1], names[1:], names[:2], []]:
        seen[tuple(subset)] = _uuid(subset)
    assert len(set(seen.values())) == len(seen), seen
    assert _uuid(names, verify=True) != _uuid(names)
    assert _uuid(names, enabled=False) != _uuid(names)  # unregistered but still chained: a pass-through


def test_uuid_stable_for_the_same_configuration():
    names = list(dsa_inductor.RULES)
    assert _uuid(names) == _uuid(list(reversed(names)))  # the order rules are listed in does not matter
    a = dsa_inductor.register_dsa_passes().uuid()
    dsa_inductor.unregister_dsa_passes()
    b = dsa_inductor.register_dsa_passes(patterns=list(reversed(names))).uuid()
    assert a == b and a is not None
    dsa_inductor.register_dsa_passes(patterns=names[:1])
    assert dsa_inductor.register_dsa_passes().uuid() == a  # reconfigured back: the same key again


# ---- the FX graph cache -----------------------------------------------------------------------------------------

def masked_topk_fn(x, mask):
    return x.masked_fill(~mask, float("-inf")).topk(3).indices


X = torch.randn(6, 13, generator=torch.Generator().manual_seed(0))
M = torch.rand(6, 13, generator=torch.Generator().manual_seed(1)) > 0.3


def _compile_and_run():
    """A fresh Dynamo compile of masked_topk_fn: (output, generated code, cache hit / miss deltas)."""
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(masked_topk_fn, dynamic=False), X, M)
    return out, "\n".join(code), counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def _same_selection(out):
    ref = masked_topk_fn(X, M)
    masked = X.masked_fill(~M, float("-inf"))
    assert torch.equal(masked.gather(-1, out).sort(-1).values, masked.gather(-1, ref).sort(-1).values)


@pytest.fixture
def fx_cache(tmp_path):
    with fresh_inductor_cache(dir=str(tmp_path)), \
            inductor_config.patch(fx_graph_cache=True, force_disable_caches=False):
        yield


@pytest.mark.parametrize("rules_off", ["unregistered", "no_rule_enabled"])
def test_graph_cached_without_rules_is_not_served_with_rules(fx_cache, rules_off):
    if rules_off == "no_rule_enabled":  # the manager is in the slot (its uuid in the key) with no rule on
        dsa_inductor.register_dsa_passes(patterns=[])
    out, code, hit, miss = _compile_and_run()  # rules off: compiled, stored
    assert (hit, miss) == (0, 1) and "dsa_inductor" not in code
    _same_selection(out)

    dsa_inductor.reset_report()
    dsa_inductor.register_dsa_passes()
    out, code, hit, miss = _compile_and_run()  # rules on: the rules-off entry must not be served
    assert (hit, miss) == (0, 1)
    assert match_count() == 1, dsa_inductor.report()
    assert "torch.ops.dsa_inductor.masked_topk" in code
    assert "came from the FX graph cache" not in dsa_inductor.report()
    _same_selection(out)

    out, code, hit, miss = _compile_and_run()  # the same rules again: served from the cache, the pass not run
    assert (hit, miss) == (1, 0)
    assert match_count() == 1  # nothing new was examined ...
    assert "1 graph(s) came from the FX graph cache" in dsa_inductor.report()  # ... and report() says why
    assert "dsa_inductor.masked_topk" in code  # the cached graph is the rewritten one
    _same_selection(out)

    if rules_off == "no_rule_enabled":
        dsa_inductor.register_dsa_passes(patterns=[])
    else:
        dsa_inductor.unregister_dsa_passes()
    out, code, hit, miss = _compile_and_run()  # rules off again: the first (rules-off) entry, not the fused one
    assert (hit, miss) == (1, 0) and "dsa_inductor" not in code
    _same_selection(out)


def test_other_rules_verify_or_sources_miss_the_cache(fx_cache, monkeypatch):
    dsa_inductor.register_dsa_passes()
    _, code, hit, miss = _compile_and_run()
    assert (hit, miss) == (0, 1) and "dsa_inductor.masked_topk" in code

    others = [r for r in dsa_inductor.RULES if r != "mask_topk"]
    dsa_inductor.reset_report()
    dsa_inductor.register_dsa_passes(patterns=others)  # another enabled set: mask_topk off
    out, code, hit, miss = _compile_and_run()
    assert (hit, miss) == (0, 1) and "dsa_inductor" not in code and match_count() == 0
    _same_selection(out)

    dsa_inductor.register_dsa_passes(verify=True)  # all rules, verify on
    _, code, hit, miss = _compile_and_run()
    assert (hit, miss) == (0, 1) and "dsa_inductor.masked_topk" in code

    dsa_inductor.register_dsa_passes()  # back to the first configuration: its entry is served
    _, _, hit, miss = _compile_and_run()
    assert (hit, miss) == (1, 0)

    monkeypatch.setattr(pass_manager, "package_source_hash", lambda: "f" * 64)  # a changed rule or kernel
    dsa_inductor.reset_report()
    _, code, hit, miss = _compile_and_run()
    assert (hit, miss) == (0, 1) and match_count() == 1 and "dsa_inductor.masked_topk" in code
