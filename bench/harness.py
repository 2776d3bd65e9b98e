"""Side-by-side timing of one idiom: eager, stock ``torch.compile``, ``torch.compile`` + dsa_inductor, roofline.

Times are ``triton.testing.do_bench`` medians (CUDA events, warm-up excluded).  The stock and the
dsa_inductor compiles run in the same process, one after the other, with Dynamo reset between them and
the FX graph cache disabled, so each number comes from its own compile of the same eager function.

With ``cudagraphs=True`` the stock and dsa_inductor compiles also run as ``mode="reduce-overhead"``
(CUDA graphs, inputs marked static so replays copy nothing): those columns have no host overhead, and the
CUDA-graph output of ours goes through the case's check too (issue 6: every example runs under CUDA graphs
and matches eager).

GPU times (``device_times``, torch.profiler) come last, after every wall-clock timing of the run (bench/run.py
times all cases first): a profiler run leaves CUPTI attached to the process (pytorch#144455: Kineto does not
call ``cuptiFinalize`` by default), which adds host time to every later launch.  Before session 20 the stock
GPU time was taken between the stock and the dsa_inductor timings, so in a run's first case ours was timed
with CUPTI attached and stock without: its host-bound "dsa-inductor" figure read high.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import dsa_inductor

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet HBM bandwidth
BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 peak


@dataclasses.dataclass
class Case:
    idiom: str
    shape: str
    fn: Callable  # the eager model-style function
    make_inputs: Callable[[], tuple]
    min_bytes: float = 0.0  # fewest bytes the idiom must move (inputs read once, outputs written once)
    flops: float = 0.0
    check: Optional[Callable] = None  # (inputs, eager_out, our_out) -> None or a reason string


@dataclasses.dataclass
class Result:
    case: Case
    eager_us: float
    stock_us: float
    ours_us: float
    roofline_us: float
    matches: int
    problem: Optional[str]
    stock_graph_us: float = float("nan")
    ours_graph_us: float = float("nan")
    stock_device_us: float = float("nan")
    ours_device_us: float = float("nan")


def _gpu_name() -> str:
    name = torch.cuda.get_device_name()
    return next((k for k in HBM_BYTES_PER_S if k in name), name)


def _median_us(fn, args) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args), warmup=50, rep=300, return_mode="median") * 1e3


def device_kernels_us(fn, args, calls: int = 20) -> list[tuple[str, float]]:
    """``(name, us)`` per kernel, copy and fill that one call of ``fn`` launches (torch.profiler over ``calls``
    calls, divided by ``calls``), largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    events = [(e.key, e.self_device_time_total / calls) for e in prof.key_averages()
              if e.device_type == DeviceType.CUDA]
    return sorted(events, key=lambda e: -e[1])


def device_us(fn, args, calls: int = 20) -> float:
    """GPU time of one call of ``fn``: the device time of every kernel, copy and fill that ``calls`` calls
    launch (torch.profiler), divided by ``calls``.  Host time and idle gaps are not counted: this is what the
    GPU spends, the measure a kernel-level target ("takes 15 us") is stated in."""
    return sum(us for _, us in device_kernels_us(fn, args, calls))


def _graphed(fn, args, rules: bool):
    """``fn`` compiled with ``mode="reduce-overhead"`` (with or without our rules), warmed up and recorded."""
    torch._dynamo.reset()
    (dsa_inductor.register_dsa_passes if rules else dsa_inductor.unregister_dsa_passes)()
    for a in args:
        if isinstance(a, torch.Tensor):
            torch._dynamo.mark_static_address(a)
    compiled = torch.compile(fn, mode="reduce-overhead", dynamic=False)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(*args)
    return compiled, out


def _clone(out):
    return out.clone() if isinstance(out, torch.Tensor) else type(out)(_clone(o) for o in out)


