"""``carlrar report`` on synthetic run JSONs: Table 4 (projected k-PGD at ε = α), the cos bootstrap, variant names,
the Diagnostics section and the figures of diagnostics and branch runs, each against hand-computed values."""

import errno
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

import carlrar.report
import carlrar.report_families
from carlrar.errors import UserError
from carlrar.report import (Grid, aux_start, bootstrap_tables, diagnostics_section, grouped, paired_bootstrap, table2,
                            table4, table4b, tables)

EPS = (0.02, 0.075, 0.1)


def make_run(method, seed, *, cos=None, n=20, attack_cos=None, config=None, **extra):
    """A run JSON as ``carlrar reproduce`` writes it. ``cos``: per-example cos(R, R^adv) (every ε alike);
    ``attack_cos``: ε → mean_cos of the projected attack (default 0.9)."""
    cos = list(np.linspace(0.5, 0.9, n)) if cos is None else list(cos)
    attack_cos = attack_cos or {}
    return {"name": f"toy-{method}-s{seed}", "dataset": "toy", "method": method, "seed": seed, "seconds": 1.0,
            "config": {"method": method, **(config or {})},
            "final": {"steps": 300, "parameters": 1000, "train_seconds": 10.0, "dev": {"accuracy": 0.8}},
            "attack": {"n": n, "clean_accuracy": 0.8, "steps": 10, "norm": "l2", "init_mag": 0.0,
                       "attacks": [{"eps": e, "step_size": e / 4, "mean_cos": attack_cos.get(e, 0.9),
                                    "mean_euclid": 10 * e, "accuracy": 0.7} for e in EPS],
                       "distances": [{"alpha": 0.1, "step_size": 0.1, "mean_cos": -0.5, "mean_euclid": 15.0}]},
            "per_example": {"clean_correct": [1, 0] * (n // 2),
                            "attacks": [{"eps": e, "correct": [1, 0] * (n // 2), "cos": cos} for e in EPS],
                            "distances": [{"alpha": 0.1, "cos": cos}]},
            "curves": [{"step": s, "train_loss": 1 / s, "dev_accuracy": 0.5 + s / 1000} for s in (100, 200, 300)],
            **extra}


def grid(runs, n_seeds=2):
    return Grid(grouped(runs), n_seeds)


def row(lines, name):
    return next(line for line in lines if line.startswith(f"| {name} |"))


def interval(cell):
    """A "+1.00 [-0.50, +2.00]" table cell as (mean, lo, hi)."""
    return tuple(float(x) for x in cell.replace("[", "").replace("]", "").replace(",", "").split())


def test_table4_is_the_projected_attack_at_eps_alpha():
    runs = [make_run("freelb", 0), make_run("freelb", 1),
            make_run("carl", 0, attack_cos={0.1: 0.89, 0.075: 0.95, 0.02: 0.1}),
            make_run("carl", 1, attack_cos={0.1: 0.91, 0.075: 0.97, 0.02: 0.1})]
    lines = table4(grid(runs), "toy")
    assert lines[1].startswith("## Table 4 (toy):") and "projected to radius α" in lines[1]
    assert lines[3] == "| method | α=0.1 cos | α=0.1 Euclid | α=0.075 cos | α=0.075 Euclid |"  # not ε = 0.02
    # mean ± sample std of (0.89, 0.91) and of (0.95, 0.97): 0.90 ± 0.0141, 0.96 ± 0.0141; Euclid 10 ε
    assert row(lines, "CARL") == "| CARL | 0.9000 ± 0.0141 | 1.000 ± 0.000 | 0.9600 ± 0.0141 | 0.750 ± 0.000 |"
    assert row(lines, "FreeLB") == "| FreeLB | 0.9000 ± 0.0000 | 1.000 ± 0.000 | 0.9000 ± 0.0000 | 0.750 ± 0.000 |"
    extra = table4b(grid(runs), "toy")  # the unprojected distances, named as not the paper's
    assert "## Table 4b (toy, extra, not the paper's definition): unprojected 10 steps of size α" in extra[1]
    assert row(extra, "CARL") == "| CARL | -0.5000 ± 0.0000 | 15.000 ± 0.000 |"


def test_table2_shows_a_labelled_test_split_only_where_runs_have_one():
    runs = [make_run("freelb", s) for s in (0, 1)] + [make_run("carl", s) for s in (0, 1)]
    for r, acc in zip(runs, (0.80, 0.90, 0.70, 0.75)):
        r["final"]["test"] = {"accuracy": acc}
    del runs[3]["final"]["test"]  # a seed without one: the cell says how many seeds it has
    lines = table2(grid(runs))
    assert "test acc" in lines[2]
    assert row(lines, "FreeLB").split(" | ")[-2] == "85.00 ± 7.07" and row(lines, "CARL").split(" | ")[-2] == "70.00 [1]"
    assert "test acc" not in table2(grid([make_run("freelb", 0), make_run("carl", 0)], 1))[2]


def test_table4_without_the_papers_alphas_shows_every_eps():
    run = make_run("carl", 0, attack_cos={0.02: 0.99})
    run["attack"]["attacks"] = run["attack"]["attacks"][:1]
    lines = table4(grid([run], 1), "toy")
    assert "neither of the paper's α" in "\n".join(lines)
    assert row(lines, "CARL") == "| CARL | 0.9900 | 0.200 |"


def test_cos_bootstrap_of_a_constant_shift_and_every_variant_in_order(monkeypatch):
    monkeypatch.setattr(carlrar.report, "paired_bootstrap", functools.partial(paired_bootstrap, n_boot=500))
    cos = np.linspace(0.2, 0.9, 20)
    runs = [make_run(m, s, cos=cos + shift) for s in (0, 1)
            for m, shift in (("freelb", 0.0), ("carl", 0.0), ("carl-ratio", 0.05), ("rar-scratch", -0.1), ("base", 0))]
    lines = bootstrap_tables(grid(runs), "toy")
    cos_table = lines[lines.index(next(line for line in lines if "cos(R, R^adv) difference" in line)):]
    # every draw resamples the same examples for both, and the seeds agree: each draw's difference is the shift
    assert row(cos_table, "carl-ratio − FreeLB") == ("| carl-ratio − FreeLB | +0.0500 [+0.0500, +0.0500] | "
                                                     "+0.0500 [+0.0500, +0.0500] | +0.0500 [+0.0500, +0.0500] |")
    assert row(cos_table, "rar-scratch − FreeLB").startswith("| rar-scratch − FreeLB | -0.1000 [-0.1000, -0.1000] |")
    comparisons = [line.split(" | ")[0][2:] for line in cos_table if " − FreeLB" in line]
    assert comparisons == ["Fine-tune − FreeLB", "CARL − FreeLB", "carl-ratio − FreeLB", "rar-scratch − FreeLB"]
    accuracy_rows = [line.split(" | ")[0][2:] for line in lines[:lines.index(cos_table[0])] if " − FreeLB" in line]
    assert accuracy_rows == comparisons  # the accuracy bootstrap compares the same methods


def test_bootstrap_vs_freelb_is_on_the_seeds_both_methods_have_and_says_which(monkeypatch):
    """FreeLB's seeds 1 and 2 get every example right, seed 0 half of them; CARL ran seed 0 only, exactly as FreeLB's
    seed 0. Compared on the shared seed the difference is 0 in every draw; over FreeLB's three seeds it would be
    about −33 points. A method with no seed in common (rar, seed 3) has no row rather than an unpaired one."""
    monkeypatch.setattr(carlrar.report, "paired_bootstrap", functools.partial(paired_bootstrap, n_boot=300))
    runs = [make_run("freelb", s) for s in (0, 1, 2)] + [make_run("carl", 0), make_run("rar", 3)]
    for run in runs[1:3]:
        run["per_example"]["clean_correct"] = [1] * 20
        for a in run["per_example"]["attacks"]:
            a["correct"] = [1] * 20
    lines = bootstrap_tables(grid(runs, 3), "toy")
    zero = "+0.00 [+0.00, +0.00]"
    assert row(lines, "CARL − FreeLB (seed 0)") == f"| CARL − FreeLB (seed 0) | {zero} | {zero} | {zero} | {zero} |"
    assert not any(line.startswith("| RAR − FreeLB") for line in lines)
    both = grid([*runs[:3], *(make_run("carl", s) for s in (0, 1, 2))], 3)  # every seed shared: no seed list
    assert row(bootstrap_tables(both, "toy"), "CARL − FreeLB").startswith("| CARL − FreeLB | -33.33 [")


def test_cos_bootstrap_ci_excludes_zero_when_seeds_differ():
    rng = np.random.default_rng(0)
    common = rng.uniform(0.3, 0.9, 40)  # how hard each example is
    freelb = [common + rng.normal(0, 0.02, 40) for _ in range(3)]  # seeds differ a little
    runs = [make_run("freelb", s, cos=c, n=40) for s, c in enumerate(freelb)]
    runs += [make_run("carl", s, cos=c + 0.05, n=40) for s, c in enumerate(freelb)]
    lines = bootstrap_tables(grid(runs, 3), "toy")
    cells = row(lines[-3:], "CARL − FreeLB").split(" | ")[1:]
    for cell in cells:
        mean, lo, hi = interval(cell.strip(" |"))
        assert 0 < lo < mean < hi and mean == pytest.approx(0.05, abs=1e-4)  # seed resampling widens it


def diagnostics(start, ratios, cos):
    """Records every 25 steps from ``start`` − 25: one before the start (excluded), two in the window, one after
    (excluded); ∇L_C = 2, so ‖∇L_D‖ = 2 × ratio."""
    inside = [{"step": start + k * 25, "grad_C": 2.0, "grad_D": 2.0 * r, "cos_C_D": c, "clip_factor": 0.5,
               "grad_norm": 4.0} for k, (r, c) in enumerate(zip(ratios, cos))]
    return [{"step": start - 25, "grad_C": 2.0, "grad_D": 2000.0, "clip_factor": 0.0}, *inside,
            {"step": start + 50, "grad_C": 2.0, "grad_D": 2000.0, "cos_C_D": 1.0, "clip_factor": 0.0}]


def test_diagnostics_section_median_over_seeds_of_the_window_means():
    runs = [make_run("carl", 0, config={"carl_start_step": 100}, diagnostics=diagnostics(100, (10, 20), (-0.1, 0.1))),
            make_run("carl", 1, config={"carl_start_step": 100}, diagnostics=diagnostics(100, (20, 40), (-0.2, -0.2))),
            make_run("carl", 2, config={"carl_start_step": 100}, diagnostics=diagnostics(100, (40, 40), (0.3, 0.3))),
            make_run("freelb", 0)]
    lines = diagnostics_section(grid(runs, 3), "toy")
    # window means: ratios 15, 30, 40 → median 30; cos 0, -0.2, 0.3 → median 0; clip factor 0.5 throughout
    assert row(lines, "CARL") == "| CARL | 3 | 100 | 30.00 | +0.000 | – | – | 0.500 |"
    assert not any(line.startswith("| FreeLB") for line in lines)  # no diagnostics: no row
    assert diagnostics_section(grid([make_run("freelb", 0)]), "toy") == []  # none anywhere: no section



def with_margins(run, margin, drops):
    """``run`` with the margin fields ``attack_split`` records: clean margin, and per ε a drop (Euclid is 10 ε)."""
    run["attack"]["mean_margin"] = margin
    for a in run["attack"]["attacks"]:
        a.update(mean_margin_drop=drops[a["eps"]], margin_drop_per_distance=drops[a["eps"]] / a["mean_euclid"])
    return run


def test_margin_section_by_hand_and_absent_for_runs_attacked_before_margins():
    from carlrar.report import margin_section

    runs = [with_margins(make_run("freelb", 0), 3.0, {0.02: 0.1, 0.075: 0.6, 0.1: 1.0}),
            with_margins(make_run("carl", 0), 2.5, {0.02: 0.1, 0.075: 0.3, 0.1: 0.5}),
            with_margins(make_run("carl", 1), 3.5, {0.02: 0.1, 0.075: 0.9, 0.1: 1.5}), make_run("rar", 0),
            make_run("carl", 2)]  # attacked before margins were recorded: left out of CARL's cells
    lines = margin_section(grid(runs, n_seeds=3), "toy")
    assert lines[1] == "## Margins (toy): why R turning less need not mean fewer flips"
    assert lines[5] == ("| method | clean margin | α=0.1 ‖R − R^adv‖ | α=0.1 margin drop | α=0.1 drop / ‖R − R^adv‖ | "
                        "α=0.1 drop / clean margin | α=0.075 ‖R − R^adv‖ | α=0.075 margin drop | "
                        "α=0.075 drop / ‖R − R^adv‖ | α=0.075 drop / clean margin |")
    # CARL: margins 2.5, 3.5 → 3.000 ± 0.707; drops at 0.1: 0.5, 1.5 → 1.000 ± 0.707, per ‖ΔR‖ = 1: 1.000 ± 0.707,
    # per margin 0.2, 3/7 → 0.314 ± 0.162; at 0.075: 0.3, 0.9 → 0.600 ± 0.424, per ‖ΔR‖ = 0.75: 0.800 ± 0.566,
    # per margin 0.12, 9/35 → 0.189 ± 0.097
    # (‖ΔR‖ is over all three seeds, as in Table 4; the margin cells over the two that recorded margins)
    assert row(lines, "CARL") == ("| CARL | 3.000 ± 0.707 [2] | 1.000 ± 0.000 | 1.000 ± 0.707 [2] | 1.000 ± 0.707 [2] | "
                                  "0.314 ± 0.162 [2] | 0.750 ± 0.000 | 0.600 ± 0.424 [2] | 0.800 ± 0.566 [2] | "
                                  "0.189 ± 0.097 [2] |")
    assert row(lines, "FreeLB").startswith("| FreeLB | 3.000 [1] | 1.000 [1] | 1.000 [1] | 1.000 [1] | 0.333 [1] |")
    assert not any(line.startswith("| RAR") for line in lines)  # attacked before margins were recorded
    assert margin_section(grid([make_run("freelb", 0)]), "toy") == []


def test_seed_count_is_every_planned_seed_not_only_the_last_commands(monkeypatch):
    monkeypatch.setattr(carlrar.report, "albert_parameter_counts", lambda: {"base": 11, "rar": 12})
    runs = [make_run("freelb", s) for s in (0, 1, 2)] + [make_run("carl", 0)]
    index = {"protocol": {"seeds": [2]}, "runs": {r["name"]: {"seed": r["seed"], "status": "done"} for r in runs}}
    text = tables(index, runs)  # the last command ran --seeds 2, alone; seeds 0 and 1 came before
    assert "fewer than the grid's 3" in text
    assert row(text.splitlines(), "CARL").startswith("| CARL | 80.00 [1] |")


def test_report_without_diagnostics_has_no_such_section_or_figure(monkeypatch):
    monkeypatch.setattr(carlrar.report, "albert_parameter_counts", lambda: {"base": 11, "rar": 12})
    text = tables({"protocol": {"seeds": [0]}, "runs": {}}, [make_run("freelb", 0), make_run("carl", 0)])
    assert "## Diagnostics" not in text and "## Table 4 (toy)" in text


def test_aux_start_of_carl_and_branch_runs():
    assert aux_start(make_run("carl", 0, config={"carl_start_step": 0.5})) == 150  # half of final["steps"] = 300
    assert aux_start(make_run("carl", 0, config={"carl_start_step": 120})) == 120
    assert aux_start(make_run("carl", 0, config={"carl_start_step": 0.5}, branch={"trunk": "t", "step": 40})) == 40
    assert aux_start(make_run("freelb", 0)) is None


def branch_run(method, seed, trunk_steps=(100, 200), step=200):
    """A run branched from a FreeLB trunk at ``step``: the trunk's curves up to there, its own after."""
    run = make_run(method, seed, config={"carl_start_step": 0.5}, branch={"trunk": f"toy-freelb-s{seed}", "step": step},
                   trunk_curves=[{"step": s, "train_loss": 1 / s, "dev_accuracy": 0.6, "val_accuracy": 0.65}
                                 for s in trunk_steps],
                   diagnostics=diagnostics(step, (30, 50), (-0.06, -0.05)))
    run["curves"] = [{"step": s, "train_loss": 1 / s, "train_loss_D": 3.0, "dev_accuracy": 0.7, "val_accuracy": 0.72}
                     for s in (250, 300)]
    run["final"]["validation"] = {"accuracy": 0.72 + seed / 100}
    return run


def test_report_with_diagnostics_branches_and_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(carlrar.report, "albert_parameter_counts", lambda: {"base": 11, "rar": 12})
    runs = [make_run("freelb", s, diagnostics=[{"step": 25 * k, "grad_C": 1.0, "grad_norm": 2.0, "clip_factor": 0.5}
                                              for k in range(1, 5)]) for s in (0, 1)]
    runs += [branch_run("carl-branch", s) for s in (0, 1)]
    (tmp_path / "runs").mkdir()
    for r in runs:
        (tmp_path / "runs" / f"{r['name']}.json").write_text(json.dumps(r))
    index = {"command": "test", "protocol": {"seeds": [0, 1]}, "runs": {r["name"]: {"status": "done"} for r in runs}}
    index["runs"]["toy-trunk-s0"] = {"status": "done", "method": "trunk"}  # trained for the branches, not reported
    (tmp_path / "index.json").write_text(json.dumps(index))
    out, pngs = carlrar.report.write_report(tmp_path)
    assert {p.name for p in pngs} == {"accuracy_vs_eps.png", "training_curves_toy.png", "cos_histogram_toy.png",
                                      "tradeoff_toy.png", "diagnostics_toy.png"}
    for p in pngs:
        assert p.stat().st_size > 10_000, p
    report = out.read_text()
    assert "Runs: 4 finished of 4 in the grid" in report
    # window [200, 250) of the branch: ratios 30, 50 → 40 for both seeds
    assert "| carl-branch | 2 | 200 | 40.00 | -0.055 | – | – | 0.500 |" in report
    assert "| FreeLB | 2 | 0 | – | – | – | – | 0.500 |" in report
    assert row(table2(grid(runs)), "carl-branch") == "| carl-branch | 80.00 ± 0.00 | 72.50 ± 0.71 | +0.00 |"
    assert "validation acc (selection)" in report
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)  # PNG although written under a temporary name
    assert not list(tmp_path.glob(".*"))  # no temporary file left

    def half_then_fail(self, text, *a, **kw):  # the disk fills mid-write: the old report stays whole
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(UserError, match="cannot write .*report.md: No space left"):
        carlrar.report.write_report(tmp_path)
    assert out.read_text() == report and not list(tmp_path.glob(".*"))


def test_each_familys_best_variant_is_chosen_on_validation_never_on_dev():
    """carl vs carl-proj tie on mean validation (81.00): the paper's default wins; carl-balanced has the best dev
    (95 %) but a lower validation mean, so it is not chosen; rar-warm beats rar on validation (71.0 vs 70.0)."""
    runs = [make_run("freelb", s) for s in (0, 1)]
    for name, family, validation, dev in (("carl", "carl", (0.80, 0.82), 0.8), ("carl-proj", "carl", (0.81, 0.81), 0.8),
                                          ("carl-balanced", "carl", (0.79, 0.81), 0.95), ("rar", "rar", (0.70, 0.70), 0.8),
                                          ("rar-warm", "rar", (0.71, 0.71), 0.8)):
        for seed, v in enumerate(validation):
            run = make_run(name, seed, config={"method": family})
            run["final"].update(validation={"accuracy": v}, dev={"accuracy": dev})
            runs.append(run)
    best = carlrar.report_families.family_best(grid(runs), "toy")
    assert [(m, round(v, 4), n) for m, v, n in best["carl"]] == [("carl", 0.81, 2), ("carl-proj", 0.81, 2),
                                                                 ("carl-balanced", 0.80, 2)]
    assert [m for m, _, _ in best["rar"]] == ["rar-warm", "rar"]
    lines = carlrar.report_families.family_tables(grid(runs), "toy")
    assert row(lines, "CARL") == "| CARL | CARL 81.00 (2), carl-proj 81.00 (2), carl-balanced 80.00 (2) | CARL |"
    assert row(lines, "RAR") == "| RAR | rar-warm 71.00 (2), RAR 70.00 (2) | rar-warm |"
    assert [line.split(" |")[0] for line in lines if "− FreeLB |" in line] == ["| CARL − FreeLB", "| rar-warm − FreeLB"]
    # identical per-example correctness in the synthetic runs: every difference is 0
    assert row(lines, "rar-warm − FreeLB").count("+0.00 [+0.00, +0.00]") == 4


def test_the_family_rule_ranks_on_the_protocols_selection_seeds_only():
    """carl-proj later runs on seed 2 too, where it scores 99 %: with selection_seeds [0, 1] it is still ranked on
    seeds 0-1 (80.5 < carl's 81.0) and carl stays the choice; without, its three-seed mean (86.67) would win."""
    runs = [make_run("freelb", s) for s in (0, 1, 2)]
    for name, validation in (("carl", (0.80, 0.82)), ("carl-proj", (0.80, 0.81, 0.99))):
        for seed, v in enumerate(validation):
            run = make_run(name, seed, config={"method": "carl"})
            run["final"].update(validation={"accuracy": v})
            runs.append(run)
    ranked = lambda seeds: [(m, round(v, 4), n) for m, v, n in  # noqa: E731
                            carlrar.report_families.family_best(grid(runs, 3), "toy", seeds=seeds)["carl"]]
    assert ranked([0, 1]) == [("carl", 0.81, 2), ("carl-proj", 0.805, 2)]
    assert ranked(None) == [("carl-proj", 0.8667, 3), ("carl", 0.81, 2)]
    lines = carlrar.report_families.family_tables(grid(runs, 3), "toy", [0, 1])
    assert row(lines, "CARL") == "| CARL | CARL 81.00 (2), carl-proj 80.50 (2) | CARL |"
    assert "only seeds 0, 1, the protocol's `selection_seeds`" in "\n".join(lines)
    # the chosen variant's bootstrap vs FreeLB still uses every seed both have
    assert "| CARL − FreeLB (seeds 0, 1) |" in "\n".join(lines)


def test_the_family_rule_leaves_out_the_protocols_declared_diagnostics():
    """The paper's CARL is declared a diagnostic on toy (selection_excluded): its 90 % validation would win, so left
    out, carl-proj (81 %) is chosen, and the table says what was left out; without the key carl wins."""
    runs = [make_run("freelb", s) for s in (0, 1)]
    for name, validation in (("carl", 0.90), ("carl-proj", 0.81), ("carl-nce", 0.80)):
        for seed in (0, 1):
            run = make_run(name, seed, config={"method": "carl"})
            run["final"].update(validation={"accuracy": validation})
            runs.append(run)
    best = lambda excluded: [m for m, _, _ in  # noqa: E731
                             carlrar.report_families.family_best(grid(runs), "toy", excluded=excluded)["carl"]]
    assert best(["carl"]) == ["carl-proj", "carl-nce"] and best(None) == ["carl", "carl-proj", "carl-nce"]
    lines = carlrar.report_families.family_tables(grid(runs), "toy", None, ["carl", "rar"])
    assert row(lines, "CARL") == "| CARL | carl-proj 81.00 (2), carl-nce 80.00 (2) | carl-proj |"
    text = "\n".join(lines)
    assert "Left out, declared as diagnostics on toy (the protocol's `selection_excluded`): CARL." in text
    assert "| carl-proj − FreeLB |" in text and "| CARL − FreeLB |" not in text


def test_search_section_by_hand_beside_the_grids_default_run(tmp_path):
    """One row per study: completed trials, the best objective and the median over completed trials, the best trial's
    clean accuracy and knobs, and the grid's default run's clean validation; studies with nothing completed left out."""
    from carlrar.report_search import search_section, validation_attack

    trials = [{"number": 0, "state": "COMPLETE", "value": 0.70, "adv_lr": 0.05, "clean_accuracy": 0.90},
              {"number": 1, "state": "COMPLETE", "value": 0.74, "adv_lr": 0.125, "clean_accuracy": 0.88},
              {"number": 2, "state": "PRUNED", "value": None, "adv_lr": 0.2},
              {"number": 3, "state": "COMPLETE", "value": 0.71, "adv_lr": 0.01, "clean_accuracy": 0.91}]
    for method, content in (("freelb", trials), ("carl", [{"number": 0, "state": "RUNNING", "value": None}])):
        (tmp_path / "search-s2" / method).mkdir(parents=True)
        (tmp_path / "search-s2" / method / "trials.json").write_text(json.dumps(content))
    runs = [{"name": "toy-freelb-s0", "method": "freelb", "seed": 0, "final": {"validation": {"accuracy": 0.5}}},
            {"name": "toy-freelb-s2", "method": "freelb", "seed": 2, "final": {"validation": {"accuracy": 0.895}}}]
    rows = [line for line in search_section(tmp_path, runs) if line.startswith("| freelb")]
    assert rows == ["| freelb | 2 | 3 of 4 | robust | 74.00 | 71.00 | 88.00 | adv_lr 0.125 | 89.50 | — |"]
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "toy-freelb-s2.json").write_text(json.dumps({"attacks": [{"eps": 0.1, "accuracy": 0.76}]}))
    for run in runs:  # as report.load_runs attaches them
        run["validation_attack"] = validation_attack(tmp_path / "validation" / f"{run['name']}.json")
    lines = search_section(tmp_path, runs)
    rows = [line for line in lines if line.startswith("| freelb")]
    assert rows == ["| freelb | 2 | 3 of 4 | robust | 74.00 | 71.00 | 88.00 | adv_lr 0.125 | 89.50 | 76.00 at ε 0.1 |"]
    assert not [line for line in lines if line.startswith("| carl")]
    assert search_section(tmp_path / "nothing", runs) == []
    (tmp_path / "search-s2" / "carl" / "trials.json").write_text("{}")
    with pytest.raises(UserError, match="trials.json: not a trials.json written by carlrar search"):
        search_section(tmp_path, runs)


def test_a_tuned_freelb_that_wins_on_validation_is_a_second_reference():
    """The FreeLB family is chosen on validation like the others: freelb-tuned (91 %) beats freelb (90 %), so each
    family's choice is compared with freelb-tuned as well as with the protocol's FreeLB."""
    runs = []
    for name, family, validation in (("freelb", "freelb", 0.90), ("freelb-tuned", "freelb", 0.91),
                                     ("carl", "carl", 0.80), ("carl-proj", "carl", 0.82)):
        for seed in (0, 1):
            run = make_run(name, seed, config={"method": family})
            run["final"].update(validation={"accuracy": validation})
            runs.append(run)
    lines = carlrar.report_families.family_tables(grid(runs), "toy")
    assert row(lines, "FreeLB") == "| FreeLB | freelb-tuned 91.00 (2), FreeLB 90.00 (2) | freelb-tuned |"
    assert [line.split(" |")[0] for line in lines if line.startswith("| carl-proj −")] == [
        "| carl-proj − FreeLB", "| carl-proj − freelb-tuned"]
    assert [line.split(" |")[0] for line in lines if line.startswith("| chosen −")] == [
        "| chosen − FreeLB (dev, 95 % CI)", "| chosen − freelb-tuned (dev, 95 % CI)"]
    assert "| freelb-tuned − FreeLB" in [line.split(" |")[0] for line in lines]


def test_family_choice_under_attack_on_validation_beside_the_clean_rule():
    """Where runs were attacked on validation (every seed), the family table adds the same rule on that accuracy:
    here freelb-tuned wins clean validation (91 vs 90) but freelb wins under attack (76 vs 74); carl-proj is not
    measured on every seed, so only carl competes under attack."""
    runs = []
    for name, family, validation, robust in (("freelb", "freelb", 0.90, (0.76, 0.76)),
                                             ("freelb-tuned", "freelb", 0.91, (0.74, 0.74)),
                                             ("carl", "carl", 0.80, (0.70, 0.72)), ("carl-proj", "carl", 0.82, (0.9, None))):
        for seed in (0, 1):
            run = make_run(name, seed, config={"method": family})
            run["final"].update(validation={"accuracy": validation})
            run["validation_attack"] = [{"eps": 0.1, "accuracy": robust[seed]}] if robust[seed] else None
            runs.append(run)
    lines = carlrar.report_families.family_tables(grid(runs), "toy")
    assert row(lines, "FreeLB") == ("| FreeLB | freelb-tuned 91.00 (2), FreeLB 90.00 (2) | freelb-tuned | "
                                    "FreeLB 76.00 (2), freelb-tuned 74.00 (2) | FreeLB |")
    assert row(lines, "CARL") == "| CARL | carl-proj 82.00 (2), CARL 80.00 (2) | carl-proj | CARL 71.00 (2) | CARL |"
    assert any("under k-PGD at ε = 0.1" in line for line in lines)
    # both rules' choices are bootstrapped: carl-proj (clean rule) and CARL (under attack), vs both FreeLBs
    assert [line.split(" |")[0] for line in lines if line.startswith(("| CARL −", "| carl-proj −"))] == [
        "| CARL − FreeLB", "| carl-proj − FreeLB", "| CARL − freelb-tuned", "| carl-proj − freelb-tuned"]
    for run in runs:
        run["validation_attack"] = None
    assert row(carlrar.report_families.family_tables(grid(runs), "toy"), "CARL") == "| CARL | carl-proj 82.00 (2), CARL 80.00 (2) | carl-proj |"


def test_declared_pairs_compare_a_with_b_on_the_seeds_both_have_per_seed_and_bootstrapped(monkeypatch):
    """carl-tuned-wide turns 2 of 20 wrong examples right under every ε and its cos is 0.05 higher; freelb-wide's
    seed 2 (every example right) has no partner and must not count."""
    import carlrar.report_pairs
    from carlrar.report_pairs import pair_section

    monkeypatch.setattr(carlrar.report_pairs, "paired_bootstrap", functools.partial(paired_bootstrap, n_boot=500))

    cos = np.linspace(0.2, 0.9, 20)
    runs = [make_run("freelb-wide", s, cos=cos) for s in (0, 1)] + [make_run("carl-tuned-wide", s, cos=cos + 0.05)
                                                                     for s in (0, 1)]
    lonely = make_run("freelb-wide", 2, cos=cos)
    lonely["per_example"]["attacks"] = [{"eps": e, "correct": [1] * 20, "cos": list(cos)} for e in EPS]
    runs.append(lonely)
    for run in runs[2:4]:
        run["final"]["dev"]["accuracy"] = 0.81
        for a in run["attack"]["attacks"]:
            a["accuracy"] = 0.8
        for a in run["per_example"]["attacks"]:
            a["correct"] = [1, 1, 1, 1] + [1, 0] * 8
    lines = pair_section(grid(runs, 3), "toy", [["carl-tuned-wide", "freelb-wide"], ["carl", "freelb"]])
    total = next(line for line in lines if line.startswith("| **carl-tuned-wide − freelb-wide** (2 seeds"))
    cells = total.split(" | ")[1:]
    assert cells[0] == "+1.00" and cells[1] == "+0.00 [+0.00, +0.00]"  # all of dev; the attacked examples clean
    for cell in cells[2:5]:
        mean, lo, hi = interval(cell)
        assert mean == 10.0 and 0 <= lo < mean < hi <= 25  # resampling the 20 examples: how many of the 2 are drawn
    assert cells[5] == "+0.0500 [+0.0500, +0.0500] |"
    per_seed = [line for line in lines if line.startswith("| carl-tuned-wide − freelb-wide, seed")]
    assert per_seed == [f"| carl-tuned-wide − freelb-wide, seed {s} | +1.00 | +0.00 | +10.00 | +10.00 | +10.00 | "
                        "+0.0500 |" for s in (0, 1)]
    assert not any("carl − freelb" in line.lower() for line in lines)  # a pair without runs is left out
    assert pair_section(grid(runs, 3), "toy", [["carl", "freelb"]]) == []


def test_declared_pairs_come_from_the_index_else_from_the_protocol_file_if_found(tmp_path):
    from carlrar.report_pairs import declared, declared_pairs

    assert declared_pairs({"pairs": [["a", "b"]], "source": "converged"}) == [["a", "b"]]
    assert declared_pairs({"pairs": None}) == []
    moved = {"source": "/elsewhere/protocols/converged.yaml"}  # another machine's path: the shipped name is found
    assert ["carl-tuned-wide", "freelb-wide"] in declared_pairs(moved)
    assert declared_pairs({"source": str(tmp_path / "gone.yaml")}) == [] and declared_pairs({}) == []
    assert declared({"source": "converged"}, "selection_seeds") == [0, 1, 2]  # a results folder from before the key
    assert declared({"selection_seeds": [0], "source": "converged"}, "selection_seeds") == [0]
    assert declared({"source": "converged"}, "selection_excluded") == {"agnews": ["carl", "carl-rar", "rar", "base"]}


def tradeoff_run(method, seed, clean, robust):
    """A run whose clean accuracy and accuracy at the largest ε are the tradeoff plot's two coordinates."""
    r = make_run(method, seed)
    r["attack"]["clean_accuracy"] = clean
    r["attack"]["attacks"][-1]["accuracy"] = robust  # the largest ε
    return r


def test_tradeoff_points_average_over_the_seeds_every_method_has():
    from carlrar.report_plots import tradeoff_points

    run = tradeoff_run
    by_method = {"freelb": [run("freelb", 0, 0.80, 0.60), run("freelb", 1, 0.90, 0.70), run("freelb", 2, 0.5, 0.1)],
                 "carl": [run("carl", 0, 0.70, 0.65), run("carl", 1, 0.80, 0.75)],
                 "rar": [run("rar", 0, 0.70, 0.65), run("rar", 1, 0.80, 0.75)]}
    points, shared, eps = tradeoff_points(by_method)
    assert shared == {0, 1} and eps == max(EPS)  # FreeLB's seed 2 is left out: CARL lacks it
    assert points["freelb"] == pytest.approx((85.0, 65.0)) and points["carl"] == pytest.approx((75.0, 70.0))
    by_method["probe"] = [run("probe", 1, 0.1, 0.1)]  # one seed where the others have two or more: left out
    points, shared, _ = tradeoff_points(by_method)
    assert shared == {0, 1} and set(points) == {"freelb", "carl", "rar"}


def test_tradeoff_labels_stay_inside_the_axes(monkeypatch, tmp_path):
    """A long name on the most accurate point once ran past the plot's right edge: every label lies inside the axes."""
    import carlrar.report_plots as plots

    names = ["freelb", "carl", "a-very-long-variant-name-on-the-right"]
    by_method = {m: [tradeoff_run(m, 0, c, 0.5)] for m, c in zip(names, (0.80, 0.85, 0.90))}
    seen = []

    def keep(fig, path):  # instead of writing: measure the drawn labels
        fig.canvas.draw()
        ax = fig.axes[0]
        box = ax.get_window_extent()
        seen.extend((t.get_text(), t.get_window_extent(), box) for t in ax.texts)
        return path

    monkeypatch.setattr(plots, "save", keep)
    plots.tradeoff("toy", by_method, {m: "C0" for m in names}, tmp_path / "t.png")
    assert {text for text, _, _ in seen} == {plots.NAMES.get(m, m) for m in names}
    for text, extent, box in seen:
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text
