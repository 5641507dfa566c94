"""``carlrar report``'s family section: the converged protocol's selection rule (within each family, the variant
with the highest mean validation accuracy; beside it the same rule under attack on validation) and the chosen
variants' paired bootstraps on dev against the protocol's FreeLB and the FreeLB family's own choice."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from carlrar.report import NAMES, Grid, bootstrap_rows, correctness, md_table, points


def validation_accuracy(run: dict) -> float | None:
    return (run["final"].get("validation") or {}).get("accuracy")


def robust_validation_accuracy(run: dict) -> float | None:
    return run["validation_attack"][0]["accuracy"] if run.get("validation_attack") else None


def family_best(grid: Grid, d: str, get: Callable[[dict], float | None] = validation_accuracy,
                seeds: list[int] | None = None, excluded: list[str] | None = None
                ) -> dict[str, list[tuple[str, float, int]]]:
    """The converged protocol's selection rule: within each family (the registered method its variants run:
    ``freelb``, ``carl``, ``rar``, ``carl-rar``) the variant with the highest mean validation accuracy over its seeds,
    ties to the paper's default (the variant named as the method). Family → candidates (name, mean validation,
    seeds), the chosen first. Variants without a validation split are left out: dev never chooses. ``get``: what is
    compared (clean validation accuracy, the rule; or accuracy under attack on validation, where measured).
    ``seeds``: only these seeds' runs count (the protocol's ``selection_seeds``), so that a variant later run on more
    seeds is still ranked on the seeds the rule was declared on. ``excluded``: variants declared as diagnostics on
    this dataset (the protocol's ``selection_excluded``), reported elsewhere but never candidates."""
    families: dict[str, list[tuple[str, float, int]]] = {}
    # another dataset's methods may have no run here
    for m in [m for m in grid.methods if grid.runs(d, m) and m not in (excluded or [])]:
        runs = [r for r in grid.runs(d, m) if not seeds or r["seed"] in seeds]
        if not runs:
            continue
        family = runs[0]["config"].get("method", m)
        accuracies = [get(r) for r in runs]
        if family in ("base", "pgd", "fgm") or None in accuracies:
            continue
        families.setdefault(family, []).append((m, statistics.mean(accuracies), len(runs)))
    return {f: sorted(c, key=lambda x: (-x[1], x[0] != f)) for f, c in families.items()}


def family_tables(grid: Grid, d: str, seeds: list[int] | None = None, excluded: list[str] | None = None) -> list[str]:
    """Each family's variant chosen on validation (clean, and under attack where measured), and their paired
    bootstraps (dev) vs the protocol's FreeLB and, when the FreeLB family chose another variant (a tuned FreeLB that
    wins on clean validation), vs that one too: a gain counts only against both, since a baseline tuned for clean
    accuracy may be the weaker one under attack. The issue's goal is stated for the best variant, and choosing it on
    dev would flatter it."""
    best = family_best(grid, d, seeds=seeds, excluded=excluded)
    robust = family_best(grid, d, robust_validation_accuracy, seeds, excluded)
    left_out = [NAMES.get(m, m) for m in excluded or [] if grid.runs(d, m)]
    if not grid.runs(d, "freelb") or not any(len(c) > 1 for c in best.values()):
        return []
    # both rules' choices are bootstrapped, against the protocol's FreeLB and each rule's FreeLB choice
    references = list(dict.fromkeys(["freelb", *(rule["freelb"][0][0] for rule in (best, robust) if "freelb" in rule)]))
    picks = {c[0][0] for rule in (best, robust) for c in rule.values()}
    chosen = Grid({k: v for k, v in grid.groups.items() if k[1] in {*references, *picks}}, grid.n_seeds)
    eps = [a["eps"] for a in grid.attack(d)["attacks"]]
    ranked = lambda c: ", ".join(f"{NAMES.get(m, m)} {100 * v:.2f} ({n})" for m, v, n in c)  # noqa: E731
    listed = [[NAMES.get(f, f), ranked(c), NAMES.get(c[0][0], c[0][0]),
               *([ranked(robust.get(f, [])), NAMES.get(robust[f][0][0], robust[f][0][0]) if f in robust else "–"]
                 if robust else [])] for f, c in best.items()]
    under = next(r["validation_attack"][0]["eps"] for rs in grid.groups.values() for r in rs
                 if r.get("validation_attack")) if robust else None
    lines = ["", f"## Best variant per family ({d}), chosen on validation", "",
             "Mean validation accuracy over seeds (seeds in brackets" + (
                 f"; only seeds {', '.join(map(str, seeds))}, the protocol's `selection_seeds`" if seeds else "")
             + "); highest wins, ties to the paper's default. " + (
                 f"Left out, declared as diagnostics on {d} (the protocol's `selection_excluded`): "
                 f"{', '.join(left_out)}. " if left_out else "") +
             "Dev below is reported, never used to choose." + (
                 f" Beside it, for robustness claims, the same rule on validation accuracy under k-PGD at ε = "
                 f"{under:g} (runs measured with `carlrar attack --split validation` into RESULTS/validation/; a "
                 "variant counts where every seed was measured); the bootstraps below cover both rules' choices."
                 if robust else ""), "",
             *md_table(["family", "variants: validation % (seeds)", "chosen",
                        *(["under attack: validation % (seeds)", "chosen under attack"] if robust else [])], listed)]
    for reference in references:
        lines += ["", *md_table([f"chosen − {NAMES.get(reference, reference)} (dev, 95 % CI)", "clean",
                                 *(f"ε={e:g}" for e in eps)],
                                bootstrap_rows(chosen, d, [None, *eps], correctness, points, reference))]
    return lines
