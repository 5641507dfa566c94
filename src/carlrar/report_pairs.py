"""``carlrar report``'s declared pairs: the comparisons a protocol names in ``pairs:`` beside the tables against
FreeLB, e.g. a diagnostic variant against the baseline that shares its perturbation (``[carl-tuned-wide,
freelb-wide]``). Each pair: A − B per seed, and the paired bootstrap over the seeds both have; then what A − B
under attack is made of (``decomposition_section``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlrar.errors import UserError
from carlrar.report import (NAMES, Grid, correctness, cosines, example_cos, find, md_table, paired_bootstrap, points,
                            seed_runs)


def declared(protocol: dict, key: str) -> list | dict:
    """The index's protocol's ``key`` (``pairs``, ``selection_seeds``, ``selection_excluded``); for a results folder
    from before the key existed, its protocol file's, if still found (these choose what the report shows, not how any
    run was trained)."""
    if key in protocol:
        return protocol[key] or []
    from carlrar.reproduce import Protocol

    for name in (protocol.get("source"), Path(protocol.get("source") or "").stem):
        try:
            return getattr(Protocol.load(name), key) if name else []
        except UserError:
            continue
    return []


def declared_pairs(protocol: dict) -> list[list[str]]:
    return declared(protocol, "pairs")


def pair_section(grid: Grid, d: str, pairs: list[list[str]]) -> list[str]:
    """One bootstrap row and one row per seed for each declared pair with runs of both on dataset d."""
    eps = [x["eps"] for x in grid.attack(d)["attacks"]]
    under = lambda run, e: find(run["attack"]["attacks"], "eps", e)["accuracy"]  # noqa: E731
    rows = []
    for a, b in pairs:
        ra, rb = seed_runs(grid, d, a, b)
        if not ra:
            continue
        name = f"{NAMES.get(a, a)} − {NAMES.get(b, b)}"
        dev = 100 * (sum(r["final"]["dev"]["accuracy"] for r in ra) - sum(r["final"]["dev"]["accuracy"] for r in rb))
        cos = [cosines(*paired_bootstrap(example_cos(ra, eps[-1]), example_cos(rb, eps[-1])))] if eps else []
        rows.append([f"**{name}** ({len(ra)} seeds, 95 % CI)", f"{dev / len(ra):+.2f}",
                     *(points(*paired_bootstrap(correctness(ra, e), correctness(rb, e))) for e in [None, *eps]), *cos])
        for x, y in zip(ra, rb):  # per seed: the pair's branches share that seed's trunk
            rows.append([f"{name}, seed {x['seed']}",
                         f"{100 * (x['final']['dev']['accuracy'] - y['final']['dev']['accuracy']):+.2f}",
                         f"{100 * (correctness([x], None).mean() - correctness([y], None).mean()):+.2f}",
                         *(f"{100 * (under(x, e) - under(y, e)):+.2f}" for e in eps),
                         *[f"{example_cos([x], e).mean() - example_cos([y], e).mean():+.4f}" for e in eps[-1:]]])
    if not rows:
        return []
    return ["", f"## Declared pairs ({d}): A − B, percentage points", "",
            "The protocol's `pairs:`, each compared on the seeds both have: clean accuracy on all of dev, then on the "
            "attacked dev examples and under attack, with the paired bootstrap (10,000 draws resampling the examples "
            "and each method's seeds) and per seed; last, the per-example cos(R, R^adv) difference at the largest ε.",
            "", *md_table(["pair", "clean dev", "clean (attacked examples)", *(f"ε={e:g}" for e in eps),
                           *([f"cos, ε={eps[-1]:g}"] if eps else [])], rows)]


def swapped(clean: list[dict], attacked: list[dict], eps: float) -> np.ndarray:
    """Seeds × examples 0/1: correct under the attack at ε if each example had ``clean``'s clean logit margin and
    lost ``attacked``'s margin drop (its clean margin minus its margin after the attack), seed by seed."""
    rows = []
    for c, a in zip(clean, attacked):
        margin = np.array(c["per_example"]["margin"])
        drop = np.array(a["per_example"]["margin"]) - np.array(find(a["per_example"]["attacks"], "eps", eps)["margin"])
        rows.append((margin - drop > 0).astype(float))
    return np.array(rows)


def has_margins(runs: list[dict]) -> bool:
    return all("margin" in r["per_example"] and all("margin" in x for x in r["per_example"]["attacks"]) for r in runs)


def decomposition_section(grid: Grid, d: str, pairs: list[list[str]]) -> list[str]:
    """Each declared pair's A − B under attack, split by swapping one of the two things an example's fate depends on
    (it flips when the attack's margin drop exceeds its clean margin): B's margins with A's drops (what A's attack
    robustness alone is worth) and A's margins with B's drops (what A's clean confidence alone is worth); what is
    left of A − B is the two together (examples both swaps save or lose count once in A − B, twice in the sum)."""
    eps = [x["eps"] for x in grid.attack(d)["attacks"]]
    rows = []
    for a, b in pairs:
        ra, rb = seed_runs(grid, d, a, b)
        if not ra or not eps or not has_margins(ra + rb):
            continue
        row = [f"{NAMES.get(a, a)} − {NAMES.get(b, b)} ({len(ra)} seeds)"]
        for e in eps:
            b_actual = correctness(rb, e)
            actual = correctness(ra, e).mean() - b_actual.mean()
            drops, margins = (paired_bootstrap(swapped(*order, e), b_actual) for order in ((rb, ra), (ra, rb)))
            row += [f"{100 * actual:+.2f}", points(*drops), points(*margins),
                    f"{100 * (actual - drops[0] - margins[0]):+.2f}"]  # bootstrap's first: the point estimate
        rows.append(row)
    if not rows:
        return []
    header = ["pair"] + [f"ε={e:g} {what}" for e in eps for what in ("A − B", "A's drops", "A's margins", "together")]
    return ["", f"## Declared pairs ({d}): what A − B under attack is made of, percentage points", "",
            "An attacked example stays correct when its clean logit margin exceeds the margin the attack takes off "
            "(its drop). Swapping one of the two per example and seed: *A's drops* is B's clean margins with A's "
            "drops, minus B (what A's smaller or larger drops alone are worth); *A's margins* is A's clean margins "
            "with B's drops, minus B (what A's clean confidence alone is worth); *together* is what is left of A − B: "
            "an example both swaps save (or lose) counts once in A − B and twice in their sum, and some examples "
            "only A's drops and margins together save or lose. 95 % CIs: the paired bootstrap as above.", "", *md_table(header, rows)]
