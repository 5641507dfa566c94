"""``carlrar report RESULTS``: the paper's tables (mean ± std over seeds) and plots from a ``reproduce`` folder.

Writes RESULTS/report.md and RESULTS/*.png:
- Table 2: clean dev accuracy per method × dataset, Δ vs FreeLB (and the validation accuracy that selected the
  checkpoint, when runs carve a validation split from the training data).
- Table 4 (the paper's definition): mean cos(R, R^adv) and ‖R − R^adv‖ after k-PGD projected to radius α, for
  α ∈ {0.1, 0.075}: the attack at ε = α (every attacked ε when the attacks contain neither).
- Table 4b (extra, not the paper's definition): the same after k unprojected steps of size α.
- Table 5: accuracy under k-PGD per ε. Table 7: parameter counts (ours, and ALBERT-base built from its config).
- Paired bootstrap 95 % CIs of every method − FreeLB, for accuracy and per-example cos(R, R^adv): dev examples
  resampled with replacement (the same for both methods), and each method's seeds, on the seeds both have. When a protocol attacked a
  seeded subset of dev, the attacked tables say so; runs of one dataset attacked on different examples are refused.
- Each family's variant chosen on validation, clean and under attack (``report_families``); the protocol's declared
  pairs (``report_pairs``), and what each pair's difference under attack is made of (its drops vs its margins).
- Diagnostics (``report_diagnostics``): ‖∇L_D‖ / ‖∇L_C‖, cos(∇L_C, ∇L_D) (the same for L_R) and the clip factor in
  the first 50 steps after the auxiliary term starts; Margins: the clean logit margin and the drop per unit of
  ‖R − R^adv‖, which say why Table 4 need not become Table 5. Figures: ``report_plots``.

``carlrar compare RUN...`` (``carlrar.compare``) is the small version for plain ``carlrar train`` output directories.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from carlrar.errors import UserError
from carlrar.ownership import write_whole
from carlrar.report_diagnostics import aux_start, diagnostics_section, margin_section  # noqa: F401 (aux_start re-exported)
from carlrar.report_search import validation_attack

ORDER = ["base", "fgm", "pgd", "freelb", "carl", "rar", "carl-rar"]
NAMES = {"base": "Fine-tune", "freelb": "FreeLB", "carl": "CARL", "rar": "RAR", "carl-rar": "CARL+RAR",
         "pgd": "PGD", "fgm": "FGM"}
NORMS = {"l2": "L2", "linf": "L∞"}
PAPER_ALPHAS = (0.1, 0.075)  # Table 4's "max perturbation norms α": radii of projected k-PGD


def load_runs(results: Path) -> tuple[dict, list[dict]]:
    index_file = results / "index.json"
    if not index_file.is_file():
        raise UserError(f"{results}: no index.json (not a carlrar reproduce folder)")
    index = json.loads(index_file.read_text())
    runs = [json.loads(f.read_text()) for f in sorted((results / "runs").glob("*.json"))]
    if not runs:
        raise UserError(f"{results}: no finished runs yet")
    for run in runs:  # accuracy under attack on the run's validation split, where it was measured
        run["validation_attack"] = validation_attack(results / "validation" / f"{run['name']}.json")
    return index, runs


def method_key(method: str) -> tuple[int, str]:
    """The paper's methods in ORDER, then any other (a protocol's variant, e.g. ``carl-ratio``) alphabetically."""
    return (ORDER.index(method), "") if method in ORDER else (len(ORDER), method)


def grouped(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(dataset, method) → runs sorted by seed, methods in the paper's order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["dataset"], method_key(r["method"]), r["seed"])):
        out.setdefault((r["dataset"], r["method"]), []).append(r)
    return out


def find(records: list[dict], key: str, value: float) -> dict:
    """The record whose ``key`` is ``value``, e.g. the attack at one ε."""
    return next(x for x in records if x[key] == value)


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


@dataclasses.dataclass
class Grid:
    """The finished runs by (dataset, method), and the number of seeds in the grid: what every table is drawn from."""

    groups: dict[tuple[str, str], list[dict]]
    n_seeds: int

    @property
    def datasets(self) -> list[str]:
        return sorted({d for d, _ in self.groups})

    @property
    def methods(self) -> list[str]:
        return sorted({m for _, m in self.groups}, key=method_key)

    def runs(self, d: str, m: str) -> list[dict]:
        return self.groups.get((d, m), [])

    def attack(self, d: str) -> dict:
        """How dataset d's runs were attacked: alike, on the same dev examples (the paired bootstrap pairs them)."""
        runs = [r for (dd, _), rs in self.groups.items() if dd == d for r in rs]
        seen = {dev_subset(r["attack"]): r["name"] for r in runs}
        if len(seen) > 1:
            kinds = "; ".join(f"{name}: {subset or 'all of dev'}" for subset, name in seen.items())
            raise UserError(f"{d}: runs attacked on different dev examples ({kinds}), which the paired bootstrap "
                            "cannot pair: delete the odd runs' runs/<run>.json and reproduce attacks them again")
        return runs[0]["attack"]

    def cell(self, d: str, m: str, get: Callable[[dict], float | None], scale: float = 100.0, digits: int = 2) -> str:
        """Mean ± std over (d, m)'s seeds of ``get(run)`` (runs where it is None left out); the number of seeds in
        brackets where fewer than the grid's."""
        values = [v for v in map(get, self.runs(d, m)) if v is not None]
        if not values:
            return "–"
        return mean_std(values, scale, digits) + (f" [{len(values)}]" if len(values) < self.n_seeds else "")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % CI of mean(a) − mean(b); a, b: seeds × examples per-example values on the same examples (0/1
    correctness for accuracy, or cos(R, R^adv)).

    Each draw resamples the examples (the same ones for both: paired) and, independently per method, its seeds,
    so the interval covers both test-set and seed-to-seed variation."""
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    boots = np.empty(n_boot)
    for k in range(n_boot):
        idx = rng.integers(0, n, size=n)
        sa = rng.integers(0, len(a), size=len(a)) if len(a) > 1 else [0]
        sb = rng.integers(0, len(b), size=len(b)) if len(b) > 1 else [0]
        boots[k] = a[sa][:, idx].mean() - b[sb][:, idx].mean()
    return float(a.mean() - b.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def points(mean: float, lo: float, hi: float) -> str:
    """A paired-bootstrap accuracy difference (fractions) as percentage points with its 95 % CI."""
    return f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def cosines(mean: float, lo: float, hi: float) -> str:
    """A paired-bootstrap cos(R, R^adv) difference with its 95 % CI."""
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def correctness(runs: list[dict], eps: float | None) -> np.ndarray:
    """Seeds × examples 0/1: clean (eps None) or under the attack at ε."""
    if eps is None:
        return np.array([r["per_example"]["clean_correct"] for r in runs], dtype=float)
    return np.array([find(r["per_example"]["attacks"], "eps", eps)["correct"] for r in runs], dtype=float)


def example_cos(runs: list[dict], eps: float) -> np.ndarray:
    """Seeds × examples cos(R, R^adv) after the attack at ε."""
    return np.array([find(r["per_example"]["attacks"], "eps", eps)["cos"] for r in runs], dtype=float)


def dev_subset(attack: dict) -> str | None:
    """The seeded subset of dev a run was attacked on, in words; None: all of dev (so were the runs recorded before
    protocols had a ``DevSubset``)."""
    s = attack.get("dev_subset") or {}
    return None if s.get("seed") is None else \
        f"a seeded {s['examples']:,}-example subset of dev (seed {s['seed']}), of its {s['of']:,}"


def attack_setting(attack: dict) -> str:
    """How a run attacked, for titles: norm, step size, init; a protocol's ``attack:`` section may change each."""
    fixed = sorted({a["step_size"] for a in attack["attacks"] if a["step_size"] != a["eps"] / 4})
    step = f"step {', '.join(f'{s:g}' for s in fixed)}" if fixed else "step ε/4"
    init = f"random init {attack['init_mag']:g}" if attack["init_mag"] else "zero init"
    return f"{NORMS.get(attack['norm'], attack['norm'])}, {step}, {init}"


