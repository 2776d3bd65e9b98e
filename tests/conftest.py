"""Shared test setup.

* Without CUDA, Triton kernels run under ``TRITON_INTERPRET=1`` (set here, before triton is imported).
* Hypothesis profiles: ``ci`` (default) and ``gpu``; choose with ``--hypothesis-profile``.  Kernel tests
  size their examples with ``examples(cuda=..., cpu=...)``.
* ``fresh`` fixture: Dynamo reset, FX graph / autotune caches off (a cache hit skips the pass, so match
  counts would read 0), dsa_inductor statistics cleared, passes registered; unregistered afterwards.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# gpu: random examples on a machine that is given back (its example database with it), so a failure prints
# the @reproduce_failure blob that replays it anywhere.
settings.register_profile("gpu", deadline=None, max_examples=300, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
if os.environ.get("DSA_SANITIZER") == "1" or os.environ.get("DSA_NO_SHRINK") == "1":
    # Under compute-sanitizer every launch is slow, and a failure found while generating used to be shrunk until
    # the run's time limit killed it, before anything was printed (session 11): report the first one as found.
    # DSA_NO_SHRINK=1 does the same anywhere (a device run with a time limit).
    settings.register_profile("sanitizer", settings(settings.default, phases=[Phase.explicit, Phase.reuse,
                                                                              Phase.generate]))
    settings.load_profile("sanitizer")

import dsa_inductor  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CUDA = torch.cuda.is_available()


def examples(cuda: int, cpu: int) -> int:
    """Hypothesis examples of a kernel test: ``cuda`` on a GPU (scaled by ``DSA_GPU_EXAMPLES``, a fraction,
    e.g. 0.1 under compute-sanitizer, which slows every launch), ``cpu`` under the Triton interpreter."""
    return max(5, int(cuda * float(os.environ.get("DSA_GPU_EXAMPLES", "1")))) if CUDA else cpu


def sanitizer_rows(rows: int, cap: int = 1024) -> int:
    """Rows of a large-shape GPU kernel test: under compute-sanitizer (``DSA_SANITIZER=1``, set by
    ``.ci/gpu``) at most ``cap`` (default 1024), which keeps each launch configuration (masked_topk picks its
    warps at 1024 row programs; the row length, which sets the block sizes, is unchanged) at a fraction of
    the work."""
    return min(rows, cap) if os.environ.get("DSA_SANITIZER") == "1" else rows


@pytest.fixture
def fresh():
    torch._dynamo.reset()
    dsa_inductor.reset_report()
    # Duck sizing would tie dims that happen to be equal in the first (minimal) example and recompile later.
    with torch._inductor.config.patch(force_disable_caches=True), \
            torch.fx.experimental._config.patch(use_duck_shape=False):
        dsa_inductor.register_dsa_passes()
        yield dsa_inductor
        dsa_inductor.unregister_dsa_passes()
    torch._dynamo.reset()


def load_example(name: str):
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matches(rule="mask_topk"):
    """{variant: count} for a rule since the last reset."""
    from dsa_inductor.report import _STATS

    st = _STATS.get(rule)
    return dict(st.matches) if st else {}


@pytest.fixture
def gpu_bmm_to_mm(fresh, monkeypatch):
    """Inductor's GPU-only joint-graph rewrite ``bmm_to_mm`` (batch-1 bmm -> ``unsqueeze(mm(squeeze,
    squeeze))``) forced on for CPU graphs.  The patterns are traced first: on a GPU they are traced on CPU
    example inputs, which the rewrite never touches."""
    from torch._inductor.fx_passes import joint_graph

    for rule in fresh._MANAGER.rules.values():
        rule.pattern_pass()
    monkeypatch.setattr(joint_graph, "check_device", lambda *args, **kwargs: True)
