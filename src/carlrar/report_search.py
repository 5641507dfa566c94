"""``carlrar report``'s Searches section: the equal-trial searches kept in a results folder
(``scripts/converged-search.sh`` writes ``RESULTS/search-s<seed>/<method>/trials.json`` through ``carlrar search``),
one row per study beside the grid's run of the same method and seed with the paper's defaults, so that a reader sees
how much each method's own knobs were worth on validation, and that the baseline was searched as hard; and the runs'
accuracy under attack on their validation split (``RESULTS/validation/<run>.json``), which the family table of
``carlrar report`` also chooses on."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from carlrar.errors import UserError

OUTCOME = ("number", "state", "value", "clean_accuracy")  # trials.json keys that are not the trial's knobs


def knobs(trial: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in trial.items() if k not in OUTCOME)


def default_run(runs: list[dict], method: str, seed: int) -> dict | None:
    """The grid's run of ``method`` with the protocol's settings (no variant) on ``seed``, if there is one."""
    return next((r for r in runs if r["method"] == method and r["seed"] == seed), None)


def read_trials(path: Path) -> list[dict]:
    try:
        trials = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        trials = None
    if not (isinstance(trials, list) and all(isinstance(t, dict) and "state" in t for t in trials)):
        raise UserError(f"{path}: not a trials.json written by carlrar search")
    return trials


def search_rows(path: Path, runs: list[dict]) -> list[str] | None:
    """One study's row, or None when no trial has completed yet."""
    method, seed = path.parent.name, int(path.parent.parent.name.removeprefix("search-s"))
    trials = read_trials(path)
    complete = [t for t in trials if t["state"] == "COMPLETE" and t.get("value") is not None]
    if not complete:
        return None
    best = max(complete, key=lambda t: t["value"])
    robust = "clean_accuracy" in best  # the robust objective keeps the clean accuracy beside its value
    from carlrar.report_families import validation_accuracy

    default = default_run(runs, method, seed)
    default_val = validation_accuracy(default) if default else None
    return [method, str(seed), f"{len(complete)} of {len(trials)}", "robust" if robust else "clean",
            f"{100 * best['value']:.2f}", f"{100 * statistics.median(t['value'] for t in complete):.2f}",
            f"{100 * best['clean_accuracy']:.2f}" if robust else "", knobs(best),
            f"{100 * default_val:.2f}" if default_val is not None else "—",
            attacked_on_validation((default or {}).get("validation_attack"))]


def validation_attack(path: Path) -> list[dict] | None:
    """A run's accuracy under attack on its validation split per ε ([{"eps", "accuracy"}]), from ``carlrar attack
    --split validation --output RESULTS/validation/<run>.json`` (the search's robust objective, measured on any
    run); None when not measured."""
    if not path.is_file():
        return None
    try:
        attacks = json.loads(path.read_text(encoding="utf-8"))["attacks"]
        return [{"eps": a["eps"], "accuracy": a["accuracy"]} for a in attacks]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not an attack result written by carlrar attack") from None


def attacked_on_validation(attacks: list[dict] | None) -> str:
    """A run's ``validation_attack`` (attached by ``report.load_runs``) as a table cell."""
    return ", ".join(f"{100 * a['accuracy']:.2f} at ε {a['eps']:g}" for a in attacks) if attacks else "—"


def search_section(results: Path, runs: list[dict]) -> list[str]:
    from carlrar.report import md_table

    studies = [p for p in sorted(results.glob("search-s*/*/trials.json"))
               if p.parent.parent.name.removeprefix("search-s").isdigit()]
    rows = [row for path in studies if (row := search_rows(path, runs))]
    if not rows:
        return []
    header = ["method", "seed", "trials completed", "objective", "best objective (val %)", "median over trials",
              "best trial's clean val %", "best trial's knobs", "grid's default run, clean val %",
              "grid's default run under attack, val %"]
    return ["## Searches (on validation)", "",
            "Each study (`carlrar search`, trials branching from the seed's trunk) maximises its objective on the "
            "validation split: `robust` = validation accuracy under 10-step k-PGD at the search's ε, `clean` = clean "
            "validation accuracy. The last two columns are the grid's run of the method with the protocol's settings on the "
            "same seed: its clean validation accuracy, and its accuracy under the same attack on validation where "
            "`carlrar attack --split validation --output RESULTS/validation/<run>.json` measured it (the search's "
            "trials do not include the protocol's own setting). Dev plays no part here.",
            "", *md_table(header, rows), ""]
