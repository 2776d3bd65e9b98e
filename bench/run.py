"""Run every idiom benchmark on the current GPU; write a markdown table and a PNG chart.

    python bench/run.py [--out DIR] [--only SUBSTRING[,SUBSTRING...]] [--cudagraphs]

Output: DIR/<gpu>.md and DIR/<gpu>.png (default DIR: bench/results).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_attention_layer  # noqa: E402
import bench_loops  # noqa: E402
import bench_gather_dequant  # noqa: E402
import bench_index_score  # noqa: E402
import bench_indexer_module  # noqa: E402
import bench_mask_topk  # noqa: E402
import bench_sparse_attention  # noqa: E402
import bench_windowed_softmax  # noqa: E402
from harness import chart, device_times, markdown, run_case  # noqa: E402

MODULES = [bench_mask_topk, bench_loops, bench_gather_dequant, bench_windowed_softmax]
MODULES.append(bench_index_score)
MODULES.append(bench_indexer_module)
MODULES.append(bench_sparse_attention)
MODULES.append(bench_attention_layer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--only", default="")
    ap.add_argument("--cudagraphs", action="store_true",
                    help="also time stock and ours under mode='reduce-overhead' (and check ours there)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/run.py needs a CUDA GPU: CPU timings say nothing about these kernels")
    os.makedirs(a.out, exist_ok=True)
    timed = []
    for mod in MODULES:
        for case in mod.cases():
            if a.only and not any(part in case.idiom for part in a.only.split(",")):
                continue
            own = getattr(mod, "run_case", None)  # a module may time its cases its own way
            r = own(case) if own else run_case(case, cudagraphs=a.cudagraphs)
            timed.append((mod, case, r))
            print(f"timed {case.idiom}: eager {r.eager_us:.1f} stock {r.stock_us:.1f} ours {r.ours_us:.1f} graphs "
                  f"{r.stock_graph_us:.1f}/{r.ours_graph_us:.1f} matches {r.matches}", flush=True)  # survives a cut run
    # GPU times after every wall-clock timing: a torch.profiler run leaves CUPTI attached to the process, which
    # adds host time to every later launch (harness module docstring).
    results = []
    for mod, case, r in timed:
        dev = getattr(mod, "device_times", None) if hasattr(mod, "run_case") else device_times
        r = dev(case, r) if dev else r
        print(f"{case.idiom:45s} {case.shape:32s} eager {r.eager_us:9.1f} stock {r.stock_us:9.1f} "
              f"ours {r.ours_us:9.1f} graphs {r.stock_graph_us:8.1f}/{r.ours_graph_us:8.1f} gpu {r.stock_device_us:8.1f}/{r.ours_device_us:8.1f} roof {r.roofline_us:7.1f} matches {r.matches} {r.problem or 'ok'}",
              flush=True)
        results.append(r)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    md = markdown(results)
    with open(os.path.join(a.out, f"{gpu}.md"), "w") as f:
        f.write(md)
    chart(results, os.path.join(a.out, f"{gpu}.png"))
    print(md)


if __name__ == "__main__":
    main()
