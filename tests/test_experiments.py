"""reproduce (resumable grid), report (tables, bootstrap, plots) and search (Optuna) on the toy task."""

import json
import statistics

import numpy as np
import pytest
import yaml

import carlrar.reproduce
from carlrar.cli import main
from carlrar.report import paired_bootstrap


def write_protocol(path, tiny_model_dir, toy_files, methods=("base", "carl")):
    toy = {"model": str(tiny_model_dir), "train_file": str(toy_files["train"]), "dev_file": str(toy_files["dev"]),
           "text_column": "sentence", "max_steps": 4, "eval_steps": 2, "batch_size": 8, "lr": 1e-3,
           "carl_negatives": 8}
    path.write_text(yaml.safe_dump({"methods": list(methods), "datasets": ["toy"], "seeds": [0, 1],
                                    "train": {"carl_start_step": 0.5}, "datasets_overrides": {"toy": toy},
                                    "attack": {"eps": [0.1], "steps": 2, "distance_alphas": [0.1]}}))
    return path


def test_reproduce_resumes_skips_done_runs_and_reports_failures(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    protocol = write_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)
    results = tmp_path / "results"
    real = carlrar.reproduce.execute_run
    calls = []

    def flaky(configs, attack):  # run 2 fails, run 3 is interrupted (Ctrl-C)
        calls.append(configs[0].resolved_output_dir().name)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(configs, attack)

    monkeypatch.setattr(carlrar.reproduce, "execute_run", flaky)
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    assert e.value.code == 130
    index = json.loads((results / "index.json").read_text())
    status = {n: r["status"] for n, r in index["runs"].items()}
    assert status == {"toy-base-s0": "done", "toy-carl-s0": "failed", "toy-base-s1": "pending",
                      "toy-carl-s1": "pending"}
    assert "disk on fire" in index["runs"]["toy-carl-s0"]["error"]

    monkeypatch.setattr(carlrar.reproduce, "execute_run", real)
    calls.clear()
    monkeypatch.setattr(carlrar.reproduce, "execute_run", lambda c, a: calls.append(c[0].seed) or real(c, a))
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])  # the done run is skipped
    assert calls == [0, 1, 1]
    index = json.loads((results / "index.json").read_text())
    assert {r["status"] for r in index["runs"].values()} == {"done"}
    run = json.loads((results / "runs" / "toy-carl-s1.json").read_text())
    assert len(run["per_example"]["clean_correct"]) == 8 and run["config"]["method"] == "carl"
    assert not (results / "models" / "toy-carl-s1" / "checkpoint").exists()  # dropped once the run is done

    main(["report", str(results)])
    report = (results / "report.md").read_text()
    for png in ("accuracy_vs_eps.png", "training_curves_toy.png", "cos_histogram_toy.png"):
        assert (results / png).stat().st_size > 10_000, png
    # Table 2's cell is the mean ± std of the runs' best dev accuracies
    accs = [json.loads((results / "runs" / f"toy-carl-s{s}.json").read_text())["final"]["dev"]["accuracy"]
            for s in (0, 1)]
    line = next(line for line in report.splitlines() if line.startswith("| CARL |"))
    assert f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}" in line
    assert "## Table 5 (toy)" in report and "## Table 4 (toy)" in report and "11,685,122" in report


def test_reproduce_rejects_bad_options_before_running(tiny_model_dir, toy_files, tmp_path, capsys):
    protocol = write_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)
    for argv, message in [(["--set", "no_such_option=1"], "unknown option 'no_such_option'"),
                          (["--methods", "base,magic"], "unknown method 'magic'"),
                          (["--protocol", "nope"], "unknown protocol 'nope'"),
                          (["--seeds", "x"], "--seeds 'x'"), (["--seeds", "0"], "for seed 0 alone, --seeds 0,")]:
        with pytest.raises(SystemExit) as e:
            main(["reproduce", "--protocol", str(protocol), "--results", str(tmp_path / "r"), *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r" / "runs").exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--protocol", str(protocol), "--results", str(tmp_path / "a-file" / "r")])
    assert e.value.code == 2 and "cannot create the results folder" in capsys.readouterr().err


def test_report_of_a_folder_without_runs_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2 and "no index.json" in capsys.readouterr().err


def test_paired_bootstrap_by_hand():
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=float)  # method A, 2 seeds × 4 examples
    b = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=float)
    mean, lo, hi = paired_bootstrap(a, b)
    assert mean == pytest.approx((0 + 0.5 + 0 + 1) / 4)  # per-example seed means, differenced, averaged
    assert 0.0 <= lo < mean < hi <= 1.0
    assert paired_bootstrap(a[:1], a[:1]) == (0.0, 0.0, 0.0)  # one seed each: only examples vary, in pairs
    width = lambda x, y: paired_bootstrap(x, y)[2] - paired_bootstrap(x, y)[1]  # noqa: E731
    assert width(a, b) > width(a.mean(0, keepdims=True), b[:1])  # A's two seeds disagree: seed variance widens it


