"""The figures of ``carlrar report`` (``report.write_report`` calls ``plots``), one function per figure:

- accuracy_vs_eps.png: accuracy under k-PGD against ε, per dataset and method (mean ± std over seeds).
- training_curves_<dataset>.png: L_C, L_D, L_R and dev accuracy (and the validation accuracy that selects the
  checkpoint, when logged) against the step; a branch run is drawn after its trunk's curves, as one line, with its
  branch step marked.
- cos_histogram_<dataset>.png: per-example cos(R, R^adv) at Table 4's first α (projected k-PGD at ε = α).
- tradeoff_<dataset>.png: clean accuracy against accuracy at the largest ε, one point per method (means over the
  seeds every method has; methods on fewer seeds than most are left out), the FreeLB variants that no other beats both
  ways joined by a line: FreeLB's own clean-robust curve, so a method that is more robust only because it is less
  accurate clean lies on it, and one that improves on FreeLB lies above it (report.md's "Distance to FreeLB's
  clean–robust curve" measures it, with CIs).
- diagnostics_<dataset>.png, when runs log gradient diagnostics: the terms' gradient norms, their cosines with
  ∇L_C, and the step's gradient norm before clipping with the clip factor; the auxiliary term's start marked.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from carlrar.report import NAMES, NORMS, find, grouped, method_key, table4_alphas
from carlrar.report_curve import frontier
from carlrar.report_diagnostics import aux_start

TERM_STYLES = {"C": "-", "D": "-.", "R": ":"}  # linestyle per objective term in the diagnostics figure


def plots(runs: list[dict], results: Path) -> list[Path]:
    """Write every figure into ``results``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    groups = grouped(runs)
    datasets = sorted({d for d, _ in groups})
    colors = {m: f"C{i % 10}" for i, m in enumerate(sorted({m for _, m in groups}, key=method_key))}
    written = [accuracy_vs_eps(groups, datasets, colors, results / "accuracy_vs_eps.png")]
    for d in datasets:
        by_method = {m: rs for (dd, m), rs in groups.items() if dd == d}
        written.append(training_curves(d, by_method, colors, results / f"training_curves_{d}.png"))
        written.append(cos_histogram(d, by_method, colors, results / f"cos_histogram_{d}.png"))
        written.append(tradeoff(d, by_method, colors, results / f"tradeoff_{d}.png"))
        if any(r.get("diagnostics") for rs in by_method.values() for r in rs):
            written.append(diagnostics_plot(d, by_method, colors, results / f"diagnostics_{d}.png"))
    return written


