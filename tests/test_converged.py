"""The converged protocol's machinery: a trunk trained once per seed, branches from its checkpoint, variants."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from carlrar.cli import main
from carlrar.reproduce import Protocol, run_configs


def write_branch_protocol(path, tiny_model_dir, toy_files):
    toy = {"model": str(tiny_model_dir), "train_file": str(toy_files["train"]), "dev_file": str(toy_files["dev"]),
           "text_column": "sentence", "eval_steps": 2, "batch_size": 8, "lr": 1e-3, "carl_negatives": 8,
           "lr_schedule": "constant", "warmup_ratio": 0.0, "validation_size": 16, "diagnostics_steps": 2}
    path.write_text(yaml.safe_dump({
        "methods": ["freelb", "carl", "base", "rar-scratch"], "datasets": ["toy"], "seeds": [0],
        "trunk": {"method": "freelb", "max_steps": 4}, "branch_steps": 2, "branches": ["freelb", "carl"],
        "variants": {"rar-scratch": {"method": "rar", "rar_warmup_steps": 2}},
        "train": {}, "datasets_overrides": {"toy": toy}, "attack": {"eps": [0.1], "steps": 2, "distance_alphas": []}}))
    return path


def test_branch_configs_start_from_the_trunk_with_the_same_steps_in_all(tiny_model_dir, toy_files, tmp_path):
    protocol = Protocol.load(str(write_branch_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)))
    assert protocol.grid()[:2] == [("toy", "trunk", 0), ("toy", "freelb", 0)]
    trunk, *_ = run_configs(protocol, "toy", "trunk", 0, tmp_path / "m", {})
    carl = run_configs(protocol, "toy", "carl", 0, tmp_path / "m", {})
    scratch = run_configs(protocol, "toy", "rar-scratch", 0, tmp_path / "m", {})
    assert (trunk.max_steps, trunk.init_from) == (4, None)
    assert carl[0].max_steps == 6 and carl[0].init_from == str(tmp_path / "m" / "toy-trunk-s0")
    assert carl[2].carl_start_step == 4  # L_D from the branch step
    assert scratch[0].method == "rar" and scratch[0].max_steps == 6 and scratch[0].init_from is None
    assert scratch[2].rar_warmup_steps == 2


def test_trunk_is_trained_once_and_branches_record_their_branch_point(tiny_model_dir, toy_files, tmp_path,
                                                                     monkeypatch):
    import carlrar.train

    protocol = write_branch_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)
    results = tmp_path / "results"
    trained = []
    real = carlrar.train.train
    monkeypatch.setattr(carlrar.train, "train", lambda *c, **kw: trained.append(c[0].method) or real(*c, **kw))
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    assert trained == ["freelb", "freelb", "carl", "base", "rar"]  # the trunk once, then every run
    assert (results / "trunks" / "toy-trunk-s0.json").exists() and not (results / "runs" / "toy-trunk-s0.json").exists()
    assert (results / "models" / "toy-trunk-s0" / "checkpoint").exists()  # kept for the branches
    carl = json.loads((results / "runs" / "toy-carl-s0.json").read_text())
    assert carl["branch"] == {"trunk": "toy-trunk-s0", "step": 4} and carl["final"]["steps"] == 6
    assert [c["step"] for c in carl["trunk_curves"]] == [2, 4] and [c["step"] for c in carl["curves"]] == [6]
    assert carl["final"]["best_step"] == 6 and "validation" in carl["final"]
    assert any("grad_D" in d for d in carl["diagnostics"])
    base = json.loads((results / "runs" / "toy-base-s0.json").read_text())
    assert "branch" not in base and base["final"]["steps"] == 6
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])  # all done: nothing retrained
    assert len(trained) == 5


def test_a_done_trunk_whose_checkpoint_is_gone_is_trained_again_only_for_a_pending_branch(
        tiny_model_dir, toy_files, tmp_path, monkeypatch):
    import shutil

    import carlrar.train

    protocol = write_branch_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)
    results = tmp_path / "results"
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    trained = []
    real = carlrar.train.train
    monkeypatch.setattr(carlrar.train, "train", lambda *c, **kw: trained.append(c[0].method) or real(*c, **kw))
    shutil.rmtree(results / "models")  # a new machine: results/ came with git, models/ did not
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    assert trained == []  # every branch is done: the trunk's checkpoint is not needed
    carl_before = json.loads((results / "runs" / "toy-carl-s0.json").read_text())
    (results / "runs" / "toy-carl-s0.json").unlink()
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    assert trained == ["freelb", "carl"]  # the trunk again, then the pending branch from it
    carl = json.loads((results / "runs" / "toy-carl-s0.json").read_text())
    assert carl["branch"] == carl_before["branch"] and carl["final"]["steps"] == carl_before["final"]["steps"]


def test_a_retrained_trunk_interrupted_mid_way_is_finished_before_any_branch_starts_from_it(
        tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """A new machine retrains a done trunk for a pending branch and is killed after the trunk's step-2 checkpoint (of
    4): the next sitting must finish the trunk (resuming it) and branch at step 4, not branch from step 2."""
    import shutil

    import pytest

    import carlrar.train

    protocol = write_branch_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)
    results = tmp_path / "results"
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    shutil.rmtree(results / "models")
    (results / "runs" / "toy-carl-s0.json").unlink()
    real_save = carlrar.train.save_checkpoint

    def killed_after_step_2(accelerator, out, model, method, state):
        real_save(accelerator, out, model, method, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(carlrar.train, "save_checkpoint", killed_after_step_2)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    state = json.loads((results / "models" / "toy-trunk-s0" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and (results / "trunks" / "toy-trunk-s0.json").exists()  # still "done" from before
    monkeypatch.setattr(carlrar.train, "save_checkpoint", real_save)
    trained = []
    real = carlrar.train.train
    monkeypatch.setattr(carlrar.train, "train", lambda *c, **kw: trained.append(c[0].method) or real(*c, **kw))
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    assert trained == ["freelb", "carl"]  # the trunk finished first
    carl = json.loads((results / "runs" / "toy-carl-s0.json").read_text())
    assert carl["branch"] == {"trunk": "toy-trunk-s0", "step": 4}


def test_the_converged_protocol_on_agnews_and_sst2(tmp_path):
    """AG News: the same 750 + 250 steps as 3 + 1 epochs of 4,000 at the preset's batch 16 and FreeLB knobs, m
    scaled to the bank, k-PGD on a seeded 500 of dev's 2,000; SST-2's runs as they were."""
    from carlrar.reproduce import DevSubset

    protocol = Protocol.load("converged")
    models = tmp_path / "m"
    trunk, adv = run_configs(protocol, "agnews", "trunk", 1, models, {})
    carl, carl_adv, contrastive = run_configs(protocol, "agnews", "carl", 1, models, {})
    for cfg in (trunk, carl):
        assert (cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.train_subset, cfg.validation_size, cfg.seed) == \
            (16, 2e-5, "constant", 4000, 1000, 1)
    assert trunk.max_steps * trunk.batch_size == 3 * trunk.train_subset  # three epochs
    for a in (adv, carl_adv):  # Table 1's AG News FreeLB
        assert (a.adv_init_mag, a.adv_lr, a.adv_max_norm, a.adv_steps) == (0.0, 0.01, 0.0, 3)
    assert (carl.max_steps, carl.init_from) == (1000, str(models / "agnews-trunk-s1"))
    assert (contrastive.carl_start_step, contrastive.carl_negatives) == (750, 1067)
    assert protocol.attack_for("agnews").dev == DevSubset(examples=500, seed=0)

    trunk, adv = run_configs(protocol, "sst2", "trunk", 1, models, {})
    carl, _, contrastive = run_configs(protocol, "sst2", "carl", 1, models, {})
    assert (trunk.batch_size, trunk.lr, trunk.train_subset, trunk.validation_size, trunk.max_steps) == \
        (32, 2e-5, 8000, 872, 750)
    assert (adv.adv_init_mag, adv.adv_lr, adv.adv_steps) == (0.6, 0.1, 2)
    assert (carl.max_steps, contrastive.carl_start_step, contrastive.carl_negatives) == (1000, 750, 1900)
    assert protocol.attack_for("sst2").dev == DevSubset()  # all 872 dev examples
    assert protocol.attack_for("sst2").config == protocol.attack_for("agnews").config == protocol.attack


def test_converged_long_differs_from_converged_only_in_the_trunk_length(tmp_path):
    """The longer-trunk check: 1,250 trunk steps (5 epochs of 8,000 at 32), branches 250 more from the trunk's
    checkpoint with L_D from the branch step, and every other setting of each run as in `converged`."""
    short, long = Protocol.load("converged"), Protocol.load("converged-long")
    assert set(long.methods) <= set(short.methods) and long.seeds == short.seeds
    moved = {"max_steps": 500, "carl_start_step": 500}  # every run's steps and L_D's start move by 500
    after = {method: run_configs(long, "sst2", method, 0, tmp_path, {}) for method in ("trunk", *long.methods)}
    for method, configs in after.items():
        before = run_configs(short, "sst2", method, 0, tmp_path, {})
        assert [type(c) for c in before] == [type(c) for c in configs]
        for a, b in zip(before, configs):
            a, b = dataclasses.asdict(a), dataclasses.asdict(b)
            assert {k: b[k] - a[k] for k in moved if k in a} == {k: v for k, v in moved.items() if k in a}
            assert {k: v for k, v in a.items() if k not in moved} == {k: v for k, v in b.items() if k not in moved}
    trunk, carl = after["trunk"][0], after["carl"]
    assert trunk.max_steps * trunk.batch_size == 5 * trunk.train_subset
    assert (carl[0].max_steps, carl[0].init_from, carl[-1].carl_start_step) == (1500, str(tmp_path / "sst2-trunk-s0"),
                                                                                 1250)


def test_a_protocol_that_extends_another_sets_only_its_own_keys_on_top(tmp_path):
    """extends: the other's sections merged key by key (train, attack, variants, trunk, ...), lists replaced; a file
    extended by relative path is found beside the file that extends it."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"methods": ["freelb", "carl"], "seeds": [0, 1], "train": {"lr": 1e-5, "model": "m"},
                                    "attack": {"eps": [0.1], "steps": 3}, "trunk": {"method": "freelb", "max_steps": 8},
                                    "branch_steps": 2, "variants": {"carl-proj": {"method": "carl"}}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "base.yaml", "methods": ["carl"], "train": {"lr": 3e-5},
                                     "trunk": {"max_steps": 12}, "variants": {"x": {"method": "base"}}}))
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    grandchild = elsewhere / "grandchild.yaml"
    grandchild.write_text("extends: ../child.yaml\nseeds: [4]\n")
    for path, seeds in ((child, [0, 1]), (grandchild, [4])):
        protocol = Protocol.load(str(path))
        assert (protocol.methods, protocol.seeds, protocol.branch_steps) == (["carl"], seeds, 2)
        assert protocol.train == {"lr": 3e-5, "model": "m"}
        assert protocol.trunk == {"method": "freelb", "max_steps": 12}
        assert set(protocol.variants) == {"carl-proj", "x"}
        assert (protocol.attack.eps, protocol.attack.steps, protocol.source) == ([0.1], 3, str(path))


