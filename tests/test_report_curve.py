"""The report's distance to FreeLB's clean–robust curve, against hand computations: the frontier (a dominated FreeLB
variant does not lower the curve), linear interpolation between its variants, the ends, and the bootstrap."""

import numpy as np
import pytest
from test_report import EPS, grid, make_run, row

from carlrar.report_curve import curve_at, curve_section, frontier


def test_curve_interpolates_between_the_frontier_and_holds_its_ends():
    xs = np.array([[80.0, 85.0, 90.0, 84.0]])  # (84, 40) is beaten by (85, 52) both ways: off the frontier
    ys = np.array([[60.0, 52.0, 50.0, 40.0]])
    assert frontier(xs, ys).tolist() == [[True, True, True, False]]
    for clean, want, inside in ((82.0, 60 - 8 * 2 / 5, True),  # between (80, 60) and (85, 52), not (84, 40)
                                (87.5, 51.0, True), (85.0, 52.0, True),
                                (75.0, 60.0, False), (95.0, 50.0, False)):  # beyond the ends: the nearer end's
        at, between = curve_at(np.array([clean]), xs, ys)
        assert at[0] == pytest.approx(want) and bool(between[0]) is inside


def test_frontier_keeps_one_of_two_equal_variants_and_drops_a_weaker_twin():
    xs, ys = np.array([[80.0, 80.0, 80.0]]), np.array([[60.0, 60.0, 55.0]])
    assert frontier(xs, ys).tolist() == [[True, True, False]]  # neither equal one beats the other
    at, _ = curve_at(np.array([80.0]), xs, ys)
    assert at[0] == pytest.approx(60.0)


def toy(method, seed, clean, robust, family=None, n=20):
    """A run whose first ``clean`` / ``robust`` of n examples are correct (clean; under every ε)."""
    r = make_run(method, seed, n=n, config={"method": family or method})
    r["per_example"]["clean_correct"] = [1] * clean + [0] * (n - clean)
    for a in r["per_example"]["attacks"]:
        a["correct"] = [1] * robust + [0] * (n - robust)
    return r


def test_distance_is_the_methods_robust_accuracy_minus_the_curves_at_its_clean_accuracy():
    runs = [toy("freelb", s, 18, 10) for s in (0, 1)] + [toy("freelb-strong", s, 16, 14, "freelb") for s in (0, 1)]
    runs += [toy("freelb-weak", s, 17, 9, "freelb") for s in (0, 1)]  # dominated by FreeLB: not on the curve
    runs += [toy("carl", s, 17, 14) for s in (0, 1)]  # clean 85 %: the curve there is (50 + 70) / 2 = 60 %
    runs += [toy("rar", s, 19, 10) for s in (0, 1)]  # more accurate clean than every FreeLB: held at FreeLB's 50 %
    runs += [toy("rar-copy", s, 16, 14, "rar") for s in (0, 1)]  # exactly freelb-strong: on the curve
    lines = curve_section(grid(runs), "toy", n_boot=200)
    assert "FreeLB, freelb-strong, freelb-weak" in "\n".join(lines)
    carl = row(lines, "CARL").split(" | ")
    assert carl[1:3] == ["seeds 0, 1", "85.00"]
    assert all(cell.startswith("+10.00 [") and not cell.endswith("·") for cell in carl[3:3 + len(EPS)])
    assert row(lines, "RAR").split(" | ")[3].startswith("+0.00 [") and row(lines, "RAR").endswith("· |")
    copy = row(lines, "rar-copy")
    assert copy.split(" | ")[3].startswith("+0.00 [")
    lo, hi = (float(x) for x in carl[3].split("[")[1].rstrip("] ").split(", "))
    assert lo < 10.0 < hi  # the draws resample examples: the interval is not a point
    assert not any(line.startswith("| freelb-weak |") for line in lines)  # the family is the curve, not a row


def test_no_section_without_two_freelb_variants():
    runs = [toy("freelb", 0, 18, 10), toy("carl", 0, 17, 14)]
    assert curve_section(grid(runs, 1), "toy", n_boot=50) == []


def test_draw_means_equal_indexing_the_resampled_seeds_and_examples():
    from carlrar.report_curve import draw_means

    values = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    seeds, examples = [[0, 0, 2], [1, 2, 2]], [[3, 3, 0, 1], [2, 1, 0, 0]]  # two draws
    seed_w = np.array([np.bincount(s, minlength=3) for s in seeds])
    example_w = np.array([np.bincount(e, minlength=4) for e in examples])
    want = [values[s][:, e].mean() for s, e in zip(seeds, examples)]
    assert draw_means(values, seed_w, example_w) == pytest.approx(want)


def test_the_curves_variants_are_fixed_by_the_point_estimate_not_chosen_again_per_draw():
    def run(method, family, clean_idx, robust_idx, n=20):
        r = make_run(method, 0, n=n, config={"method": family})
        r["per_example"]["clean_correct"] = [int(i in clean_idx) for i in range(n)]
        for a in r["per_example"]["attacks"]:
            a["correct"] = [int(i in robust_idx) for i in range(n)]
        return r

    # freelb-weak (clean on examples 3-19, 85 %) is beaten both ways by FreeLB (0-17, 90 %) on all examples, but not
    # in the draws that favour examples 18-19: chosen again per draw it would enter the curve as its clean end and
    # pull the curve down there. CARL, more accurate clean, is held at FreeLB's end and is as robust: 0 in every draw.
    runs = [run("freelb", "freelb", range(18), range(12)), run("freelb-weak", "freelb", range(3, 20), range(3)),
            run("carl", "carl", range(19), range(12))]
    carl = row(curve_section(grid(runs, 1), "toy", n_boot=400), "CARL").split(" | ")
    assert carl[3] == "+0.00 [+0.00, +0.00] ·"


def test_the_section_names_the_curves_variants_per_seed_set_and_drops_a_dominated_one():
    runs = [toy("freelb", s, 18, 10) for s in (0, 1)] + [toy("freelb-strong", s, 16, 14, "freelb") for s in (0, 1)]
    runs += [toy("freelb-weak", s, 17, 9, "freelb") for s in (0, 1)] + [toy("carl", s, 17, 14) for s in (0, 1)]
    runs += [toy("rar", 0, 19, 10)]  # one seed: the curve on seed 0 alone
    lines = curve_section(grid(runs), "toy", n_boot=50)
    both = next(line for line in lines if line.startswith("- seeds 0, 1: "))
    assert both.count("ε=") == len(EPS) and "FreeLB (90.00), freelb-strong (80.00)" in both and "weak" not in both
    assert any(line.startswith("- seed 0: ") for line in lines)
