"""``carlrar report``'s distance to FreeLB's clean–robust curve: is a method more robust than FreeLB *at its own
clean accuracy*, or only as robust as a FreeLB that gives up as much clean accuracy?

A larger training perturbation moves FreeLB along a curve: less accurate clean, more accurate under attack. A method
that lands on that curve has bought robustness with clean accuracy, as FreeLB could have; only one above it improves
on FreeLB. The curve is the FreeLB family's variants (every method whose config runs FreeLB) that no other of them
beats both clean and under attack, joined in order of clean accuracy; a method's distance is its accuracy under
attack minus the curve's at the method's clean accuracy (linear between the two nearest FreeLB variants; beyond the
curve's ends, the nearer end's: that favours a method less accurate clean than every FreeLB variant, since a harder
FreeLB would be more robust still, and disfavours one more accurate). This is ``tradeoff_<dataset>.png`` as a number
with a CI.

Which variants are the curve is decided once, on all seeds and examples; the bootstrap then moves those variants
and the method together. It resamples the attacked dev examples and the seeds, both jointly for all methods: a seed's branches
share its trunk and data order, so the curve and the method are compared seed by seed, as in any paired design."""

from __future__ import annotations

import statistics

import numpy as np

from carlrar.report import NAMES, Grid, correctness, md_table


def curve_members(grid: Grid, d: str) -> list[str]:
    """The FreeLB family on dataset d, less variants run on fewer seeds than most of it (a one-seed probe would
    otherwise shrink every comparison to its seed)."""
    family = [m for m in grid.methods if grid.runs(d, m) and grid.runs(d, m)[0]["config"].get("method", m) == "freelb"]
    if not family:
        return []
    enough = statistics.median_low([len(grid.runs(d, m)) for m in family])
    return [m for m in family if len(grid.runs(d, m)) >= enough]