def merged_settings(protocol, dataset, name, tmp_path):
    """Every option of the protocol's runs of ``name`` (seed 0), merged over its stages: what a test compares."""
    configs = run_configs(protocol, dataset, name, 0, tmp_path, {})
    return {k: v for c in configs for k, v in dataclasses.asdict(c).items()}


def test_the_wide_variants_are_freelb_and_carl_tuned_with_sst2s_perturbation(tmp_path):
    """AG News's diagnostic pair: SST-2's FreeLB perturbation (α 0.1, γ 0.6, n 2) on the AG News trunk, for FreeLB and
    carl-tuned alike; every other setting as theirs. On SST-2, whose preset has that perturbation, freelb-wide is
    FreeLB itself."""
    protocol = Protocol.load("converged")
    wide = {"adv_lr": 0.1, "adv_init_mag": 0.6, "adv_steps": 2, "adv_max_norm": 0.0}
    for name, base in (("freelb-wide", "freelb"), ("carl-tuned-wide", "carl-tuned")):
        a, b = merged_settings(protocol, "agnews", base, tmp_path), merged_settings(protocol, "agnews", name, tmp_path)
        assert {k for k in a if a[k] != b[k]} == {"adv_lr", "adv_init_mag", "adv_steps", "output_dir"}
        assert {k: b[k] for k in wide} == wide and b["init_from"] == str(tmp_path / "agnews-trunk-s0")
    same = [dataclasses.replace(c, output_dir="x") if hasattr(c, "output_dir") else c
            for c in run_configs(protocol, "sst2", "freelb-wide", 0, tmp_path, {})]
    assert same == [dataclasses.replace(c, output_dir="x") if hasattr(c, "output_dir") else c
                    for c in run_configs(protocol, "sst2", "freelb", 0, tmp_path, {})]


