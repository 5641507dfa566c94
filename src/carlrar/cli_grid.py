"""``carlrar`` commands over many runs: compare, reproduce, report, search (flags here; the work in ``compare``,
``reproduce``, ``report``, ``search``). Same rules as ``carlrar.cli``: one-line errors, nothing half-written."""

from __future__ import annotations

import sys
from pathlib import Path

from carlrar.errors import UserError, need
from carlrar.validation import SEED_MAX, ArgumentParser, checks_value, number, path, text


def cmd_compare(argv: list[str]):
    from carlrar.compare import compare_runs, print_comparison

    p = ArgumentParser(prog="carlrar compare", description="side-by-side table of trained runs: clean dev accuracy "
                       "and accuracy under attack from each run's final_metrics.json and attack_*.json")
    p.add_argument("runs", nargs="+", type=path("dir"), help="output directories of carlrar train")
    args = p.parse_args(argv)
    print_comparison(*compare_runs(args.runs))


@checks_value  # the value is checked with the training options it sets (reproduce's run_configs)
def _set_option(option: str, name: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise UserError(f"--{name} {option!r}: expected KEY=VALUE")
    import yaml

    return key, yaml.safe_load(value)


def cmd_reproduce(argv: list[str]):
    from carlrar.reproduce import Protocol, reproduce

    p = ArgumentParser(prog="carlrar reproduce", description="the paper's comparison as a resumable grid of runs "
                       "(methods × datasets × seeds): train → dev (+ test) → k-PGD per ε → R vs R^adv distances")
    p.add_argument("--results", required=True, type=path("new_dir"), help="results folder (index.json, "
                   "runs/*.json, models/)")
    p.add_argument("--protocol", default="cpu", type=text, help="protocol name (carlrar/protocols/*.yaml) or YAML file "
                   "(default cpu)")
    p.add_argument("--methods", type=text, help="comma-separated methods (default: the protocol's)")
    p.add_argument("--datasets", type=text, help="comma-separated datasets (default: the protocol's)")
    p.add_argument("--seeds", type=text, help="a number N (seeds 0..N-1) or comma-separated seeds (default: the protocol's)")
    p.add_argument("--set", dest="options", action="append", type=_set_option, default=[], metavar="KEY=VALUE",
                   help="a training option for every run, e.g. --set train_subset=2000 (repeatable)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's resumable checkpoint")
    args = p.parse_args(argv)
    protocol = Protocol.load(args.protocol)
    protocol.narrow(args.methods, args.datasets, args.seeds)
    command = "carlrar reproduce " + " ".join(argv)
    index = reproduce(protocol, Path(args.results), dict(args.options), args.keep_checkpoints, command)
    if any(r["status"] == "failed" for r in index["runs"].values()):
        sys.exit(1)
    print(f"all runs done; tables and plots: carlrar report {args.results}", file=sys.stderr)


def cmd_report(argv: list[str]):
    from carlrar.report import write_report

    p = ArgumentParser(prog="carlrar report", description="the paper's tables (mean ± std over seeds, paired "
                       "bootstrap CIs vs FreeLB) and plots from a carlrar reproduce folder")
    p.add_argument("results", type=path("dir"), help="the --results folder of carlrar reproduce")
    args = p.parse_args(argv)
    need("matplotlib", "plots", "carlrar report")
    out, pngs = write_report(Path(args.results))
    print(out.read_text(encoding="utf-8").split("\n## Plots")[0])
    print(f"report written to {out}" + (f"; plots: {', '.join(p.name for p in pngs)}" if pngs else ""), file=sys.stderr)


def cmd_search(argv: list[str]):
    from carlrar.config import TrainConfig, parse_args
    from carlrar.methods import METHODS, config_classes
    from carlrar.search import SPACE, TABLE_8, search

    p = ArgumentParser(prog="carlrar search", description="Optuna search over the paper's Table 8 bounds "
                       "(γ, α, ε, n), objective validation (else dev) accuracy, clean or under attack, resumable (SQLite); other options as carlrar train",
                       add_help=False)
    p.add_argument("--study-dir", required=True, type=path("new_dir"), help="folder for study.db, one folder per "
                   "trial, best.yaml")
    p.add_argument("--trials", type=number(whole=True, low=1), default=20, help="completed + pruned trials to reach "
                   "(default 20)")
    p.add_argument("--sampler", choices=["tpe", "grid"], default="tpe")
    p.add_argument("--params", default=",".join(TABLE_8), type=text, help=f"which to search, of {', '.join(SPACE)} "
                   f"(default Table 8's {','.join(TABLE_8)})")
    p.add_argument("--search-seed", type=number(whole=True, low=0, high=SEED_MAX), default=0, help="the sampler's "
                   "seed")
    p.add_argument("--objective", choices=["clean", "robust"], default="clean", help="clean: selection accuracy "
                   "(the paper's); robust: its accuracy under 10-step k-PGD at --objective-eps (no pruning)")
    p.add_argument("--objective-eps", type=number(above=0), default=0.1, help="ε of --objective robust "
                   "(default 0.1)")
    p.add_argument("--enqueue-defaults", action="store_true", help="run the configuration's own values of the "
                   "searched knobs as the study's first trial (counts as one of --trials)")
    if argv in (["-h"], ["--help"]):
        p.print_help()
        print("\nAll carlrar train options are accepted too (e.g. --preset demo --method freelb).")
        return
    args, rest = p.parse_known_args(argv)
    need("optuna", "search", "carlrar search")
    parsed = parse_args((TrainConfig, *config_classes()), rest, prog="carlrar search")
    cfg = parsed[0]
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    by_class = {type(c): c for c in parsed[1:]}
    configs = (cfg, *[by_class[c] for c in METHODS[cfg.method].config_classes])
    names = [n.strip() for n in args.params.split(",") if n.strip()]
    study = search(configs, Path(args.study_dir), args.trials, args.sampler, names, args.search_seed, args.objective,
                   args.objective_eps, args.enqueue_defaults)
    best = study.best_trial
    what = "selection accuracy" if args.objective == "clean" else f"accuracy under attack (ε {args.objective_eps:g})"
    print(f"best trial {best.number}: {what} {best.value:.4f} with "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.params.items()))
    print(f"best configuration written to {Path(args.study_dir) / 'best.yaml'} "
          f"(carlrar train --config {Path(args.study_dir) / 'best.yaml'})", file=sys.stderr)
