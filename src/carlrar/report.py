"""``carlrar report RESULTS``: the paper's tables (mean ± std over seeds) and plots from a ``reproduce`` folder.

Writes RESULTS/report.md and RESULTS/*.png:
- Table 2: clean dev accuracy per method × dataset, Δ vs FreeLB.
- Table 4: mean cos / Euclid between R and R^adv after unprojected k-PGD with step size α.
- Table 5: accuracy under k-PGD per ε.
- Table 7: parameter counts (our encoder, and ALBERT-base built from its config).
- Paired bootstrap 95 % CI of CARL − FreeLB and RAR − FreeLB: dev examples resampled with replacement (the same
  for both methods), and each method's seeds resampled too.
- accuracy_vs_eps.png, training_curves.png, cos_histogram.png.

``carlrar compare RUN...`` (``compare_runs``) is the small version for plain ``carlrar train`` output directories.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from carlrar.errors import UserError

ORDER = ["base", "fgm", "pgd", "freelb", "carl", "rar", "carl-rar"]
NAMES = {"base": "Fine-tune", "freelb": "FreeLB", "carl": "CARL", "rar": "RAR", "carl-rar": "CARL+RAR",
         "pgd": "PGD", "fgm": "FGM"}
NORMS = {"l2": "L2", "linf": "L∞"}


def load_runs(results: Path) -> tuple[dict, list[dict]]:
    index_file = results / "index.json"
    if not index_file.is_file():
        raise UserError(f"{results}: no index.json (not a carlrar reproduce folder)")
    index = json.loads(index_file.read_text())
    runs = [json.loads(f.read_text()) for f in sorted((results / "runs").glob("*.json"))]
    if not runs:
        raise UserError(f"{results}: no finished runs yet")
    return index, runs


def grouped(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(dataset, method) → runs sorted by seed, methods in the paper's order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["dataset"], ORDER.index(r["method"]) if r["method"] in ORDER else 99,
                                         r["seed"])):
        out.setdefault((r["dataset"], r["method"]), []).append(r)
    return out


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % CI of acc(a) − acc(b); a, b: seeds × examples 0/1 correctness on the same examples.

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


def correctness(runs: list[dict], eps: float | None) -> np.ndarray:
    if eps is None:
        return np.array([r["per_example"]["clean_correct"] for r in runs], dtype=float)
    return np.array([next(a["correct"] for a in r["per_example"]["attacks"] if a["eps"] == eps) for r in runs],
                    dtype=float)


def attack_setting(attack: dict) -> str:
    """How a run attacked, for titles: norm, step size, init; a protocol's ``attack:`` section may change each."""
    fixed = sorted({a["step_size"] for a in attack["attacks"] if a["step_size"] != a["eps"] / 4})
    step = f"step {', '.join(f'{s:g}' for s in fixed)}" if fixed else "step ε/4"
    init = f"random init {attack['init_mag']:g}" if attack["init_mag"] else "zero init"
    return f"{NORMS.get(attack['norm'], attack['norm'])}, {step}, {init}"