def test_carl_tau_is_the_papers_carl_at_carl_tuneds_temperature(tmp_path):
    """The τ-vs-projection split: carl-tau differs from CARL only in τ, which is carl-tuned's; it is a branch."""
    protocol = Protocol.load("converged")
    tau, carl, tuned = (merged_settings(protocol, "sst2", n, tmp_path) for n in ("carl-tau", "carl", "carl-tuned"))
    assert {k for k in carl if carl[k] != tau[k]} == {"carl_temperature", "output_dir"}
    assert tau["carl_temperature"] == tuned["carl_temperature"] != carl["carl_temperature"]
    assert tau["init_from"] == str(tmp_path / "sst2-trunk-s0") and "carl-tau" in protocol.branches


def test_the_stronger_freelbs_scale_only_the_protocols_perturbation(tmp_path):
    """freelb-strong / -stronger / -strongest: the SST-2 FreeLB's step α and initial radius γ times 1.5, 2 and 3,
    ε and n as the protocol's; branches of the same trunk, compared with carl-tuned as declared pairs."""
    protocol = Protocol.load("converged")

    settings = lambda name: merged_settings(protocol, "sst2", name, tmp_path)  # noqa: E731
    freelb = settings("freelb")
    for name, scale in (("freelb-strong", 1.5), ("freelb-stronger", 2.0), ("freelb-strongest", 3.0)):
        b = settings(name)
        assert {k for k in freelb if freelb[k] != b[k]} == {"adv_lr", "adv_init_mag", "output_dir"}
        scaled = (scale * freelb["adv_lr"], scale * freelb["adv_init_mag"])
        assert (b["adv_lr"], b["adv_init_mag"]) == pytest.approx(scaled)
        assert b["init_from"] == str(tmp_path / "sst2-trunk-s0") and name in protocol.branches
        assert ["carl-tuned", name] in protocol.pairs