def frontier(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Per draw, which curve variants no other variant beats both clean and under attack (draws × variants, bool):
    the curve is what FreeLB can reach, so a variant another one dominates does not lower it."""
    xi, yi, xj, yj = xs[:, :, None], ys[:, :, None], xs[:, None, :], ys[:, None, :]
    return ~(((xj >= xi) & (yj > yi)) | ((xj > xi) & (yj >= yi))).any(2)


def curve_at(clean: np.ndarray, xs: np.ndarray, ys: np.ndarray,
             front: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per draw, the curve's accuracy under attack at ``clean`` (draws,), linear between the two frontier variants
    either side of it, the nearer end's beyond them; and whether ``clean`` lies between the ends. xs, ys: clean
    accuracy and accuracy under attack of the curve's variants (draws × variants); front: which variants are the
    curve (variants,), by default each draw's own frontier."""
    front = frontier(xs, ys) if front is None else np.broadcast_to(front, xs.shape)
    c = clean[:, None]
    left = np.where(front & (xs <= c), xs, -np.inf)
    right = np.where(front & (xs >= c), xs, np.inf)
    has_left, has_right = np.isfinite(left.max(1)), np.isfinite(right.min(1))
    pick = lambda a, i: np.take_along_axis(a, i[:, None], 1)[:, 0]  # noqa: E731
    xl, yl = pick(xs, left.argmax(1)), pick(ys, left.argmax(1))
    xr, yr = pick(xs, right.argmin(1)), pick(ys, right.argmin(1))
    between = yl + np.divide(clean - xl, xr - xl, out=np.zeros_like(clean), where=xr > xl) * (yr - yl)
    return np.where(~has_left, yr, np.where(~has_right, yl, between)), has_left & has_right


def draw_means(values: np.ndarray, seed_weights: np.ndarray, example_weights: np.ndarray) -> np.ndarray:
    """Per draw, the weighted mean of values (seeds × examples), the weights being bootstrap counts (draws × seeds,
    draws × examples): the same as indexing the resampled seeds and examples, without copying them per draw."""
    per_seed = values @ example_weights.T  # seeds × draws
    return (seed_weights.T * per_seed).sum(0) / (seed_weights.sum(1) * example_weights.sum(1))


def distance_row(grid: Grid, d: str, m: str, members: list[str], eps: list[float], n_boot: int = 10000,
                 seed: int = 0) -> tuple[list[str], tuple[str, ...]] | None:
    """m's distance to the curve at each ε (point estimate and 95 % CI), on the seeds m shares with every member;
    and, per ε, which members are the curve on those seeds."""
    seeds = set.intersection(*({r["seed"] for r in grid.runs(d, x)} for x in [m, *members]))
    if not seeds:
        return None
    runs = {x: sorted((r for r in grid.runs(d, x) if r["seed"] in seeds), key=lambda r: r["seed"]) for x in [m, *members]}
    n, s = len(runs[m][0]["per_example"]["clean_correct"]), len(seeds)
    rng = np.random.default_rng(seed)
    weights = (np.ones((1, s)), np.ones((1, n))), (rng.multinomial(s, [1 / s] * s, size=n_boot),
                                                   rng.multinomial(n, [1 / n] * n, size=n_boot))
    clean = {x: [draw_means(correctness(rs, None), *w) for w in weights] for x, rs in runs.items()}
    cells, curves = [], []
    for e in eps:
        robust = {x: [draw_means(correctness(rs, e), *w) for w in weights] for x, rs in runs.items()}
        # k = 0: the point estimate (every seed and example once); k = 1: the bootstrap draws
        xs, ys = ([np.stack([v[x][k] for x in members], 1) for k in (0, 1)] for v in (clean, robust))
        # The curve's variants are fixed by the point estimate: letting each draw pick its own frontier would make
        # the distance jump when a dominated variant's clean accuracy crosses another's, and widen one CI end.
        front = frontier(xs[0], ys[0])[0]
        on = sorted(((x, c) for x, c, f in zip(members, xs[0][0], front) if f), key=lambda t: -t[1])
        curves.append(f"ε={e:g}: " + ", ".join(f"{NAMES.get(x, x)} ({100 * c:.2f})" for x, c in on))
        (at_point, inside), (at_draws, _) = (curve_at(clean[m][k], xs[k], ys[k], front) for k in (0, 1))
        point, (lo, hi) = robust[m][0][0] - at_point[0], np.percentile(robust[m][1] - at_draws, [2.5, 97.5])
        cells.append(f"{100 * point:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]" + ("" if inside[0] else " ·"))
    label = f"seed{'s' * (s > 1)} {', '.join(map(str, sorted(seeds)))}"
    return [NAMES.get(m, m), label, f"{100 * clean[m][0][0]:.2f}", *cells], (label, *curves)


def curve_section(grid: Grid, d: str, n_boot: int = 10000) -> list[str]:
    """The table: one row per method outside the FreeLB family; nothing when the family has fewer than two."""
    members = curve_members(grid, d)
    if len(members) < 2:
        return []
    eps = [a["eps"] for a in grid.attack(d)["attacks"]]
    done = [r for m in grid.methods if m not in members and grid.runs(d, m)[0]["config"].get("method", m) != "freelb"
            for r in [distance_row(grid, d, m, members, eps, n_boot)] if r]
    rows, curves = [r for r, _ in done], dict.fromkeys(c for _, c in done)  # one line per seed set, in row order
    curve = ", ".join(NAMES.get(m, m) for m in members)
    return ["", f"## Distance to FreeLB's clean–robust curve ({d}), percentage points, 95 % CI", "",
            f"The curve: {curve}, those no other of them beats both clean and under attack (on all seeds and examples; the same variants in "
            "every draw), joined in order of clean accuracy on the attacked dev examples. Each row: accuracy under attack minus the curve's "
            "at the method's clean accuracy (linear between FreeLB variants; beyond the curve's ends, marked ·, its "
            "nearer end point, which favours a method less accurate clean than every FreeLB, disfavours one more accurate). Positive: more robust than FreeLB at the "
            "same clean accuracy; near 0: on FreeLB's own trade-off. 10,000 draws resampling the examples and the "
            "seeds jointly for every method (a seed's branches share its trunk), on the seeds the method shares "
            "with every curve variant.", "",
            *md_table(["method", "seeds", "clean (attacked examples)", *(f"ε={e:g}" for e in eps)], rows), "",
            "The curve's variants on each row's seeds, most accurate clean first (clean accuracy on the attacked "
            "examples):", "",
            *(f"- {label}: " + "; ".join(c) for label, *c in curves)]
