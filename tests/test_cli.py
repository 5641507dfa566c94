"""The command line's own contract: one flag style in every command, ``AttackConfig`` as the attack's knobs, and the
files that generate / augment / compare read and write."""

import csv
import json

import pytest
import yaml

from carlrar.attack import AttackConfig
from carlrar.cli import ArgumentParser, main
from carlrar.data import load_files
from carlrar.errors import UserError
from carlrar.generate import augment, write_samples
from carlrar.report import attack_setting
from carlrar.reproduce import Protocol


def test_underscore_spelling_of_a_dashed_flag_is_an_alias():
    p = ArgumentParser(prog="carlrar test")
    p.add_argument("--step-size", type=float)
    p.add_argument("--distance-alphas")
    p.add_argument("rest", nargs="*")
    args = p.parse_args(["--step_size", "0.5", "--distance_alphas=0.1", "--", "--not_a_flag"])
    assert (args.step_size, args.distance_alphas, args.rest) == (0.5, "0.1", ["--not_a_flag"])
    assert "--step-size" in p.format_help() and "--step_size" not in p.format_help()  # --help: dashed only
    with pytest.raises(UserError, match="unrecognized arguments: --no_such_flag"):
        p.parse_args(["--no_such_flag", "1"])


def test_attack_takes_underscore_flags_and_writes_its_results(tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "attack.json"
    main(["attack", "--model", str(tiny_model_dir), "--file", str(toy_files["dev"]), "--text_column", "sentence",
          "--eps", "0.1", "--steps", "1", "--step_size", "0.05", "--distance_alphas", "", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["data"] == "dev" and result["n"] == 8 and result["distances"] == []
    assert [(a["eps"], a["step_size"]) for a in result["attacks"]] == [(0.1, 0.05)]


@pytest.mark.parametrize("eps", [[float("nan")], [-0.1], [0.1, float("inf")]])
def test_attack_config_rejects_bad_radii(eps):
    with pytest.raises(UserError, match=r"^eps = .*: must be a finite number ≥ 0$"):
        AttackConfig(eps=eps)


def test_attack_config_defaults_and_the_recorded_protocol():
    config = AttackConfig()
    assert (config.eps, config.steps, config.step_size, config.norm, config.distance_alphas) == \
        ([0.02, 0.075, 0.1], 10, None, "l2", [0.1, 0.075])
    with pytest.raises(UserError, match="norm = 'l1': choose one of l2, linf"):
        AttackConfig(norm="l1")
    assert Protocol.load("cpu").attack == config  # the recorded protocol's attack: section is the default


def test_write_samples_and_augment_round_trip(tmp_path):
    records = [{"text": "a wonderful film", "original_decoded": "a wonderful film", "generated": "a\twonderful\nmovie",
                "label": "positive", "edit_rate": 0.33, "changed": True},
               {"text": "awful", "original_decoded": "awful", "generated": "awful", "label": "negative",
                "edit_rate": 0.0, "changed": False},
               {"text": "i hated it", "original_decoded": "i hated it", "generated": "i loved it",
                "label": "negative", "edit_rate": 0.9, "changed": True}]
    samples = tmp_path / "samples.jsonl"
    summary = write_samples(records, samples, {"eps": 0.1, "n": 3})
    assert summary == tmp_path / "samples_summary.json" and json.loads(summary.read_text()) == {"eps": 0.1, "n": 3}
    assert [json.loads(line) for line in samples.read_text().splitlines()] == records
    rows, generated = augment(samples, tmp_path / "aug.tsv", with_originals=True, max_edit_rate=0.5)
    assert (rows, generated) == (4, 1)  # the unchanged and the too-edited samples are left out, originals all kept
    ds = load_files(str(tmp_path / "aug.tsv"), dev_file=str(tmp_path / "aug.tsv"))
    assert ds.splits["dev"].texts == ["a wonderful movie", "a wonderful film", "awful", "i hated it"]
    assert [ds.label_names[y] for y in ds.splits["dev"].labels] == ["positive", "positive", "negative", "negative"]
    write_samples(records, tmp_path / "samples.csv", {})
    with open(tmp_path / "samples.csv", newline="", encoding="utf-8") as fh:
        assert [r["generated"] for r in csv.DictReader(fh)] == [r["generated"] for r in records]


def test_compare_reads_finished_runs(tmp_path, capsys):
    for name, acc in (("base", 0.8), ("freelb", 0.85)):
        run = tmp_path / name
        run.mkdir()
        (run / "final_metrics.json").write_text(json.dumps({"method": name, "dev": {"accuracy": acc},
                                                            "examples_per_s": 100.0}))
        (run / "attack_sst2_dev.json").write_text(json.dumps({"attacks": [
            {"eps": 0.1, "accuracy": acc - 0.3, "mean_cos": 0.9}]}))
    main(["compare", str(tmp_path / "base"), str(tmp_path / "freelb")])
    out = capsys.readouterr().out
    assert "ε=0.1" in out and "0.5000 (0.900)" in out and "0.5500 (0.900)" in out
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path)])
    assert e.value.code == 2 and "no final_metrics.json" in capsys.readouterr().err


def test_reproduce_records_the_attack_config(tmp_path):
    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({"attack": {"eps": [0.05], "step-size": 0.01, "norm": "linf"}}))
    attack = Protocol.load(str(protocol)).attack
    assert attack == AttackConfig(eps=[0.05], step_size=0.01, norm="linf")  # the rest keep their defaults
    result = {"norm": "linf", "init_mag": 0.0, "attacks": [{"eps": 0.05, "step_size": 0.01}]}
    assert attack_setting(result) == "L∞, step 0.01, zero init"  # report's Table 5 title says how it attacked
    result = {"norm": "l2", "init_mag": 0.5, "attacks": [{"eps": 0.1, "step_size": 0.025}]}
    assert attack_setting(result) == "L2, step ε/4, random init 0.5"
