"""Which modules the loop scanner reads (dsa_inductor/loops/scan.py) and which loops it reports.

A library on PYTHONPATH outside site-packages (a transformers checkout, say) must not flood ``report()``
with refusals: only user code (under the project roots, not a known library) is scanned, and only loops
that look per-token are analyzed and reported.
"""

import importlib
import os
import sys
import sysconfig
import textwrap

import pytest

import dsa_inductor
from dsa_inductor import loops
from dsa_inductor.loops import scan

LIB_SOURCE = '''
import torch


def liftable_read(cache, slot_mapping):
    out = torch.zeros(slot_mapping.shape[0], cache.shape[1])
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        out[i] = cache[slot]
    return out


def refused_shifted(cache, slot_mapping):
    out = torch.zeros(slot_mapping.shape[0] + 1, cache.shape[1])
    for i, slot in enumerate(slot_mapping.tolist()):
        out[i + 1] = cache[slot]
    return out


def over_layers(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def config_loop(cfg, names):
    for i in range(3):
        cfg["step"] = i
    for name, value in zip(names, [1, 2]):
        cfg[name] = value
    for k, name in enumerate(names):
        cfg[name] = k
    return cfg
'''


def _make_package(root, name):
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "loopmod.py").write_text(textwrap.dedent(LIB_SOURCE))
    return pkg


@pytest.fixture
def tmp_lib(tmp_path, monkeypatch):
    """A package `dsa_scan_probe_lib` on sys.path in a temporary directory (outside the working directory)."""
    assert not str(tmp_path).startswith(os.getcwd())
    _make_package(tmp_path, "dsa_scan_probe_lib")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(scan, "_EXTRA_ROOTS", [])
    monkeypatch.delenv("DSA_INDUCTOR_LOOP_ROOTS", raising=False)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("dsa_scan_probe_lib")]:
        del sys.modules[name]


def _names(table):
    return {getattr(fn, "__qualname__", "") for fn in table}


def test_library_on_pythonpath_outside_site_packages_is_not_scanned(fresh, tmp_lib):
    mod = importlib.import_module("dsa_scan_probe_lib.loopmod")  # imported after register: the hook sees it
    dsa_inductor.register_dsa_passes()  # and a rescan of the loaded modules
    assert mod.liftable_read not in loops.LIFTED and mod.refused_shifted not in loops.REFUSED
    assert "dsa_scan_probe_lib" not in dsa_inductor.report() and "loopmod.py" not in dsa_inductor.report()
    assert "outside the project roots" in scan.library_reason(mod.__file__, mod.__name__)


def test_added_root_is_scanned_and_only_per_token_loops_are_reported(fresh, tmp_lib):
    scan.add_scan_root(tmp_lib)
    mod = importlib.import_module("dsa_scan_probe_lib.loopmod")  # through the import hook
    assert mod.liftable_read in loops.LIFTED
    assert mod.refused_shifted in loops.REFUSED and "out[i + 1]" in loops.REFUSED[mod.refused_shifted].reason
    # loops over layers / config entries / zipped Python lists: not per-token, neither lifted nor reported
    for fn in (mod.over_layers, mod.config_loop):
        assert fn not in loops.LIFTED and fn not in loops.REFUSED, fn.__name__
    rep = dsa_inductor.report()
    assert "refused refused_shifted" in rep and "over_layers" not in rep and "config_loop" not in rep


def test_env_var_root(fresh, tmp_lib, monkeypatch):
    monkeypatch.setenv("DSA_INDUCTOR_LOOP_ROOTS", os.pathsep.join(["/nonexistent", str(tmp_lib)]))
    mod = importlib.import_module("dsa_scan_probe_lib.loopmod")
    dsa_inductor.register_dsa_passes()
    assert mod.liftable_read in loops.LIFTED


def test_library_reason_rules(tmp_path):
    here = os.path.join(os.getcwd(), "pkg", "mod.py")
    assert scan.library_reason(here, "pkg.mod") is None  # under the working directory
    purelib = sysconfig.get_paths()["purelib"]
    assert "site-packages" in scan.library_reason("/opt/x/site-packages/foo/mod.py", "foo.mod")
    assert scan.library_reason("/usr/lib/python3/dist-packages/foo.py", "foo") is not None
    assert scan.library_reason(os.path.join(purelib, "foo.py"), "foo") is not None
    assert "Python installation" in scan.library_reason(os.path.join(sys.base_prefix, "lib", "x.py"), "x")
    assert scan.library_reason(dsa_inductor.__file__, "dsa_inductor") is not None
    # a framework checkout inside the project (e.g. on PYTHONPATH from third_party/): known by its package name
    vendored = os.path.join(os.getcwd(), "third_party", "transformers", "src", "transformers", "models", "m.py")
    assert "known library package `transformers`" in scan.library_reason(vendored, "transformers.models.m")
    assert "known library package `vllm`" in scan.library_reason(here, "vllm.v1.worker")
    assert scan.library_reason(here.replace(".py", ".so"), "pkg.mod") == "no .py file"
    assert scan.library_reason(str(tmp_path / "m.py"), "m") is not None
    assert scan.library_reason(str(tmp_path / "m.py"), "m", roots=[str(tmp_path)]) is None


def test_this_suite_reports_no_refusal_from_libraries(fresh):
    """Everything pytest loaded (torch, transformers, hypothesis, ...): only this repository's modules."""
    for item in list(loops.LIFTED.values()) + list(loops.REFUSED.values()):
        loc = item.plan.location if isinstance(item, loops.Lifted) else item.location
        if loc.startswith("dsa_scan_probe_lib/"):  # lifted by the tests above (polyfills stay registered)
            continue
        assert loc.split("/")[0] in ("tests", "examples", "bench"), loc