def test_carl_on_the_stronger_freelbs_changes_only_the_perturbation_of_carl_tuned(tmp_path):
    """carl-tuned-strong / -stronger: carl-tuned exactly, with freelb-strong's / -stronger's α and γ; paired with
    the FreeLB at the same perturbation and with the next-stronger one."""
    protocol = Protocol.load("converged")

    settings = lambda name: merged_settings(protocol, "sst2", name, tmp_path)  # noqa: E731
    carl_tuned = settings("carl-tuned")
    for name, freelb, stronger in (("carl-tuned-strong", "freelb-strong", "freelb-stronger"),
                                   ("carl-tuned-stronger", "freelb-stronger", "freelb-strongest")):
        b, f = settings(name), settings(freelb)
        assert {k for k in carl_tuned if carl_tuned[k] != b[k]} == {"adv_lr", "adv_init_mag", "output_dir"}
        assert (b["adv_lr"], b["adv_init_mag"]) == (f["adv_lr"], f["adv_init_mag"])
        assert b["method"] == "carl" and name in protocol.branches
        assert [name, freelb] in protocol.pairs and [name, stronger] in protocol.pairs


def test_declared_pairs_must_name_methods_or_variants(tmp_path):
    from carlrar.errors import UserError

    pairs = Protocol.load("converged").pairs
    assert ["carl-tuned-wide", "freelb-wide"] in pairs and ["rar-warm", "freelb"] in pairs
    for pairs, message in (([["carl", "nope"]], "'nope' is neither a method nor one of the variants"),
                           ([["carl"]], "expected [A, B]")):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"methods": ["carl"], "pairs": pairs}))
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            Protocol.load(str(path))


def test_selection_excluded_names_declared_runs_and_rejects_what_is_not_a_method(tmp_path):
    from carlrar.errors import UserError

    assert Protocol.load("converged").selection_excluded == {"agnews": ["carl", "carl-rar", "rar", "base"]}
    assert Protocol.load("cpu").selection_excluded == {}
    for value, match in (([["carl"]], "expected a mapping of dataset"), ({"agnews": "carl"}, "expected a mapping"),
                         ({"agnews": ["carl-typo"]}, "'carl-typo' is neither a method nor one of the variants")):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"methods": ["carl"], "selection_excluded": value}))
        with pytest.raises(UserError, match=match):
            Protocol.load(str(path))


def test_selection_seeds_are_the_seeds_the_family_rule_was_declared_on(tmp_path):
    from carlrar.errors import UserError

    assert Protocol.load("converged").selection_seeds == [0, 1, 2]
    assert Protocol.load("cpu").selection_seeds == []  # not declared: every seed counts
    for seeds in (["0"], [True], [0.5]):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"methods": ["carl"], "selection_seeds": seeds}))
        with pytest.raises(UserError, match="selection_seeds: expected a list of integer seeds"):
            Protocol.load(str(path))


