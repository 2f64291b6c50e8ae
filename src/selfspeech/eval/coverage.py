"""How much of the reference the hypotheses cover; scoring only the covered part.

A reference id without a hypothesis is scored as all deletions. That is right
for a few utterances a labeller lost, and wrong when the hypotheses cover a
small part of the reference (a reference that is a superset of what was
decoded, a run not finished): the WER is then near 100% and says nothing
about the system. :func:`check_coverage` refuses such a pairing below a
minimum coverage; :class:`Covered` instead keeps only the references that
have a hypothesis in every system, and :func:`note_subset` says so in the
report.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence


class CoverageError(ValueError):
    """The hypotheses cover too few reference ids."""


class Covered:
    """The references that have a hypothesis in every source (``uid in source``), re-iterable; after an
    iteration ``total`` and ``kept`` count what was seen and kept."""

    def __init__(self, refs: Iterable[dict], sources: Sequence):
        self.refs, self.sources = refs, sources
        self.total = self.kept = 0

    def __iter__(self) -> Iterator[dict]:
        self.total = self.kept = 0
        for r in self.refs:
            self.total += 1
            if all(r["id"] in s for s in self.sources):
                self.kept += 1
                yield r


def subset_of(refs: Iterable[dict], sources: Sequence, ref_name: str) -> Covered:
    """The covered references, counted (one pass over the ids); CoverageError when there are none."""
    covered = Covered(refs, sources)
    for _ in covered:
        pass
    if not covered.kept:
        raise CoverageError(f"no reference id of {ref_name} has a hypothesis in every system: check that the "
                            "hypotheses belong to this reference (the ids must match)")
    return covered


def _systems(results: dict) -> list[dict]:
    return [results["system"]] + ([results["compare"]["system"]] if results.get("compare") else [])


def check_coverage(results: dict, min_coverage: float) -> dict:
    """Record each system's coverage in ``results["coverage"]``; CoverageError when one covers less than
    ``min_coverage`` of the reference ids (0 accepts any)."""
    n = results["reference"]["utterances"]
    rows = []
    for s in _systems(results):
        covered = n - s["missing"]["count"]
        rows.append({"name": s["name"], "covered": covered, "fraction": covered / n if n else 1.0})
    results["coverage"] = {"min_coverage": min_coverage, "subset": False, "references": n, "systems": rows}
    for r in rows:
        if r["fraction"] < min_coverage:
            raise CoverageError(
                f"{r['name']}: hypotheses for {r['covered']} of {n} reference ids of {results['reference']['name']} "
                f"({100 * r['fraction']:.1f}%, below --min-coverage {min_coverage:g}); decode the missing "
                f"utterances, give the reference they come from, or pass --subset to score only the "
                f"{r['covered']} that have one")
    return results


def note_subset(results: dict, covered: Covered, min_coverage: float) -> dict:
    """Say in ``results`` that only the ``covered.kept`` of ``covered.total`` references were scored."""
    left = covered.total - covered.kept
    results["coverage"] = {"min_coverage": min_coverage, "subset": True, "references": covered.total,
                           "systems": [{"name": s["name"], "covered": covered.kept,
                                        "fraction": covered.kept / covered.total if covered.total else 1.0}
                                       for s in _systems(results)]}
    results["notes"].append(f"subset: scored only the {covered.kept} of {covered.total} reference utterances that "
                            f"have a hypothesis in every system; the other {left} are left out, not counted as "
                            "deletions")
    return results