def run_case(case: Case, cudagraphs: bool = False) -> Result:
    torch._inductor.config.force_disable_caches = True
    args = case.make_inputs()
    with torch.no_grad():
        eager_out = case.fn(*args)
        eager_us = _median_us(case.fn, args)

        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
        stock = torch.compile(case.fn, dynamic=False)
        stock(*args)
        stock_us = _median_us(stock, args)

        torch._dynamo.reset()
        dsa_inductor.reset_report()
        dsa_inductor.register_dsa_passes()
        ours = torch.compile(case.fn, dynamic=False)
        our_out = ours(*args)
        ours_us = _median_us(ours, args)
        from dsa_inductor.report import match_count

        matches = match_count()  # this compile's matches (the CUDA-graph compile below would count them again)
        graph_us = {}
        if cudagraphs:
            for rules in (False, True):
                compiled, out = _graphed(case.fn, args, rules)
                graph_us[rules] = _median_us(compiled, args)
                if rules:
                    graph_out = _clone(out)
        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()

    problem = case.check(args, eager_out, our_out) if case.check else None
    if cudagraphs and case.check and problem is None:
        problem = case.check(args, eager_out, graph_out)
        problem = problem and f"CUDA graphs: {problem}"
    gpu = _gpu_name()
    roof = max(case.min_bytes / HBM_BYTES_PER_S.get(gpu, 3.35e12), case.flops / BF16_FLOPS.get(gpu, 989e12)) * 1e6
    return Result(case, eager_us, stock_us, ours_us, roof, matches, problem,
                  graph_us.get(False, float("nan")), graph_us.get(True, float("nan")))


def compiled_device_us(fn, args, rules: bool) -> float:
    """GPU time of one call of ``fn`` compiled afresh, without or with our rules (``device_us``)."""
    torch._dynamo.reset()
    (dsa_inductor.register_dsa_passes if rules else dsa_inductor.unregister_dsa_passes)()
    compiled = torch.compile(fn, dynamic=False)
    compiled(*args)
    us = device_us(compiled, args)
    dsa_inductor.unregister_dsa_passes()
    torch._dynamo.reset()
    return us


def device_times(case: Case, result: Result, stock: bool = True) -> Result:
    """``result`` with the GPU times of stock (unless ``stock`` is False) and ours, each compiled afresh.  Run after
    every wall-clock timing of the process (see the module docstring: the profiler leaves CUPTI attached)."""
    torch._inductor.config.force_disable_caches = True
    args = case.make_inputs()
    with torch.no_grad():
        stock_dev = compiled_device_us(case.fn, args, rules=False) if stock else result.stock_device_us
        ours_dev = compiled_device_us(case.fn, args, rules=True)
    return dataclasses.replace(result, stock_device_us=stock_dev, ours_device_us=ours_dev)


def markdown(results: list[Result]) -> str:
    head = (f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {__import__('triton').__version__}; do_bench medians in us; GPU time: device time per call "
            "(torch.profiler, kernels only, no host time).\n\n"
            "| idiom | shape | eager | stock compile | dsa-inductor | stock, CUDA graphs | dsa-inductor, CUDA graphs "
            "| stock, GPU time | dsa-inductor, GPU time | roofline | vs stock | matches | check |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {r.case.idiom} | {r.case.shape} | {r.eager_us:.1f} | {r.stock_us:.1f} | {r.ours_us:.1f} | "
            f"{r.stock_graph_us:.1f} | {r.ours_graph_us:.1f} | {r.stock_device_us:.1f} | {r.ours_device_us:.1f} | "
            f"{r.roofline_us:.1f} | {r.stock_us / r.ours_us:.1f}x | {r.matches} | {r.problem or 'ok'} |"
            for r in results]
    return head + "\n".join(rows) + "\n"


def chart(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r.case.idiom}\n{r.case.shape}" for r in results]
    series = {"eager": [r.eager_us for r in results], "stock torch.compile": [r.stock_us for r in results],
              "dsa-inductor": [r.ours_us for r in results]}
    if any(r.ours_graph_us == r.ours_graph_us for r in results):  # not all nan: --cudagraphs ran
        series["stock, CUDA graphs"] = [r.stock_graph_us for r in results]
        series["dsa-inductor, CUDA graphs"] = [r.ours_graph_us for r in results]
    series["roofline"] = [r.roofline_us for r in results]
    x = np.arange(len(results))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(results)), 4.5))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("median time (us, log scale)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_title(f"dsa-inductor vs eager and stock torch.compile ({torch.cuda.get_device_name()}, torch {torch.__version__})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
