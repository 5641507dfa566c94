#!/usr/bin/env python
"""Where would `--carl_start_rule plateau` have started L_D in the converged protocol? Replays the rule (the real
``ContrastiveTerm.after_evaluate``) on each seed's FreeLB validation curve, trunk then FreeLB branch: the trajectory a
from-scratch CARL run follows until L_D starts (up to its warm-up: 5 % of 1,000 steps, not of the trunk's 750).

    python scripts/plateau-replay.py results/converged-sst2 results/converged-agnews [--patience 1 2 3]

Prints a markdown table: per dataset and seed, the validation curve and the step L_D would start at for each
patience ("never": no evaluation before the run's last step stalls long enough)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from carlrar.objectives.contrastive import ContrastiveTerm


def replay(curve: list[tuple[int, float]], patience: int, total_steps: int) -> int | None:
    """The start step the plateau rule sets on this validation curve, or None if it never fires before the end."""
    term = SimpleNamespace(config=SimpleNamespace(carl_start_rule="plateau", carl_plateau_patience=patience),
                           start_step=total_steps + 1, plateau=[-1.0, 0])  # as ContrastiveTerm.__init__ sets them
    for step, accuracy in curve:
        ContrastiveTerm.after_evaluate(term, step, accuracy)
        if term.start_step <= step:
            break
    return term.start_step if term.start_step < total_steps else None


def curves(results: Path) -> dict[int, tuple[str, list[tuple[int, float]], bool]]:
    """Seed → (dataset, trunk + FreeLB-branch validation curve, whether the branch was found) for every trunk in the
    results folder."""
    out = {}
    for trunk in sorted((results / "trunks").glob("*-trunk-s*.json")):
        run = json.loads(trunk.read_text())
        branch = results / "runs" / trunk.name.replace("-trunk-", "-freelb-")
        branched = branch.exists()
        points = run["curves"] + (json.loads(branch.read_text())["curves"] if branched else [])
        out[run["seed"]] = (run["dataset"], [(c["step"], c["val_accuracy"]) for c in points], branched)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--patience", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total_steps", type=int, default=1000, help="trunk + branch steps (the protocol's 750 + 250)")
    args = parser.parse_args(argv)
    for results in args.results:  # all checked before any line is printed
        if not (results / "trunks").is_dir():
            print(f"error: {results}: no trunks/ folder (not a converged-protocol results folder)", file=sys.stderr)
            return 1
    print("| dataset | seed | validation % at each evaluation | " +
          " | ".join(f"start, patience {k}" for k in args.patience) + " |")
    print("|---|---|---|" + "---|" * len(args.patience))
    for results in args.results:
        for seed, (dataset, curve, branched) in sorted(curves(results).items()):
            starts = [replay(curve, k, args.total_steps) for k in args.patience]
            shown = " ".join(f"{100 * a:.2f}" for _, a in curve) + ("" if branched else " (trunk only: no FreeLB branch)")
            print(f"| {dataset} | {seed} | {shown} | " +
                  " | ".join("never" if s is None else str(s) for s in starts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
