"""Per-rule bookkeeping behind ``dsa_inductor.report()``, and the package logger.

Every rule records, for the graphs its pass examined:

* candidates: anchor nodes seen (e.g. every ``aten.topk``);
* matches, by search variant, and where in the user's source each matched node came from;
* rejections, by reason (a failed check, or the diagnosis of a candidate left alone);
* follow-up rewrites of the fused ops it inserted (e.g. a sort dropped where order is unobservable).

The FX graph cache serves a compiled graph without running any post-grad pass, so a graph served from it
is never re-examined; ``report()`` says so in a plain line, from Inductor's own cache counters.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger("dsa_inductor")


@dataclasses.dataclass
class RuleStats:
    op: str
    candidates: int = 0
    matches: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    locations: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # follow-up rewrites


_STATS: dict[str, RuleStats] = {}
_GRAPHS = collections.Counter()
_CACHE_BASELINE: dict[str, int] = {}


def stats_for(rule: str, op: str = "") -> RuleStats:
    if rule not in _STATS:
        _STATS[rule] = RuleStats(op=op)
    return _STATS[rule]


def match_count() -> int:
    """Rewrites made by all rules since the last ``reset()`` (every variant of every rule)."""
    return sum(sum(st.matches.values()) for st in _STATS.values())


def note_graph() -> None:
    _GRAPHS["examined"] += 1


def source_location(node) -> str:
    """Last user frame of a node's stack trace: ``file:line in fn`` (or ``<unknown>``)."""
    trace = node.meta.get("stack_trace") if node is not None else None
    if not trace:
        return "<unknown>"
    frames = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return "<unknown>"
    # 'File "/path/mod.py", line 240, in forward'
    parts = frames[-1].split('"')
    path = parts[1] if len(parts) > 2 else frames[-1]
    rest = parts[2] if len(parts) > 2 else ""
    short = "/".join(path.split("/")[-3:])
    return f"{short}{rest.replace(', line ', ':').replace(', in ', ' in ')}"


def _cache_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")}


def reset() -> None:
    """Forget all statistics (``register_dsa_passes`` does not reset; tests do)."""
    _STATS.clear()
    _GRAPHS.clear()
    _CACHE_BASELINE.clear()
    _CACHE_BASELINE.update(_cache_counters())


def report() -> str:
    """The rewrite report since the last ``reset_report()``, as plain text.

    Per rule: candidates seen, matches by search variant and by source location (``file:line in fn`` of
    the user's code), rejections with their reason, follow-up rewrites, and the fused op inserted.  A line
    says how many graphs the FX graph cache served, since those were not re-examined.
    """
    lines = [f"dsa_inductor report: {_GRAPHS['examined']} graph(s) examined by the post-grad pass"]
    cache = _cache_counters()
    hits = cache["fxgraph_cache_hit"] - _CACHE_BASELINE.get("fxgraph_cache_hit", 0)
    if hits:
        lines.append(f"  {hits} graph(s) came from the FX graph cache and were not re-examined: "
                     "their matches are not counted below (set torch._inductor.config.force_disable_caches "
                     "to re-examine them)")
    if not _STATS:
        lines.append("  no rule has seen a candidate yet")
    for name, st in sorted(_STATS.items()):
        total = sum(st.matches.values())
        lines.append(f"- rule {name}: {st.candidates} candidate(s), {total} match(es), "
                     f"{sum(st.rejections.values())} rejection(s); fused op: {st.op}")
        for variant, n in sorted(st.matches.items()):
            lines.append(f"    matched {n}x  variant {variant}")
        for loc, n in sorted(st.locations.items()):
            lines.append(f"    matched {n}x  at {loc}")
        for reason, n in sorted(st.rejections.items()):
            lines.append(f"    rejected {n}x: {reason}")
        for note, n in sorted(st.notes.items()):
            lines.append(f"    then {n}x: {note}")
    lines += _loops_section()
    return "\n".join(lines)


def _loops_section() -> list:
    """Per-token Python loops found by ``register_dsa_passes()`` (current state, not reset by ``reset()``)."""
    import sys

    loops = sys.modules.get("dsa_inductor.loops")
    if loops is None or not (loops.LIFTED or loops.REFUSED):
        return []
    state = "" if loops.runtime.ENABLED else " (inactive since unregister_dsa_passes: Dynamo traces the originals)"
    out = [f"- loop lifting: {len(loops.LIFTED)} function(s) lifted, {len(loops.REFUSED)} refused{state}"]
    for lifted in sorted(loops.LIFTED.values(), key=lambda x: x.plan.location):
        p = lifted.plan
        extra = " (output length data-dependent: an unbacked size, one graph)" if p.data_dependent_length else ""
        out.append(f"    lifted {p.name} at {p.location}: {'+'.join(p.kinds)} loop{extra}")
    for r in sorted(loops.REFUSED.values(), key=lambda x: x.location):
        out.append(f"    refused {r.name} at {r.location}: {r.reason}")
    return out
