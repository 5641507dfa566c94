"""``carlrar search``: hyperparameter search with Optuna over the paper's Table 8 bounds and the CARL / RAR knobs;
objective: the best selection accuracy (validation when ``--validation_size`` carves one, else dev), or with
``objective="robust"`` that split's accuracy under k-PGD at ``objective_eps`` (10 steps of ε/4, as the report's
attacks) of the run's chosen model: the methods exist for robustness, and clean accuracy alone favours the
baseline, which has no extra term to pay for (beyond the paper, whose Table 8 search maximises dev accuracy).

Table 8: γ (adv_init_mag) ∈ [0, 0.8], α (adv_lr) ∈ [0.01, 0.2], ε (adv_max_norm) ∈ [0, 0.5], n (adv_steps) ∈ [2, 4].
Beyond it (``SPACE``): the learning rate, CARL's weight ratio, τ, projection and start rule, RAR's weight and weight
ratio: tune FreeLB's own knobs with as many trials as the method's, so the baseline is tuned as hard.
The study lives in STUDY_DIR/study.db (SQLite), so a search stopped at any point continues where it was: a trial
killed mid-run is detected by its missing heartbeat, retried with the same parameters, and its training resumes from
the killed trial's checkpoint. With the clean objective, trials report selection accuracy (validation when carved)
at each evaluation and the median pruner stops bad ones (not with the robust one: it measures something else).
The best trial's full training configuration is written to STUDY_DIR/best.yaml (``carlrar train --config``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

from carlrar.errors import UserError

# name → (low, high, log scale, grid points)
TABLE_8 = {
    "adv_init_mag": (0.0, 0.8, False, [0.0, 0.3, 0.6, 0.8]),
    "adv_lr": (0.01, 0.2, True, [0.01, 0.05, 0.1, 0.2]),
    "adv_max_norm": (0.0, 0.5, False, [0.0, 0.25, 0.5]),
    "adv_steps": (2, 4, False, [2, 3, 4]),
}


# name → (low, high, log scale, grid points), or (None, None, None, choices) for a categorical knob
SPACE = {
    **TABLE_8,
    "lr": (1e-5, 1e-4, True, [1e-5, 2e-5, 5e-5, 1e-4]),
    "carl_weight_ratio": (0.1, 10.0, True, [0.25, 1.0, 4.0]),
    "carl_temperature": (0.03, 0.5, True, [0.05, 0.07, 0.2]),
    "carl_proj_dim": (None, None, None, [0, 128]),
    "carl_start_rule": (None, None, None, ["step", "plateau"]),
    "carl_representation": (None, None, None, ["cls", "head_input"]),
    "rar_weight": (0.01, 0.3, True, [0.01, 0.03, 0.1, 0.3]),
    "rar_weight_ratio": (0.1, 10.0, True, [0.25, 1.0, 4.0]),
    "rar_ascent": (None, None, None, ["total", "classification"]),
}


def suggest(trial, names: list[str]) -> dict:
    params = {}
    for name in names:
        low, high, log, grid = SPACE[name]
        if low is None:
            params[name] = trial.suggest_categorical(name, grid)
        elif isinstance(low, int):
            params[name] = trial.suggest_int(name, low, high)
        else:
            params[name] = trial.suggest_float(name, low, high, log=log)
    return params


def defaults_of(configs: tuple, names: list[str], sampler: str) -> dict:
    """The searched knobs' values in the given configuration (the method's defaults, or what the command line set)
    as a trial to enqueue, so that the study compares its trials with the setting it starts from; a value the
    search space cannot hold is a user error (e.g. carl_weight_ratio 0: the paper's fixed weight, not a ratio)."""
    values, outside = {}, []
    for name in names:
        value = next(getattr(c, name) for c in configs if hasattr(c, name))
        low, high, _, grid = SPACE[name]
        value = 0 if value is None and 0 in grid else value  # carl_proj_dim: none is 0 in the space
        inside = value in grid if low is None or sampler == "grid" else value is not None and low <= value <= high
        values[name] = value
        if not inside:
            outside.append(f"{name} = {value}")
    if outside:
        raise UserError(f"--enqueue-defaults: {', '.join(outside)} outside the search space (see --params); set it "
                        "to a value inside, or search without it")
    return values


def make_study(study_dir: Path, sampler: str, names: list[str], seed: int):
    import optuna

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{study_dir / 'study.db'}", heartbeat_interval=30, grace_period=90,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    # A later sitting must not replay the first one's random draws (TPE's start-up trials are plain draws from its
    # seeded generator: same seed, same knobs again), so each sitting's seed also counts the trials already made.
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    seed += studies.get("carlrar", 0)
    if sampler == "grid":
        chosen = optuna.samplers.GridSampler({n: SPACE[n][3] for n in names}, seed=seed)
    else:
        chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.create_study(study_name="carlrar", storage=storage, sampler=chosen, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def robust_accuracy(cfg, eps: float) -> float:
    """Accuracy under k-PGD at ``eps`` (10 steps of ε/4) of the run's chosen model, on its selection split
    (validation when carved, else dev)."""
    from carlrar.attack import attack_split
    from carlrar.data import EncodedSplit
    from carlrar.models import label_names, load_tokenizer, load_trained
    from carlrar.train import load_splits

    ds, _, validation = load_splits(cfg)
    model, tokenizer = load_trained(cfg.resolved_output_dir()), load_tokenizer(str(cfg.resolved_output_dir()))
    split = validation or ds.split_for_model("dev", label_names(model))
    result = attack_split(model, EncodedSplit(split, tokenizer, cfg.max_length), tokenizer.pad_token_id, [eps])
    return result["attacks"][0]["accuracy"]


def search(configs: tuple, study_dir: Path, trials: int, sampler: str = "tpe", names: list[str] | None = None,
           seed: int = 0, objective: str = "clean", objective_eps: float = 0.1, enqueue_defaults: bool = False):
    """Run trials until ``trials`` have completed or been pruned (counting earlier sittings); return the study.
    ``objective``: "clean" (selection accuracy) or "robust" (its accuracy under k-PGD at ``objective_eps``).
    ``enqueue_defaults``: the configuration's own values of the searched knobs run as a trial (once per study, one
    of ``trials``), so that the best trial is never a setting worse than the one the search started from."""
    import optuna

    from carlrar.config import to_dict, write_yaml
    from carlrar.train import train

    names = names or list(TABLE_8)
    unknown = [n for n in names if n not in SPACE]
    if unknown:
        raise UserError(f"--params: {', '.join(unknown)} not searchable (choose from {', '.join(SPACE)})")
    foreign = [n for n in names if not any(hasattr(c, n) for c in configs)]
    if foreign:
        raise UserError(f"--method {configs[0].method} has no option {', '.join(foreign)} to search")
    if objective not in ("clean", "robust") or not objective_eps > 0:
        raise UserError(f"objective {objective!r} at ε {objective_eps}: expected clean or robust, and ε > 0")
    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = make_study(study_dir, sampler, names, seed)
    goal = objective if objective == "clean" else f"robust@{objective_eps:g}"
    previous = study.user_attrs.get("objective", "clean" if study.trials else goal)  # older studies: clean
    if previous != goal:
        raise UserError(f"{study_dir}: this study maximises {previous}, not {goal}: use another --study-dir")
    study.set_user_attr("objective", goal)
    if enqueue_defaults:
        defaults = defaults_of(configs, names, sampler)
        if not any(t.params == defaults for t in study.trials):  # a later sitting does not enqueue it again
            study.enqueue_trial(defaults)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def run_trial(trial):
        params = suggest(trial, names)
        # a retried (killed) trial trains in the original trial's folder and resumes from its checkpoint
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        number = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        out = study_dir / f"trial-{trial.number if number is None else number}"
        run = tuple(dataclasses.replace(c, **{k: v for k, v in params.items() if hasattr(c, k)}) for c in configs)
        run = (dataclasses.replace(run[0], output_dir=str(out), overwrite=False), *run[1:])
        print(f"── trial {trial.number}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in params.items()), file=sys.stderr)

        def report(step: int, accuracy: float):
            if objective != "clean":  # the median pruner compares what the objective measures: here, not that
                return
            trial.report(accuracy, step)
            if trial.should_prune():
                print(f"   pruned at step {step} (selection accuracy {accuracy:.4f})", file=sys.stderr)
                raise optuna.TrialPruned()

        try:
            final = train(*run, on_evaluate=report)
        except UserError as e:
            if not str(e).startswith("non-finite"):
                raise
            print(f"   diverged: {e}".split(";")[0], file=sys.stderr)  # a bad corner of Table 8, not a bad search
            raise optuna.TrialPruned() from None
        trial.set_user_attr("output_dir", str(out))
        trial.set_user_attr("config", to_dict(*run))
        clean = (final.get("validation") or final["dev"])["accuracy"]  # choices on validation when there is one
        if objective == "clean":
            return clean
        trial.set_user_attr("clean_accuracy", clean)
        return robust_accuracy(run[0], objective_eps)

    done = sum(t.state in finished for t in study.trials)
    if done < trials:
        study.optimize(run_trial, callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished)],
                       catch=(RuntimeError, FloatingPointError))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise UserError(f"{study_dir}: no trial has completed yet (all pruned or failed); see trials in study.db")
    best = study.best_trial
    config = {k: v for k, v in best.user_attrs["config"].items()
              if k not in ("output_dir", "overwrite", "config", "preset")}
    write_yaml(study_dir / "best.yaml", config)
    summary = [{"number": t.number, "state": t.state.name, "value": t.value, **t.params,
                **({"clean_accuracy": t.user_attrs["clean_accuracy"]} if "clean_accuracy" in t.user_attrs else {})}
               for t in study.trials]
    (study_dir / "trials.json").write_text(json.dumps(summary, indent=1))
    return study