def subset_note(grid: Grid, d: str) -> list[str]:
    """Next to the attacked tables, when the attacks ran on a subset of dev: which tables are on it."""
    subset = dev_subset(grid.attack(d))
    return ["", f"**Attacks ({d}): k-PGD on {subset}, the same examples for every run.** Tables 4, 4b and 5's ε "
            "columns and the paired bootstraps (their clean column too) are on these; Table 2 and Table 5's clean "
            "column are all of dev."] if subset else []


def table4_alphas(attack: dict) -> list[float]:
    """The radii α of Table 4 among the attacked ε: the paper's 0.1 and 0.075, else every ε."""
    eps = [a["eps"] for a in attack["attacks"]]
    return [a for a in PAPER_ALPHAS if a in eps] or eps


# ---------------------------------------------------------------------------------------------------------------
# Tables: one function each, returning markdown lines.


def table2(grid: Grid) -> list[str]:
    """Clean dev accuracy, the validation (selection) accuracy and the labelled test split's where runs have them,
    and Δ vs FreeLB (dev)."""
    acc = lambda r: r["final"]["dev"]["accuracy"]  # noqa: E731
    val = lambda r: (r["final"].get("validation") or {}).get("accuracy")  # noqa: E731
    test = lambda r: (r["final"].get("test") or {}).get("accuracy")  # noqa: E731
    having = lambda get: [d for d in grid.datasets  # noqa: E731
                          if any(get(r) is not None for m in grid.methods for r in grid.runs(d, m))]
    with_val, with_test = having(val), having(test)
    several = len(grid.datasets) > 1
    header = ["method", *grid.datasets, *(f"{d + ' ' if several else ''}validation acc (selection)" for d in with_val),
              *(f"{d + ' ' if several else ''}test acc" for d in with_test), "Δ vs FreeLB"]
    rows = []
    for m in grid.methods:
        deltas = [100 * (statistics.mean(map(acc, grid.runs(d, m))) - statistics.mean(map(acc, grid.runs(d, "freelb"))))
                  for d in grid.datasets if m != "freelb" and grid.runs(d, m) and grid.runs(d, "freelb")]
        rows.append([NAMES.get(m, m), *(grid.cell(d, m, acc) for d in grid.datasets),
                     *(grid.cell(d, m, val) for d in with_val), *(grid.cell(d, m, test) for d in with_test),
                     ", ".join(f"{x:+.2f}" for x in deltas) or "–"])
    return ["## Table 2: clean dev accuracy (%)", "", *md_table(header, rows)]


