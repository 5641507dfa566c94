"""The report's "accuracy under text attacks" tables, from the files ``carlrar attack --recipe`` writes (one JSONL of
examples and one ``*_summary.json`` per attacked model; ``reproduce`` puts them in RESULTS/text_attacks/).

Per method × recipe (TextAttack's, and ``rar-samples``: RAR's text-form samples replayed): accuracy under attack,
mean ± std over seeds; the paired bootstrap of each method − FreeLB (the same examples: every run is attacked on one
seeded subset); and per recipe the attack success rate, words perturbed, queries and seconds per model.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np

from carlrar.report import NAMES, md_table, mean_std, method_key, paired_bootstrap

RECIPE_NAMES = {"deepwordbug": "DeepWordBug", "pruthi": "Pruthi", "pwws": "PWWS", "rar-samples": "RAR samples"}


def load_text_attacks(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """(dataset, method) → runs by seed; a run: {seed, recipes: {recipe: summary}, correct: {recipe: 0/1 per
    example, by index}}. A run's recipes may come from several files (e.g. one per recipe), merged by run name."""
    runs: dict[str, dict] = {}
    for summary_file in sorted(Path(folder).rglob("*_summary.json")):
        summary = json.loads(summary_file.read_text())
        examples = summary_file.with_name(summary_file.name[: -len("_summary.json")] + ".jsonl")
        if "recipes" not in summary or not examples.is_file():
            continue  # e.g. carlrar generate's summary of its samples
        dataset = str(summary.get("data", "")).rsplit("_", 1)[0]
        run = runs.setdefault(summary.get("run") or summary["model"], {
            "dataset": dataset, "method": method_of(summary, dataset), "seed": train_seed(summary),
            "recipes": {}, "correct": {}})
        records = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
        for recipe, s in summary["recipes"].items():
            run["recipes"][recipe] = s
            rows = sorted((r for r in records if r["recipe"] == recipe), key=lambda r: r["index"])
            run["correct"][recipe] = [int(r["outcome"] == "failed") for r in rows]
            run["correct"]["clean"] = [int(r["outcome"] != "skipped") for r in rows]
    out: dict[tuple[str, str], list[dict]] = {}
    for run in sorted(runs.values(), key=lambda r: (r["dataset"], method_key(r["method"]), r["seed"])):
        out.setdefault((run["dataset"], run["method"]), []).append(run)
    return out


def train_seed(summary: dict) -> int:
    """The seed the attacked model was trained with (``summary["seed"]`` is the attack's): recorded, else the
    -sSEED of reproduce's run name, else 0."""
    if summary.get("train_seed") is not None:
        return int(summary["train_seed"])
    match = re.search(r"-s(\d+)$", summary.get("run") or "")
    return int(match.group(1)) if match else 0


def method_of(summary: dict, dataset: str) -> str:
    """The method or variant a run is: the middle of reproduce's run name DATASET-NAME-sSEED, else its method."""
    match = re.fullmatch(rf"{re.escape(dataset)}-(.+)-s\d+", summary.get("run") or "")
    return match.group(1) if match else summary.get("method") or summary.get("run") or "?"


def text_attack_tables(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Markdown: per dataset, accuracy under each recipe (mean ± std over seeds), the bootstrap vs FreeLB, and the
    attacks' cost."""
    lines = []
    for d in sorted({d for d, _ in groups}):
        methods = [m for dd, m in groups if dd == d]
        recipes = sorted({r for m in methods for run in groups[(d, m)] for r in run["recipes"]},
                         key=lambda r: (r == "rar-samples", r))
        first = next(iter(groups[(d, methods[0])]))
        n = next(iter(first["recipes"].values()))["n"]
        cell = lambda runs, get: mean_std([get(r) for r in runs]) if runs else "–"  # noqa: E731
        rows = [[NAMES.get(m, m), str(len(groups[(d, m)])),
                 cell(groups[(d, m)], lambda r: next(iter(r["recipes"].values()))["clean_accuracy"]),
                 *(cell([r for r in groups[(d, m)] if rc in r["recipes"]],
                        lambda r, rc=rc: r["recipes"][rc]["accuracy_under_attack"]) for rc in recipes)]
                for m in methods]
        heads = [RECIPE_NAMES.get(r, r) for r in recipes]
        lines += ["", f"## Accuracy under text attacks ({d}, {n} dev examples, seeded subset): %, mean ± std over "
                  "seeds", "", *md_table(["method", "seeds", "clean", *heads], rows), *bootstrap(groups, d, recipes),
                  *costs(groups, d, methods, recipes)]
    return lines


def bootstrap(groups: dict, d: str, recipes: list[str]) -> list[str]:
    """Accuracy under each recipe, method − FreeLB: the report's paired bootstrap over examples and seeds."""
    freelb = groups.get((d, "freelb"))
    if not freelb:
        return []
    points = lambda mean, lo, hi: f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"  # noqa: E731
    rows = []
    for m in [m for dd, m in groups if dd == d and m != "freelb"]:
        row = [f"{NAMES.get(m, m)} − FreeLB"]
        for rc in ["clean", *recipes]:
            a = [r["correct"][rc] for r in groups[(d, m)] if rc in r["correct"]]
            b = [r["correct"][rc] for r in freelb if rc in r["correct"]]
            same = a and b and len({len(x) for x in a + b}) == 1
            row.append(points(*paired_bootstrap(np.array(a, float), np.array(b, float))) if same else "–")
        rows.append(row)
    return ["", f"Paired bootstrap ({d}), accuracy difference vs FreeLB in percentage points, 95 % CI (10,000 draws "
            "over the examples, paired, and each method's seeds):", "",
            *md_table(["comparison", "clean", *(RECIPE_NAMES.get(r, r) for r in recipes)], rows)]


def costs(groups: dict, d: str, methods: list[str], recipes: list[str]) -> list[str]:
    """Per recipe, means over a method's seeds: success rate (of the examples it had right), words perturbed (of
    successful attacks), queries per attacked example, seconds per model (the wall time of the whole subset)."""
    rows = []
    for m in methods:
        for rc in recipes:
            runs = [r["recipes"][rc] for r in groups[(d, m)] if rc in r["recipes"]]
            if runs:
                mean = lambda k: statistics.mean(s[k] for s in runs)  # noqa: E731
                rows.append([NAMES.get(m, m), RECIPE_NAMES.get(rc, rc), f"{100 * mean('attack_success_rate'):.1f}",
                             f"{mean('words_perturbed_pct'):.1f}", f"{mean('mean_queries'):.0f}",
                             f"{statistics.mean(s.get('wall_seconds', s['seconds']) for s in runs):.0f}"])
    return ["", f"The attacks ({d}): success rate %, words perturbed % (successful attacks), queries per attacked "
            "example, seconds per model (1 thread, shared machine); RAR samples: replayed, no queries.", "",
            *md_table(["method", "recipe", "success rate", "words perturbed", "queries", "seconds"], rows)]