def test_search_is_resumable_and_writes_best_config(tiny_model_dir, toy_files, tmp_path, capsys):
    study = tmp_path / "study"
    argv = ["search", "--study-dir", str(study), "--sampler", "grid", "--params", "adv_steps", "--method", "freelb",
            "--model", str(tiny_model_dir), "--train_file", str(toy_files["train"]), "--dev_file",
            str(toy_files["dev"]), "--text_column", "sentence", "--max_steps", "4", "--eval_steps", "2",
            "--batch_size", "8", "--lr", "1e-3"]
    main([*argv, "--trials", "2"])
    assert sorted(p.name for p in study.glob("trial-*")) == ["trial-0", "trial-1"]
    main([*argv, "--trials", "3"])  # one more, not three more
    trials = json.loads((study / "trials.json").read_text())
    assert len(trials) == 3 and sorted(t["adv_steps"] for t in trials) == [2, 3, 4]  # the grid, each once
    best = yaml.safe_load((study / "best.yaml").read_text())
    top = max((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert best["adv_steps"] == top["adv_steps"] and best["method"] == "freelb"
    assert json.loads((study / f"trial-{top['number']}" / "final_metrics.json").read_text())["dev"]["accuracy"] \
        == top["value"]
    main(["train", "--config", str(study / "best.yaml"), "--output_dir", str(tmp_path / "again")])  # a valid config


def test_search_prunes_a_trial_below_the_median(tmp_path, monkeypatch):
    import carlrar.train
    from carlrar.config import TrainConfig
    from carlrar.methods import AdversarialConfig
    from carlrar.search import search

    calls = []

    def fake_train(cfg, *configs, on_evaluate):  # trials 0–2 reach 0.8 at every evaluation, trial 3 only 0.5
        accuracy = 0.5 if len(calls) == 3 else 0.8
        calls.append(cfg.output_dir)
        for step in (2, 4, 6):
            on_evaluate(step, accuracy)
        return {"dev": {"accuracy": accuracy}}

    monkeypatch.setattr(carlrar.train, "train", fake_train)
    study = search((TrainConfig(method="freelb"), AdversarialConfig()), tmp_path / "study", trials=4,
                   names=["adv_init_mag"])
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert study.trials[3].last_step == 2  # stopped at its first evaluation past the warm-up


def test_search_over_carl_knobs_chooses_on_validation(tmp_path, monkeypatch):
    """The new knobs are searchable (categorical ones too) and the objective is the validation accuracy."""
    import carlrar.train
    from carlrar.config import TrainConfig
    from carlrar.errors import UserError
    from carlrar.methods import AdversarialConfig, ContrastiveConfig
    from carlrar.search import search

    seen = []

    def fake_train(cfg, adv, carl, on_evaluate):  # validation prefers the projection; dev the opposite
        seen.append((carl.carl_proj_dim, carl.carl_start_rule))
        val = 0.9 if carl.carl_proj_dim else 0.6
        on_evaluate(2, val)
        return {"dev": {"accuracy": 1.5 - val}, "validation": {"accuracy": val}}

    monkeypatch.setattr(carlrar.train, "train", fake_train)
    configs = (TrainConfig(method="carl", validation_size=8), AdversarialConfig(), ContrastiveConfig())
    study = search(configs, tmp_path / "study", trials=4, sampler="grid", names=["carl_proj_dim", "carl_start_rule"])
    assert sorted(seen) == [(0, "plateau"), (0, "step"), (128, "plateau"), (128, "step")]
    assert study.best_value == 0.9 and study.best_params["carl_proj_dim"] == 128
    seen.clear()
    monkeypatch.setattr(carlrar.train, "train", lambda cfg, adv, carl, on_evaluate: seen.append(
        carl.carl_representation) or {"dev": {"accuracy": 0.5}})
    search(configs, tmp_path / "representation", trials=2, sampler="grid", names=["carl_representation"])
    assert sorted(seen) == ["cls", "head_input"]  # L_D on R or on what the logits' layer reads (carl-head)
    with pytest.raises(UserError, match="no option rar_weight"):
        search(configs, tmp_path / "other", trials=1, names=["rar_weight"])


def test_search_with_the_robust_objective_maximises_accuracy_under_attack(tmp_path, monkeypatch):
    """--objective robust: the trial's value is the attacked selection accuracy (clean is kept beside it), nothing
    is pruned on clean accuracy, and a study cannot switch objective between sittings."""
    import carlrar.search
    import carlrar.train
    from carlrar.config import TrainConfig
    from carlrar.errors import UserError
    from carlrar.methods import AdversarialConfig
    from carlrar.search import search

    clean = {2: 0.9, 3: 0.5, 4: 0.7}  # clean prefers n = 2 (and would prune n = 3); under attack n = 3 wins
    robust = {2: 0.2, 3: 0.6, 4: 0.4}

    def fake_train(cfg, adv, on_evaluate):
        on_evaluate(2, clean[adv.adv_steps])
        return {"dev": {"accuracy": 0.0}, "validation": {"accuracy": clean[adv.adv_steps]}}

    asked = []
    monkeypatch.setattr(carlrar.train, "train", fake_train)
    trial_n = lambda cfg: int(cfg.output_dir.rsplit("-", 1)[1]) + 2  # noqa: E731  trial k searches n = k + 2
    monkeypatch.setattr(carlrar.search, "robust_accuracy", lambda cfg, eps: asked.append(eps) or robust[trial_n(cfg)])
    monkeypatch.setattr(carlrar.search, "suggest", lambda trial, names: {"adv_steps": trial.number + 2})
    configs = (TrainConfig(method="freelb", validation_size=8), AdversarialConfig())
    study = search(configs, tmp_path / "study", trials=3, names=["adv_steps"], objective="robust",
                   objective_eps=0.075)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 and asked == [0.075] * 3
    assert study.best_trial.number == 1  # n = 3
    trials = json.loads((tmp_path / "study" / "trials.json").read_text())
    assert [(t["value"], t["clean_accuracy"]) for t in trials] == [(0.2, 0.9), (0.6, 0.5), (0.4, 0.7)]
    with pytest.raises(UserError, match="maximises robust@0.075, not clean"):
        search(configs, tmp_path / "study", trials=4, names=["adv_steps"])


def test_robust_accuracy_is_the_attack_of_the_chosen_model_on_validation(tiny_model_dir, toy_files, tmp_path):
    from carlrar.attack import attack_split
    from carlrar.config import TrainConfig
    from carlrar.data import EncodedSplit
    from carlrar.models import load_tokenizer, load_trained
    from carlrar.search import robust_accuracy
    from carlrar.train import load_splits, train

    cfg = TrainConfig(model=str(tiny_model_dir), train_file=str(toy_files["train"]), dev_file=str(toy_files["dev"]),
                      text_column="sentence", method="freelb", max_steps=4, eval_steps=2, batch_size=8, lr=1e-3,
                      validation_size=16, output_dir=str(tmp_path / "run"))
    train(cfg)
    _, _, validation = load_splits(cfg)
    model, tok = load_trained(tmp_path / "run"), load_tokenizer(str(tmp_path / "run"))
    expected = attack_split(model, EncodedSplit(validation, tok, cfg.max_length), tok.pad_token_id, [0.5])
    assert robust_accuracy(cfg, 0.5) == expected["attacks"][0]["accuracy"]
    assert expected["attacks"][0]["accuracy"] < expected["clean_accuracy"]  # the attack bites: not a clean copy


def test_search_enqueues_the_configurations_own_knobs_once(tmp_path, monkeypatch):
    """--enqueue-defaults: the first trial runs the configuration's values (here α 0.1, γ 0.6, ε 0), once per study
    (a second sitting does not repeat it), and counts as one of --trials; a value outside the space is refused."""
    import carlrar.train
    from carlrar.config import TrainConfig
    from carlrar.errors import UserError
    from carlrar.methods import AdversarialConfig, ContrastiveConfig
    from carlrar.search import search

    seen = []

    def fake_train(cfg, adv, on_evaluate):
        seen.append((adv.adv_lr, adv.adv_init_mag, adv.adv_max_norm))
        return {"dev": {"accuracy": 0.5}}

    monkeypatch.setattr(carlrar.train, "train", fake_train)
    configs = (TrainConfig(method="freelb"), AdversarialConfig(adv_lr=0.1, adv_init_mag=0.6, adv_max_norm=0.0))
    names = ["adv_lr", "adv_init_mag", "adv_max_norm"]
    search(configs, tmp_path / "study", trials=2, names=names, enqueue_defaults=True)
    assert len(seen) == 2 and seen[0] == (0.1, 0.6, 0.0) and seen[1] != seen[0]
    search(configs, tmp_path / "study", trials=3, names=names, enqueue_defaults=True)
    assert len(seen) == 3 and seen.count((0.1, 0.6, 0.0)) == 1
    carl = (TrainConfig(method="carl"), AdversarialConfig(), ContrastiveConfig())
    with pytest.raises(UserError, match="--enqueue-defaults: carl_weight_ratio = 0.0 outside the search space"):
        search(carl, tmp_path / "carl", trials=1, names=["carl_weight_ratio"], enqueue_defaults=True)


def test_a_later_sitting_does_not_replay_the_first_sittings_draws(tmp_path, monkeypatch):
    """TPE's start-up trials are draws from its seeded generator: a resumed study (a new process) must draw new
    knobs, not the first sitting's again (which retrains an identical model)."""
    import carlrar.train
    from carlrar.config import TrainConfig
    from carlrar.methods import AdversarialConfig
    from carlrar.search import search

    seen = []

    def fake_train(cfg, adv, on_evaluate):
        seen.append(adv.adv_lr)
        return {"dev": {"accuracy": 0.5}}

    monkeypatch.setattr(carlrar.train, "train", fake_train)
    configs = (TrainConfig(method="freelb"), AdversarialConfig())
    search(configs, tmp_path / "study", trials=2, names=["adv_lr"])
    search(configs, tmp_path / "study", trials=4, names=["adv_lr"])
    assert len(seen) == 4 and len(set(seen)) == 4
    search(configs, tmp_path / "again", trials=2, names=["adv_lr"])
    assert seen[4:] == seen[:2]  # still seeded: a new study draws what the first study drew