def distance_table(grid: Grid, d: str, title: str, alphas: list[float], records: Callable[[dict], list[dict]],
                   key: str) -> list[str]:
    """Mean cos(R, R^adv) and ‖R − R^adv‖ per α: from ``records(run)``, the record whose ``key`` is α."""
    header = ["method", *(f"α={a:g} {what}" for a in alphas for what in ("cos", "Euclid"))]
    rows = [[NAMES.get(m, m), *(grid.cell(d, m, lambda r, a=a, k=k: find(records(r), key, a)[k], 1.0, digits)
                                for a in alphas for k, digits in (("mean_cos", 4), ("mean_euclid", 3)))]
            for m in grid.methods]
    return ["", title, "", *md_table(header, rows)]


def table4(grid: Grid, d: str) -> list[str]:
    """The paper's Table 4: the distances after k-PGD projected to radius α (the attack at ε = α)."""
    attack = grid.attack(d)
    alphas = table4_alphas(attack)
    title = (f"## Table 4 ({d}): cos(R, R^adv) / ‖R − R^adv‖ after {attack['steps']}-PGD projected to radius α "
             f"(the attack at ε = α: {attack_setting(attack)})")
    lines = distance_table(grid, d, title, alphas, lambda r: r["attack"]["attacks"], "eps")
    if not set(alphas) & set(PAPER_ALPHAS):
        lines[2:2] = ["The attacks include neither of the paper's α = 0.1, 0.075: every attacked ε shown.", ""]
    return lines


def table4b(grid: Grid, d: str) -> list[str]:
    """Our earlier reading of Table 4, kept for comparison: k unprojected steps of size α."""
    attack = grid.attack(d)
    alphas = [a["alpha"] for a in attack["distances"]]
    if not alphas:
        return []
    title = (f"## Table 4b ({d}, extra, not the paper's definition): unprojected {attack['steps']} steps of size α, "
             "cos(R, R^adv) / ‖R − R^adv‖")
    return distance_table(grid, d, title, alphas, lambda r: r["attack"]["distances"], "alpha")