def tables(index: dict, runs: list[dict]) -> str:
    groups = grouped(runs)
    datasets = sorted({d for d, _ in groups})
    methods = [m for m in ORDER if any((d, m) in groups for d in datasets)]
    lines = ["# carlrar results", "", f"Command: `{index.get('command', '')}`", ""]
    seeds = {k: [r["seed"] for r in v] for k, v in groups.items()}
    lines += [f"Runs: {len(runs)} finished of {len(index['runs'])} in the grid; mean ± sample std over seeds "
              f"(seeds per cell in brackets where fewer than the grid's {len(index['protocol']['seeds'])}).", ""]

    def cell(d, m, get, scale=100.0, digits=2):
        if (d, m) not in groups:
            return "–"
        vals = [get(r) for r in groups[(d, m)]]
        n = len(vals)
        return mean_std(vals, scale, digits) + (f" [{n}]" if n < len(index["protocol"]["seeds"]) else "")

    acc = lambda r: r["final"]["dev"]["accuracy"]  # noqa: E731
    lines += ["## Table 2: clean dev accuracy (%)", "", "| method | " + " | ".join(datasets) + " | Δ vs FreeLB |",
              "|---|" + "---|" * (len(datasets) + 1)]
    for m in methods:
        deltas = []
        for d in datasets:
            if (d, m) in groups and (d, "freelb") in groups and m != "freelb":
                deltas.append(100 * (statistics.mean(map(acc, groups[(d, m)])) -
                                     statistics.mean(map(acc, groups[(d, "freelb")]))))
        delta = ", ".join(f"{x:+.2f}" for x in deltas) if deltas else "–"
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cell(d, m, acc) for d in datasets) + f" | {delta} |")

    for d in datasets:
        attack = next(iter(v for k, v in groups.items() if k[0] == d))[0]["attack"]  # the grid attacks alike
        eps, alphas = [a["eps"] for a in attack["attacks"]], [a["alpha"] for a in attack["distances"]]
        steps = attack["steps"]
        if alphas:
            lines += ["", f"## Table 4 ({d}): cos(R, R^adv) / ‖R − R^adv‖ after {steps}-PGD with step α, "
                      "no projection", "", "| method | " + " | ".join(f"α={a:g} cos | α={a:g} Euclid" for a in alphas)
                      + " |", "|---|" + "---|" * (2 * len(alphas))]
            for m in methods:
                cells = []
                for a in alphas:
                    dist = lambda r, k: next(x[k] for x in r["attack"]["distances"] if x["alpha"] == a)  # noqa: E731
                    cells += [cell(d, m, lambda r: dist(r, "mean_cos"), 1.0, 4),
                              cell(d, m, lambda r: dist(r, "mean_euclid"), 1.0, 3)]
                lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
        lines += ["", f"## Table 5 ({d}): accuracy (%) under {steps}-PGD ({attack_setting(attack)})", "",
                  "| method | clean | " + " | ".join(f"ε={e:g}" for e in eps) + " |", "|---|---|" + "---|" * len(eps)]
        for m in methods:
            under = [cell(d, m, lambda r, e=e: next(a["accuracy"] for a in r["attack"]["attacks"] if a["eps"] == e))
                     for e in eps]
            lines.append(f"| {NAMES.get(m, m)} | {cell(d, m, acc)} | " + " | ".join(under) + " |")
        if (d, "freelb") in groups:
            lines += ["", f"## Paired bootstrap ({d}): accuracy difference vs FreeLB, percentage points, 95 % CI",
                      "", "10,000 draws, each resampling the dev examples (paired: the same for both methods) and "
                      "each method's seeds.", "", "| comparison | clean | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
                      "|---|---|" + "---|" * len(eps)]
            for m in ("carl", "rar", "carl-rar", "base"):
                if (d, m) not in groups:
                    continue
                cells = []
                for e in [None, *eps]:
                    mean, lo, hi = paired_bootstrap(correctness(groups[(d, m)], e), correctness(groups[(d, "freelb")], e))
                    cells.append(f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
                lines.append(f"| {NAMES[m]} − FreeLB | " + " | ".join(cells) + " |")

    lines += ["", "## Table 7: parameters", "", "| method | encoder in these runs | ALBERT-base (2 labels) |",
              "|---|---|---|"]
    albert = albert_parameter_counts()
    for m in methods:
        ours = {r["final"]["parameters"] for d in datasets for r in groups.get((d, m), [])}
        lines.append(f"| {NAMES.get(m, m)} | {', '.join(f'{p:,}' for p in sorted(ours))} | "
                     f"{albert['rar' if m in ('rar', 'carl-rar') else 'base']:,} |")
    lines += ["", "Training wall-clock per run (s, mean over seeds, incl. CARL's bank fill, not the attack; on a "
              "shared machine these include slow-downs from other jobs, see benchmarks/ for clean speed): "
              + ", ".join(f"{NAMES.get(m, m)} {statistics.mean(r['final']['train_seconds'] for r in v):.0f}"
                          for (d, m), v in groups.items()), ""]
    failed = {n: r for n, r in index["runs"].items() if r["status"] == "failed"}
    if failed:
        lines += ["## Failed runs", ""] + [f"- {n}: {r.get('error')}" for n, r in failed.items()] + [""]
    return "\n".join(lines)


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


def plots(runs: list[dict], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(runs)
    datasets = sorted({d for d, _ in groups})
    written = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for (dd, m), rs in groups.items():
            if dd != d:
                continue
            eps = [0.0] + [a["eps"] for a in rs[0]["attack"]["attacks"]]
            acc = np.array([[r["attack"]["clean_accuracy"]] + [a["accuracy"] for a in r["attack"]["attacks"]]
                            for r in rs]) * 100
            ax.errorbar(eps, acc.mean(0), yerr=acc.std(0, ddof=1) if len(rs) > 1 else None, marker="o",
                        capsize=3, label=f"{NAMES.get(m, m)} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
        ax.set(title=f"{d}: accuracy under {rs[0]['attack']['steps']}-PGD", ylabel="accuracy (%)",
               xlabel=f"ε ({NORMS.get(rs[0]['attack']['norm'], rs[0]['attack']['norm'])})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    written.append(_save(fig, results / "accuracy_vs_eps.png"))

    keys = [("train_loss", "L_C (mean over passes)"), ("train_loss_D", "L_D (CARL)"), ("train_loss_R", "L_R (RAR)"),
            ("dev_accuracy", "dev accuracy")]
    for d in datasets:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for ax, (key, title) in zip(axes.flat, keys):
            for (dd, m), rs in groups.items():
                if dd != d:
                    continue
                by_step: dict[int, list[float]] = {}
                for r in rs:
                    for c in r["curves"]:
                        if c.get(key) is not None:
                            by_step.setdefault(c["step"], []).append(c[key])
                if by_step:
                    steps = sorted(by_step)
                    ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], marker=".", label=NAMES.get(m, m))
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no run logs this loss", ha="center", transform=ax.transAxes, color="grey")
        fig.suptitle(f"{d}: training curves (mean over seeds; losses averaged between dev evaluations)")
        written.append(_save(fig, results / f"training_curves_{d}.png"))

    for d in datasets:
        fig, ax = plt.subplots(figsize=(7, 4))
        label = ""
        for (dd, m), rs in groups.items():
            if dd != d:
                continue
            dist = rs[0]["per_example"]["distances"]
            pick = (lambda r: r["per_example"]["distances"][0]) if dist else (lambda r: r["per_example"]["attacks"][-1])
            label = f"α = {dist[0]['alpha']:g}, no projection" if dist else f"ε = {pick(rs[0])['eps']:g}"
            cos = np.concatenate([pick(r)["cos"] for r in rs])
            ax.hist(cos, bins=50, range=(-1.0, 1.0), histtype="step", linewidth=1.5,
                    label=f"{NAMES.get(m, m)} (mean {cos.mean():.3f})")
        ax.set(title=f"{d}: cos(R, R^adv) per dev example ({label}, all seeds)", xlabel="cosine similarity",
               ylabel="examples", yscale="log")
        ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
        written.append(_save(fig, results / f"cos_histogram_{d}.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(results: Path) -> tuple[Path, list[Path]]:
    index, runs = load_runs(results)
    text = tables(index, runs)
    pngs = plots(runs, results)
    text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    out = results / "report.md"
    out.write_text(text, encoding="utf-8")
    return out, pngs


# ---------------------------------------------------------------------------------------------------------------
# ``carlrar compare``: finished ``carlrar train`` runs side by side (no reproduce folder needed).


def compare_runs(runs: list[Path]) -> tuple[list[float], list[tuple[Path, dict, dict]]]:
    """Every ε attacked in any run (first seen first), and per run: its final metrics and the results by ε of its
    first ``attack_*.json``."""
    rows, eps = [], []
    for run in map(Path, runs):
        final = run / "final_metrics.json"
        if not final.is_file():
            raise UserError(f"{run}: no final_metrics.json (not a finished carlrar run)")
        metrics = json.loads(final.read_text())
        attacks = [json.loads(f.read_text()) for f in sorted(run.glob("attack_*.json"))]
        by_eps = {a["eps"]: a for r in attacks[:1] for a in r["attacks"]}
        eps += [e for e in by_eps if e not in eps]
        rows.append((run, metrics, by_eps))
    return eps, rows


def print_comparison(eps: list[float], rows: list[tuple[Path, dict, dict]]):
    from rich.console import Console
    from rich.table import Table

    table = Table(title="clean dev accuracy and accuracy under k-PGD (cos(R, R^adv) in brackets)")
    for col in ["run", "method", "dev acc", *[f"ε={e:g}" for e in eps], "ex/s"]:
        table.add_column(col, justify="left" if col in ("run", "method") else "right")
    for run, m, by_eps in rows:
        cells = [f"{by_eps[e]['accuracy']:.4f} ({by_eps[e]['mean_cos']:.3f})" if e in by_eps else "–" for e in eps]
        table.add_row(str(run), m["method"], f"{m['dev']['accuracy']:.4f}", *cells, f"{m['examples_per_s']:.0f}")
    Console(width=200).print(table)