def mean_by_step(record_lists: Iterable[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Steps at which any run's records have ``key``, and its mean over those runs at each."""
    by_step: dict[int, list[float]] = {}
    for records in record_lists:
        for x in records:
            if x.get(key) is not None:
                by_step.setdefault(x["step"], []).append(x[key])
    steps = sorted(by_step)
    return steps, [statistics.mean(by_step[s]) for s in steps]


def mark_steps(ax, steps: Iterable[int | None], color: str):
    """A vertical dashed line at each step (a branch point or the auxiliary term's start); None / 0 skipped."""
    for s in sorted({s for s in steps if s}):
        ax.axvline(s, color=color, linestyle="--", linewidth=1, alpha=0.6)


def finish(ax, title: str, empty: str = "no run logs this"):
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    if ax.lines and any(not line.get_label().startswith("_") for line in ax.lines):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, empty, ha="center", transform=ax.transAxes, color="grey")


def accuracy_vs_eps(groups: dict, datasets: list[str], colors: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for (dd, m), rs in groups.items():
            if dd != d:
                continue
            eps = [0.0] + [a["eps"] for a in rs[0]["attack"]["attacks"]]
            acc = np.array([[r["attack"]["clean_accuracy"]] + [a["accuracy"] for a in r["attack"]["attacks"]]
                            for r in rs]) * 100
            ax.errorbar(eps, acc.mean(0), yerr=acc.std(0, ddof=1) if len(rs) > 1 else None, marker="o", capsize=3,
                        color=colors[m], label=f"{NAMES.get(m, m)} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
        attack = rs[0]["attack"]
        ax.set(title=f"{d}: accuracy under {attack['steps']}-PGD", ylabel="accuracy (%)",
               xlabel=f"ε ({NORMS.get(attack['norm'], attack['norm'])})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)


def tradeoff_points(by_method: dict[str, list[dict]]) -> tuple[dict[str, tuple[float, float]], set[int], float]:
    """Per method, (clean %, % under attack at the largest ε) averaged over the seeds every method has, so that
    methods run on more seeds are not compared on an easier or harder draw; those seeds; that ε. Methods run on
    fewer seeds than the median method are left out (one seed-0 probe would otherwise shrink every mean to seed 0)."""
    enough = statistics.median_low([len({r["seed"] for r in rs}) for rs in by_method.values()])
    kept = {m: rs for m, rs in by_method.items() if len({r["seed"] for r in rs}) >= enough}
    shared = set.intersection(*({r["seed"] for r in rs} for rs in kept.values()))
    eps = max(a["eps"] for rs in kept.values() for a in rs[0]["attack"]["attacks"])
    points = {}
    for m, rs in kept.items():
        rs = [r for r in rs if r["seed"] in shared] or rs  # no seed shared by all: each method's own
        robust = [a["accuracy"] for r in rs for a in r["attack"]["attacks"] if a["eps"] == eps]
        if len(robust) == len(rs):  # a method not attacked at that ε is left out
            points[m] = (100 * statistics.mean(r["attack"]["clean_accuracy"] for r in rs), 100 * statistics.mean(robust))
    return points, shared, eps


def tradeoff(d: str, by_method: dict[str, list[dict]], colors: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    points, shared, eps = tradeoff_points(by_method)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    freelbs = np.array(sorted(points[m] for m, rs in by_method.items()
                              if m in points and rs[0]["config"].get("method", m) == "freelb")).reshape(-1, 2)
    front = freelbs[frontier(freelbs[None, :, 0], freelbs[None, :, 1])[0]]
    if len(front) > 1:  # FreeLB's own trade-off: the variants no other beats both ways, in order of clean accuracy
        ax.plot(*front.T, color="grey", linestyle="--", linewidth=1, label="FreeLB family's frontier")
    middle = np.median([clean for clean, _ in points.values()]) if points else 0.0
    for m, (clean, robust) in points.items():
        ax.scatter(clean, robust, color=colors[m], s=30)
        right = clean > middle  # labels of the right half point left, so none runs past the axes
        ax.annotate(NAMES.get(m, m), (clean, robust), fontsize=7, xytext=(-3 if right else 3, 3),
                    textcoords="offset points", ha="right" if right else "left")
    seeds = ", ".join(map(str, sorted(shared))) if shared else "each method's own"
    ax.set(title=f"{d}: clean vs accuracy at ε = {eps} (dev; seeds {seeds})", xlabel="clean accuracy (%)",
           ylabel=f"accuracy under k-PGD at ε = {eps} (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return save(fig, path)


def training_curves(d: str, by_method: dict[str, list[dict]], colors: dict, path: Path) -> Path:
    """Losses and accuracies against the step, mean over seeds; a branch continues its trunk's line."""
    import matplotlib.pyplot as plt

    keys = [("train_loss", "L_C (mean over passes)"), ("train_loss_D", "L_D (CARL)"), ("train_loss_R", "L_R (RAR)"),
            ("dev_accuracy", "dev accuracy")]
    if any(c.get("val_accuracy") is not None for rs in by_method.values() for r in rs for c in r["curves"]):
        keys.append(("val_accuracy", "validation accuracy (selection)"))
    fig, axes = plt.subplots(2, 2 if len(keys) == 4 else 3, figsize=(11 if len(keys) == 4 else 15, 7))
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, keys):
        for m, rs in by_method.items():
            steps, means = mean_by_step(((r.get("trunk_curves") or []) + r["curves"] for r in rs), key)
            if steps:
                ax.plot(steps, means, marker=".", color=colors[m], label=NAMES.get(m, m))
                mark_steps(ax, ((r.get("branch") or {}).get("step") for r in rs), colors[m])
        finish(ax, title, "no run logs this loss")
    branched = any(r.get("branch") for rs in by_method.values() for r in rs)
    fig.suptitle(f"{d}: training curves (mean over seeds; losses averaged between dev evaluations"
                 + ("; dashed: branch step)" if branched else ")"))
    return save(fig, path)


def cos_histogram(d: str, by_method: dict[str, list[dict]], colors: dict, path: Path) -> Path:
    """Per-example cos(R, R^adv) after k-PGD projected to Table 4's first α, all seeds pooled."""
    import matplotlib.pyplot as plt

    alpha = table4_alphas(next(iter(by_method.values()))[0]["attack"])[0]
    cos = {m: np.concatenate([find(r["per_example"]["attacks"], "eps", alpha)["cos"] for r in rs])
           for m, rs in by_method.items()}
    edges = np.histogram_bin_edges(np.concatenate(list(cos.values())), bins=50)  # the attack may barely turn R
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, values in cos.items():
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5, color=colors[m],
                label=f"{NAMES.get(m, m)} (mean {values.mean():.4f})")
    ax.set(title=f"{d}: cos(R, R^adv) per dev example (projected to α = {alpha:g}, all seeds)",
           xlabel="cosine similarity", ylabel="examples", yscale="log")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    return save(fig, path)


def diagnostics_plot(d: str, by_method: dict[str, list[dict]], colors: dict, path: Path) -> Path:
    """Per method (mean over seeds): the terms' gradient norms (log), their cosines with ∇L_C, and the gradient
    norm before clipping with the clip factor; dashed: where the auxiliary term starts."""
    import matplotlib.pyplot as plt

    fig, (norms, cosines, clipping) = plt.subplots(1, 3, figsize=(17, 4.8))
    factor = clipping.twinx()
    for m, rs in by_method.items():
        records = [r.get("diagnostics") or [] for r in rs]
        name, color = NAMES.get(m, m), colors[m]
        panels = [(norms, f"grad_{t}", f"‖∇L_{t}‖", style) for t, style in TERM_STYLES.items()]
        panels += [(cosines, f"cos_C_{t}", f"cos(∇L_C, ∇L_{t})", TERM_STYLES[t]) for t in "DR"]
        panels += [(clipping, "grad_norm", "‖g‖ before clipping", "-"), (factor, "clip_factor", "clip factor", ":")]
        for ax, key, label, style in panels:
            steps, means = mean_by_step(records, key)
            if steps:
                ax.plot(steps, means, linestyle=style, color=color, label=f"{name} {label}")
        if any(records):
            for ax in (norms, cosines, clipping):
                mark_steps(ax, map(aux_start, rs), color)
    norms.set_yscale("log")
    cosines.axhline(0, color="grey", linewidth=0.8)
    factor.set(ylim=(0, 1.05), ylabel="clip factor (dotted)")
    clipping.set_ylabel("‖g‖ before clipping (solid)")
    for ax, title in ((norms, "gradient norm per term"), (cosines, "cosine with ∇L_C"),
                      (clipping, "clipping of the step's gradient")):
        finish(ax, title)
    handles = [h for ax in (clipping, factor) for h in ax.get_legend_handles_labels()[0]]
    if handles:
        clipping.legend(handles=handles, fontsize=7)
    fig.suptitle(f"{d}: gradient diagnostics (mean over seeds; dashed: the auxiliary term starts)")
    return save(fig, path)


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from carlrar.ownership import write_whole

    fig.tight_layout()
    try:  # the format named: the temporary file's suffix is not .png
        write_whole(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path