def table5(grid: Grid, d: str) -> list[str]:
    attack = grid.attack(d)
    eps = [a["eps"] for a in attack["attacks"]]
    rows = [[NAMES.get(m, m), grid.cell(d, m, lambda r: r["final"]["dev"]["accuracy"]),
             *(grid.cell(d, m, lambda r, e=e: find(r["attack"]["attacks"], "eps", e)["accuracy"]) for e in eps)]
            for m in grid.methods]
    return ["", f"## Table 5 ({d}): accuracy (%) under {attack['steps']}-PGD ({attack_setting(attack)})", "",
            *md_table(["method", "clean", *(f"ε={e:g}" for e in eps)], rows)]


def seed_runs(grid: Grid, d: str, a: str, b: str) -> tuple[list[dict], list[dict]]:
    """A's and B's runs on the seeds both have, in seed order: a method is compared with another on the same seeds
    (in a branch protocol a seed's branches share its trunk; a seed only one method has would pair nothing)."""
    by_seed = [{r["seed"]: r for r in grid.runs(d, m)} for m in (a, b)]
    common = sorted(set(by_seed[0]) & set(by_seed[1]))
    return [by_seed[0][s] for s in common], [by_seed[1][s] for s in common]


def seeds_label(runs: list[dict], n_seeds: int) -> str:
    """`` (seeds 0, 2)`` when a comparison covers fewer seeds than the grid has, else nothing."""
    return f" (seed{'s' * (len(runs) > 1)} {', '.join(str(r['seed']) for r in runs)})" if len(runs) < n_seeds else ""


def bootstrap_rows(grid: Grid, d: str, columns: list, values: Callable[[list[dict], float | None], np.ndarray],
                   fmt: Callable[[float, float, float], str], reference: str = "freelb") -> list[list[str]]:
    """One row per method − the reference (every method of the grid but the reference, in ``Grid.methods`` order):
    the paired bootstrap of ``values(runs, column)`` (seeds × examples) per column, on the seeds both have (named
    in the row where fewer than the grid's); a method sharing no seed with the reference has no row."""
    rows = []
    for m in grid.methods:
        ra, rb = seed_runs(grid, d, m, reference) if m != reference else ([], [])
        if ra:
            rows.append([f"{NAMES.get(m, m)} − {NAMES.get(reference, reference)}{seeds_label(ra, grid.n_seeds)}",
                         *(fmt(*paired_bootstrap(values(ra, c), values(rb, c))) for c in columns)])
    return rows


def bootstrap_tables(grid: Grid, d: str) -> list[str]:
    """Accuracy and per-example cos(R, R^adv) differences vs FreeLB with paired-bootstrap 95 % CIs."""
    if not grid.runs(d, "freelb"):
        return []
    eps = [a["eps"] for a in grid.attack(d)["attacks"]]
    heads = [f"ε={e:g}" for e in eps]
    return ["", f"## Paired bootstrap ({d}): accuracy difference vs FreeLB, percentage points, 95 % CI", "",
            "10,000 draws, each resampling the attacked dev examples (paired: the same for both methods) and each "
            "method's seeds, on the seeds both methods have (named where fewer than the grid's).", "", *md_table(["comparison", "clean", *heads],
                                    bootstrap_rows(grid, d, [None, *eps], correctness, points)),
            "", f"## Paired bootstrap ({d}): cos(R, R^adv) difference vs FreeLB after k-PGD projected to radius ε, "
            "95 % CI", "", "Per dev example, resampled as above; positive: the method's representation turns less "
            "under the attack.", "",
            *md_table(["comparison", *heads], bootstrap_rows(grid, d, eps, example_cos, cosines))]


