"""``--split validation`` (carlrar evaluate / attack / generate): the examples a run set aside from train with
--validation_size and chose its checkpoint on, carved again exactly as training carved them."""

import json

from carlrar.cli import main

from test_bad_input import data_dir, hermetic, user_error  # noqa: F401 (fixtures)


def test_evaluate_on_validation_gives_the_runs_own_validation_accuracy(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    main(["train", "--model", str(tiny_model_dir), "--dataset", "sst2", "--data_dir", str(data_dir), "--output_dir",
          str(run), "--validation_size", "6", "--max_steps", "4", "--eval_steps", "2", "--batch_size", "4",
          "--lr", "1e-3", "--method", "base"])
    recorded = json.loads((run / "final_metrics.json").read_text())["validation"]
    main(["evaluate", "--model", str(run), "--dataset", "sst2", "--data-dir", str(data_dir), "--split", "validation",
          "--output", str(tmp_path / "val.json")])
    measured = json.loads((tmp_path / "val.json").read_text())
    assert measured["n"] == recorded["n"] == 6
    assert (measured["accuracy"], measured["confusion"]) == (recorded["accuracy"], recorded["confusion"])


def test_split_validation_needs_a_run_with_one_on_the_same_dataset(capsys, tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    main(["train", "--model", str(tiny_model_dir), "--dataset", "sst2", "--data_dir", str(data_dir), "--output_dir",
          str(run), "--max_steps", "1", "--batch_size", "4", "--method", "base"])
    capsys.readouterr()  # the run's own progress lines
    common = ["--data-dir", str(data_dir), "--split", "validation", "--output", str(tmp_path / "x.json")]
    msg = user_error(capsys, ["evaluate", "--model", str(run), "--dataset", "sst2", *common])
    assert msg == (f"--split validation: {run} has no carlrar_config.yaml with a validation_size (it was not "
                   "trained by carlrar train --validation_size N)")
    (run / "carlrar_config.yaml").write_text("dataset: sst2\nvalidation_size: 4\n")
    msg = user_error(capsys, ["attack", "--model", str(run), "--dataset", "agnews", *common])
    assert msg == f"--split validation: {run} was trained on 'sst2', not on --dataset 'agnews'"
    msg = user_error(capsys, ["evaluate", "--model", str(run), "--file", str(data_dir / "sst2_glue" / "dev.tsv"), *common])
    assert msg == "--split validation is carved from a named dataset's training split, not from --file"
    assert not (tmp_path / "x.json").exists()
