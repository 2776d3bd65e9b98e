"""The post-grad pass manager: one ``CustomGraphPass`` in ``post_grad_custom_pre_pass``.

Why that hook: it runs on functional aten IR after joint-graph canonicalization and before Inductor's own
post-grad patterns rewrite the graph (pytorch issue #136329; vLLM RFC #27072), and vLLM owns
``post_grad_custom_post_pass`` inside its compiles, so the pre pass does not collide with it.

Chaining: torch 2.11 holds one object in the slot, torch 2.13 also accepts a list.  Whatever was there is
kept as ``prior`` and run first, in order; ``uuid()`` is then ``(our uuid, prior uuids...)``.  A prior
plain callable without ``uuid()`` makes ``uuid()`` return None, which makes the FX graph cache bypass the
graph: unavoidable, since nothing else says when that callable changes.

``uuid()`` covers the sources of the whole package (patterns, ops and kernels), the enabled rule set and
the verify flag, so a graph cached with other rules, or none, is never served
(``torch/_inductor/codecache.py`` ``FxGraphCache._check_can_cache``).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from typing import Any, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .canonicalize import bmm_to_mm, canonicalize_broadcasts, mm_to_bmm
from .report import note_graph

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def source_hash(package_dir: pathlib.Path) -> str:
    """sha256 over every .py file under ``package_dir`` (relative path and contents)."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        h.update(str(path.relative_to(package_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def package_source_hash() -> str:
    """The hash of this package's sources: rules, ops and kernels (computed once per process)."""
    return source_hash(_PACKAGE_DIR)


def _as_tuple(prior) -> tuple:
    if prior is None:
        return ()
    if isinstance(prior, (list, tuple)):
        return tuple(prior)
    return (prior,)


class DSAPassManager(CustomGraphPass):
    """Runs the prior custom pass(es), then every enabled dsa_inductor rule, on each post-grad graph."""

    def __init__(self, rules: dict, verify: bool = False, prior: Any = None) -> None:
        self.rules = dict(rules)
        self.verify = verify
        self.prior = prior
        self.enabled = True

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config around compiles; the pass (and its traced patterns) is shared state.
        return self

    def configure(self, rules: dict, verify: bool) -> None:
        self.rules = dict(rules)
        self.verify = verify
        self.enabled = True

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in _as_tuple(self.prior):
            p(graph)
        if not self.enabled or not self.rules:
            return
        note_graph()
        batch1 = mm_to_bmm(graph)  # (GPU graphs: Inductor's batch-1 bmm -> mm, undone while we match)
        try:
            if not any(rule.candidates(graph) for rule in self.rules.values()):
                return
            canonicalize_broadcasts(graph)
            for rule in self.rules.values():
                rule.verify = self.verify
                rule.apply(graph)
        finally:
            bmm_to_mm(graph, batch1)

    def uuid(self) -> Optional[Any]:
        prior_ids = []
        for p in _as_tuple(self.prior):
            pid = p.uuid() if isinstance(p, CustomGraphPass) or hasattr(p, "uuid") else None
            if pid is None:
                return None
            prior_ids.append(pid)
        ours = ("dsa_inductor", package_source_hash(), tuple(sorted(self.rules)) if self.enabled else (),
                self.verify)
        return (ours, *prior_ids)