def test_the_harder_wide_freelb_changes_only_freelb_wides_perturbation(tmp_path):
    """freelb-wide-strong (AG News): freelb-wide with α and γ ×1.5, nothing else; a branch of the same trunk, paired
    with carl-tuned-wide and freelb-wide."""
    protocol = Protocol.load("converged")

    wide, b = (merged_settings(protocol, "agnews", n, tmp_path) for n in ("freelb-wide", "freelb-wide-strong"))
    assert {k for k in wide if wide[k] != b[k]} == {"adv_lr", "adv_init_mag", "output_dir"}
    assert (b["adv_lr"], b["adv_init_mag"]) == pytest.approx((1.5 * wide["adv_lr"], 1.5 * wide["adv_init_mag"]))
    assert b["init_from"] == str(tmp_path / "agnews-trunk-s0") and "freelb-wide-strong" in protocol.branches
    assert ["carl-tuned-wide", "freelb-wide-strong"] in protocol.pairs
    assert ["freelb-wide-strong", "freelb-wide"] in protocol.pairs


def test_carl_on_the_harder_wide_perturbation_changes_only_carl_tuned_wides_perturbation(tmp_path):
    """carl-tuned-wide-strong (AG News): carl-tuned-wide with freelb-wide-strong's α and γ, nothing else; CARL's knobs
    as carl-tuned-wide's, its perturbation as freelb-wide-strong's; paired with both."""
    protocol = Protocol.load("converged")
    carl, freelb, b = (merged_settings(protocol, "agnews", n, tmp_path)
                       for n in ("carl-tuned-wide", "freelb-wide-strong", "carl-tuned-wide-strong"))
    assert {k for k in carl if carl[k] != b[k]} == {"adv_lr", "adv_init_mag", "output_dir"}
    perturbation = ("adv_lr", "adv_init_mag", "adv_steps", "adv_max_norm")
    assert {k: b[k] for k in perturbation} == {k: freelb[k] for k in perturbation}
    assert b["init_from"] == str(tmp_path / "agnews-trunk-s0") and "carl-tuned-wide-strong" in protocol.branches
    assert ["carl-tuned-wide-strong", "freelb-wide-strong"] in protocol.pairs
    assert ["carl-tuned-wide-strong", "carl-tuned-wide"] in protocol.pairs


def test_freelb_n3_is_the_protocols_freelb_with_three_ascent_steps(tmp_path):
    """freelb-n3 (SST-2): the n FreeLB's search left out; a branch of the same trunk, nothing else changed."""
    protocol = Protocol.load("converged")
    freelb, b = (merged_settings(protocol, "sst2", n, tmp_path) for n in ("freelb", "freelb-n3"))
    assert {k for k in freelb if freelb[k] != b[k]} == {"adv_steps", "output_dir"}
    assert (freelb["adv_steps"], b["adv_steps"]) == (2, 3)
    assert b["init_from"] == str(tmp_path / "sst2-trunk-s0") and "freelb-n3" in protocol.branches


def test_plateau_replay_by_hand_on_a_trunk_and_branch_curve(tmp_path, capsys):
    """scripts/plateau-replay.py runs the real rule: curve 80, 85, 84, 84, 90 → patience 1 fires at the first stall
    (375), 2 at the second (500), 3 never (90 at 625 is a new best, then the run ends at 1,000)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plateau_replay", Path(__file__).parents[1] / "scripts/plateau-replay.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    curve = [(125, 0.80), (250, 0.85), (375, 0.84), (500, 0.84), (625, 0.90)]
    assert [replay.replay(curve, k, 1000) for k in (1, 2, 3)] == [375, 500, None]
    assert replay.replay([(125, 0.8), (250, 0.8)], 1, 250) is None  # a stall at the last step leaves L_D no steps
    (tmp_path / "trunks").mkdir(), (tmp_path / "runs").mkdir()
    run = lambda points: {"seed": 0, "dataset": "toy", "curves": [{"step": s, "val_accuracy": a} for s, a in points]}  # noqa: E731
    (tmp_path / "trunks/toy-trunk-s0.json").write_text(json.dumps(run(curve[:3])))
    (tmp_path / "runs/toy-freelb-s0.json").write_text(json.dumps(run(curve[3:])))
    assert replay.main([str(tmp_path), "--patience", "1", "2", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| toy | 0 | 80.00 85.00 84.00 84.00 90.00 | 375 | 500 | never |"
    assert replay.main([str(tmp_path), str(tmp_path / "nope")]) == 1  # every folder checked before anything prints
    captured = capsys.readouterr()
    assert captured.out == "" and "nope: no trunks/ folder" in captured.err
