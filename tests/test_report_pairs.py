"""The declared pairs' decomposition of A − B under attack (drops vs margins), against a hand computation."""

import functools

import numpy as np
from test_report import EPS, grid, interval, make_run

import carlrar.report_pairs
from carlrar.report import paired_bootstrap
from carlrar.report_pairs import decomposition_section, swapped


def with_margins(method, clean, attacked):
    """A one-seed run of 4 examples with these clean margins and these margins after the attack (every ε alike)."""
    r = make_run(method, 0, n=4)
    r["per_example"]["margin"] = clean
    r["per_example"]["clean_correct"] = [int(m > 0) for m in clean]
    for a in r["per_example"]["attacks"]:
        a["margin"], a["correct"] = attacked, [int(m > 0) for m in attacked]
    return r


def test_a_minus_b_splits_into_as_drops_on_bs_margins_and_as_margins_with_bs_drops(monkeypatch):
    monkeypatch.setattr(carlrar.report_pairs, "paired_bootstrap", functools.partial(paired_bootstrap, n_boot=300))
    # B: drops 0.8, 0.3, 1.0, 0 → right, right, right, wrong (75 %)
    b = with_margins("freelb", [1.0, 0.5, 2.0, -1.0], [0.2, 0.2, 1.0, -1.0])
    # A: drops 0.4, 0.1, 2.5, 0 → right, right, wrong, wrong (50 %): A − B = −25
    a = with_margins("carl", [1.5, 0.2, 2.0, -1.0], [1.1, 0.1, -0.5, -1.0])
    # B's margins − A's drops: 0.6, 0.4, −0.5, −1 → 50 %, −25; A's margins − B's drops: 0.7, −0.1, 1.0, −1 → 50 %, −25;
    # together: −25 − (−25) − (−25) = +25
    assert swapped([b], [a], EPS[0]).tolist() == [[1, 1, 0, 0]]
    assert swapped([a], [b], EPS[0]).tolist() == [[1, 0, 1, 0]]
    assert swapped([a], [a], EPS[0]).tolist() == [[1, 1, 0, 0]]  # its own margins and drops: what the attack did
    lines = decomposition_section(grid([a, b], 1), "toy", [["carl", "freelb"]])
    row = next(line for line in lines if line.startswith("| CARL − FreeLB (1 seeds) |"))
    cells = row.strip("| ").split(" | ")[1:]
    assert len(cells) == 4 * len(EPS)
    for e in range(len(EPS)):
        actual, drops, margins, together = cells[4 * e: 4 * e + 4]
        assert actual == "-25.00" and together == "+25.00"
        for cell in (drops, margins):
            mean, lo, hi = interval(cell)
            assert mean == -25.0 and lo <= mean <= hi


def test_pairs_without_recorded_margins_are_left_out():
    runs = [make_run("carl", 0), make_run("freelb", 0)]  # attacked before margins were recorded
    assert decomposition_section(grid(runs, 1), "toy", [["carl", "freelb"]]) == []
    assert decomposition_section(grid(runs, 1), "toy", [["rar", "freelb"]]) == []  # and a pair without runs