def table7(grid: Grid) -> list[str]:
    albert = albert_parameter_counts()
    rows = []
    for m in grid.methods:
        runs = [r for d in grid.datasets for r in grid.runs(d, m)]
        ours = sorted({r["final"]["parameters"] for r in runs})
        head = "rar" if any("rar_weight" in r["config"] for r in runs) else "base"  # RAR's head on top
        rows.append([NAMES.get(m, m), ", ".join(f"{p:,}" for p in ours), f"{albert[head]:,}"])
    return ["", "## Table 7: parameters", "",
            *md_table(["method", "encoder in these runs", "ALBERT-base (2 labels)"], rows)]


def albert_parameter_counts() -> dict[str, int]:
    """Table 7 from ALBERT-base's config (no weights needed): classifier and classifier + RAR head."""
    import torch

    from carlrar.models import albert_base_scratch, count_parameters
    from carlrar.objectives import attach_reconstructor

    torch.manual_seed(0)
    model = albert_base_scratch(["0", "1"])
    base = count_parameters(model)
    attach_reconstructor(model)
    return {"base": base, "rar": count_parameters(model)}


def tables(index: dict, runs: list[dict]) -> str:
    """report.md's text: header, Table 2, per dataset Tables 4, 4b, 5, the bootstraps and diagnostics, Table 7."""
    # the seeds of every run the index has planned, not only the last command's: a grid run in pieces (--seeds 2,)
    seeds = {r["seed"] for r in index["runs"].values() if "seed" in r} | set(index["protocol"]["seeds"])
    grid = Grid(grouped(runs), len(seeds))
    from carlrar.report_families import family_tables  # these build on this module's tables
    from carlrar.report_curve import curve_section
    from carlrar.report_pairs import declared, declared_pairs, decomposition_section, pair_section

    pairs, selection = declared_pairs(index["protocol"]), declared(index["protocol"], "selection_seeds")
    excluded = declared(index["protocol"], "selection_excluded") or {}
    planned = [r for r in index["runs"].values() if r.get("method") != "trunk"]  # a trunk is trained, not reported
    lines = ["# carlrar results", "", f"Command: `{index.get('command', '')}`", "",
             f"Runs: {len(runs)} finished of {len(planned)} in the grid; mean ± sample std over seeds (seeds "
             f"per cell in brackets where fewer than the grid's {grid.n_seeds}).", "", *table2(grid)]
    for d in grid.datasets:
        lines += [*subset_note(grid, d), *table4(grid, d), *table4b(grid, d), *table5(grid, d), *margin_section(grid, d),
                  *bootstrap_tables(grid, d), *family_tables(grid, d, selection, excluded.get(d)),
                  *pair_section(grid, d, pairs), *decomposition_section(grid, d, pairs),
                  *curve_section(grid, d), *diagnostics_section(grid, d)]
    lines += [*table7(grid), "", "Training wall-clock per run (s, mean over seeds, incl. CARL's bank fill, not the "
              "attack; on a shared machine these include slow-downs from other jobs, see benchmarks/ for clean "
              "speed): " + ", ".join(f"{NAMES.get(m, m)} {statistics.mean(r['final']['train_seconds'] for r in v):.0f}"
                                      for (d, m), v in grid.groups.items()), ""]
    failed = {n: r for n, r in index["runs"].items() if r["status"] == "failed"}
    if failed:
        lines += ["## Failed runs", ""] + [f"- {n}: {r.get('error')}" for n, r in failed.items()] + [""]
    return "\n".join(lines)


def write_report(results: Path) -> tuple[Path, list[Path]]:
    from carlrar.report_plots import plots
    from carlrar.report_search import search_section
    from carlrar.report_text import load_text_attacks, text_attack_tables

    if not (results / "index.json").is_file() and load_text_attacks(results):  # carlrar attack --recipe outputs only
        text, pngs = "\n".join(["# carlrar results: text attacks", *text_attack_tables(load_text_attacks(results))]), []
    else:
        index, runs = load_runs(results)
        attacks = load_text_attacks(results / "text_attacks") if (results / "text_attacks").is_dir() else {}
        text = tables(index, runs) + "\n".join([*search_section(results, runs), *text_attack_tables(attacks)]) + "\n"
        pngs = plots(runs, results)
    text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n" if pngs else ""
    out = results / "report.md"
    write_whole(out, text)  # a reader (or a crash) never sees half a report
    return out, pngs


# ---------------------------------------------------------------------------------------------------------------
