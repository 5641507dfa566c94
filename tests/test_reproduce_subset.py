"""A protocol's k-PGD on a seeded subset of dev (``examples`` / ``seed`` in its ``attack:`` section, per dataset in
``attack_overrides``): the same examples for every run and seed, recorded in each run, named by the report."""

import json
from pathlib import Path

import pytest
import yaml

import carlrar.reproduce
from carlrar.cli import main
from carlrar.data import load_files, subset
from carlrar.errors import UserError
from carlrar.report import load_runs, tables
from carlrar.reproduce import DevSubset, Protocol


def write_protocol(path, tiny_model_dir, toy_files, attack=None, attack_overrides=None):
    """Two datasets on the same toy files: ``toy`` (attacked on its override's subset) and ``full``."""
    toy = {"model": str(tiny_model_dir), "train_file": str(toy_files["train"]), "dev_file": str(toy_files["dev"]),
           "text_column": "sentence", "max_steps": 2, "eval_steps": 2, "batch_size": 8, "lr": 1e-3}
    path.write_text(yaml.safe_dump({
        "methods": ["freelb", "base"], "datasets": ["toy", "full"], "seeds": [0, 1],
        "datasets_overrides": {"toy": toy, "full": toy},
        "attack": {"eps": [0.1], "steps": 1, "distance_alphas": [], **(attack or {})},
        "attack_overrides": {"toy": {"examples": 4, "seed": 3}} if attack_overrides is None else attack_overrides}))
    return path


def test_every_run_of_a_dataset_is_attacked_on_the_same_seeded_subset(tiny_model_dir, toy_files, tmp_path,
                                                                       monkeypatch):
    protocol = write_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files)
    results = tmp_path / "results"
    attacked = {}  # run → the texts it was attacked on, in order
    real = carlrar.reproduce.model_and_dev

    def spy(cfg, examples=None, seed=0):
        model, tokenizer, encoded, n_dev = real(cfg, examples, seed)
        attacked[Path(cfg.output_dir).name] = list(encoded.texts)
        return model, tokenizer, encoded, n_dev

    monkeypatch.setattr(carlrar.reproduce, "model_and_dev", spy)
    main(["reproduce", "--protocol", str(protocol), "--results", str(results), "--datasets", "toy"])
    main(["reproduce", "--protocol", str(protocol), "--results", str(results), "--datasets", "full", "--seeds", "1",
          "--methods", "base"])  # no override: all of dev

    dev = load_files(str(toy_files["train"]), dev_file=str(toy_files["dev"]), text_column="sentence").splits["dev"]
    chosen = subset(dev, 4, 3).texts  # the subset's own seed, not the run's
    assert len(attacked) == 5 and chosen != dev.texts[:4]
    for run in ("freelb-s0", "freelb-s1", "base-s0", "base-s1"):  # every method and seed: the same, in order
        assert attacked[f"toy-{run}"] == chosen
        toy = json.loads((results / "runs" / f"toy-{run}.json").read_text())
        assert toy["attack"]["dev_subset"] == {"examples": 4, "of": 8, "seed": 3}
        assert toy["attack"]["n"] == 4 and len(toy["per_example"]["attacks"][0]["correct"]) == 4
        assert toy["final"]["dev"]["n"] == 8  # clean dev accuracy: all of dev
    assert attacked["full-base-s0"] == dev.texts
    full = json.loads((results / "runs" / "full-base-s0.json").read_text())
    assert full["attack"]["dev_subset"] == {"examples": 8, "of": 8, "seed": None}

    index, runs = load_runs(results)
    assert index["protocol"]["attack_overrides"] == {"toy": {"examples": 4, "seed": 3}}
    report = tables(index, runs)
    note = "**Attacks (toy): k-PGD on a seeded 4-example subset of dev (seed 3), of its 8, the same examples for " \
           "every run.**"
    full_part, toy_part = report.split("## Table 4 (full)")[1].split(note)  # datasets in order: full, then toy
    assert "subset" not in full_part and "## Table 4 (toy)" in toy_part and "| Fine-tune − FreeLB |" in toy_part
    # a run attacked on other examples cannot be paired: the report refuses in one line
    odd = results / "runs" / "toy-base-s1.json"
    record = json.loads(odd.read_text())
    record["attack"]["dev_subset"]["seed"] = 4
    odd.write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"^toy: runs attacked on different dev examples \(.*toy-base-s1: a seeded "
                                        r"4-example subset of dev \(seed 4\), of its 8\)"):
        tables(*load_runs(results))


def test_attack_keys_are_checked_in_one_line_before_any_run(tiny_model_dir, toy_files, tmp_path, capsys):
    cases = [({"exampels": 4}, None, "p.yaml: attack: unknown key(s) exampels"),
             ({"examples": 0}, None, "p.yaml: attack: examples = 0: must be"),
             (None, {"toy": {"examples": 4, "sed": 1}}, "p.yaml: attack_overrides: toy: unknown key(s) sed"),
             (None, {"toy": {"seed": -1}}, "p.yaml: attack_overrides: toy: seed = -1: must be"),
             (None, {"toy": [4]}, "p.yaml: attack_overrides: toy: expected a mapping of attack keys"),
             (None, [4], "p.yaml: attack_overrides: expected a mapping")]
    for attack, overrides, message in cases:
        protocol = write_protocol(tmp_path / "p.yaml", tiny_model_dir, toy_files, attack, overrides)
        with pytest.raises(SystemExit) as e:
            main(["reproduce", "--protocol", str(protocol), "--results", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()


def test_without_examples_every_dataset_is_attacked_on_all_of_dev(tmp_path):
    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({"attack": {"eps": [0.1], "steps": 2}}))
    loaded = Protocol.load(str(protocol))
    assert loaded.dev_subset == DevSubset(examples=None, seed=0) and loaded.attack_overrides == {}
    assert loaded.attack_for("sst2") == (loaded.attack, DevSubset())
    cpu = Protocol.load("cpu")  # the recorded protocols without a subset: as before
    assert cpu.attack_for("agnews").dev == DevSubset() and cpu.attack_for("agnews").config == cpu.attack
