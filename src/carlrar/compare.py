"""``carlrar compare RUN...``: the small version of ``carlrar report`` for plain ``carlrar train`` output
directories: clean dev accuracy and accuracy under attack side by side, from each run's final_metrics.json and
attack_*.json."""

from __future__ import annotations

import json
from pathlib import Path

from carlrar.errors import UserError


def compare_runs(runs: list[Path]) -> tuple[list[float], list[tuple[Path, dict, dict]]]:
    """Every ε attacked in any run (first seen first), and per run: its final metrics and the results by ε of its
    first ``attack_*.json``."""
    rows, eps = [], []
    for run in map(Path, runs):
        final = run / "final_metrics.json"
        if not final.is_file():
            raise UserError(f"{run}: no final_metrics.json (not a finished carlrar run)")
        metrics = read_result(final, ("method", "dev", "examples_per_s"))
        attacks = [read_result(f, ("attacks",)) for f in sorted(run.glob("attack_*.json"))]
        by_eps = {a["eps"]: a for r in attacks[:1] for a in r["attacks"]}
        eps += [e for e in by_eps if e not in eps]
        rows.append((run, metrics, by_eps))
    return eps, rows


def read_result(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON result file with ``keys``, or a one-line user error (truncated, corrupt, unreadable, not carlrar's)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = getattr(e, "strerror", None) or getattr(e, "msg", None) or e
        raise UserError(f"{path}: unreadable ({why})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{path}: no {missing[0]!r} (not written by carlrar)")
    return data


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
