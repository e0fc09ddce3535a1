"""Adapters to the benchmarks the field reports: CMMD and FID against a reference set, HPSv2.1, ImageReward, GenEval
and DPG-Bench. Each runs the benchmark's own model (and, for GenEval, its own evaluator) when the user has the
package and weights; none is needed to install slimdit or to run its tests. ``docs/benchmarks.md`` says what to
install for each.

Every adapter is a :class:`~slimdit.metrics.benchmarks.Benchmark` made by a ``make_*`` factory, which takes the
scoring model as an argument (the official one when omitted), so the protocol (prompt counts, images per prompt,
tiling, aggregation) is the same code whichever model scores.
"""

from __future__ import annotations


def register() -> None:
    """Put the adapters into :data:`slimdit.registry.BENCHMARKS` (no optional package is imported)."""
    from slimdit import registry
    from slimdit.metrics.external.cmmd import make_cmmd
    from slimdit.metrics.external.dpg import make_dpg
    from slimdit.metrics.external.fid import make_fid
    from slimdit.metrics.external.geneval import make_geneval
    from slimdit.metrics.external.hpsv2 import make_hpsv2
    from slimdit.metrics.external.imagereward import make_imagereward

    for name, factory in {"cmmd": make_cmmd, "fid": make_fid, "hpsv2": make_hpsv2, "imagereward": make_imagereward,
                          "geneval": make_geneval, "dpg-bench": make_dpg}.items():
        registry.BENCHMARKS[name] = factory()
