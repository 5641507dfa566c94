"""Bad user input: one ``error: ...`` line on stderr naming what and where, exit status 2, no traceback, and
nothing written to the output directory. Every case fails while reading data or configuration, before training."""

import os
from pathlib import Path

import pytest

from carlrar.cli import main

from conftest import NEGATIVE, POSITIVE, write_tsv

TRAIN_ROWS = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
DEV_ROWS = [(t, 1) for t in POSITIVE[:2]] + [(t, 0) for t in NEGATIVE[:2]]


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Run in tmp_path (a default runs/ directory would land there) with no data folder from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARLRAR_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def files(tmp_path) -> dict:
    """Good generic train/dev TSVs with the default columns text, label."""
    header = ("text", "label")
    return {"train": write_tsv(tmp_path / "train.tsv", TRAIN_ROWS, header),
            "dev": write_tsv(tmp_path / "dev.tsv", DEV_ROWS, header)}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A folder in the layout of shared/data holding sst2_glue/train.tsv and dev.tsv (no test.tsv)."""
    root = tmp_path / "data"
    (root / "sst2_glue").mkdir(parents=True)
    write_tsv(root / "sst2_glue" / "train.tsv", TRAIN_ROWS)
    write_tsv(root / "sst2_glue" / "dev.tsv", DEV_ROWS)
    return root


def train_argv(model, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--output_dir", str(out), *map(str, extra)]


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI, check the bad-input contract, and return the single error message (after ``error: ``)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


# 8 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text, expected", [
    ("lr: abc\n", "{cfg}: lr: cannot read 'abc' as float"),
    ("epochs: 1\nlearning_rate: 1.0e-5\n", "{cfg}: unknown option 'learning_rate'"),
    ("lr: 1.0e-5\n  batch_size: [3\n", "{cfg}:2: not valid YAML ("),
    ("- lr\n- 1.0e-5\n", "{cfg}: expected a mapping of option: value"),
    ("lr: true\n", "{cfg}: lr: cannot read True as float"),
    ("output_dir: [a]\n", "{cfg}: output_dir: cannot read ['a'] as text"),
    ("output_dir: 5\n", "{cfg}: output_dir: cannot read 5 as text"),
    ("batch_size: {a: 1}\n", "{cfg}: batch_size: cannot read {{'a': 1}} as int"),
], ids=["unparseable-value", "unknown-key", "invalid-yaml", "not-a-mapping", "bool-as-number", "list-as-path",
        "number-as-path", "mapping-as-number"])


def test_bad_config_file(capsys, tiny_model_dir, files, out, tmp_path, yaml_text, expected):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text, encoding="utf-8")
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"], "--config", cfg))
    assert msg.startswith(expected.format(cfg=cfg)), msg
    assert not out.exists()


@pytest.mark.parametrize("flags, expected", [
    (("--lr", "abc"), "argument --lr: invalid float value: 'abc'"),
    (("--learning_rate", "1e-5"), "unrecognized arguments: --learning_rate 1e-5"),
], ids=["unparseable-value", "unknown-flag"])


def test_bad_command_line_option(capsys, tiny_model_dir, files, out, flags, expected):
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"], *flags))
    assert msg.startswith(expected), msg
    assert not out.exists()


# 9 ---------------------------------------------------------------------------------------------------------------
def test_unknown_dataset(capsys, tiny_model_dir, data_dir, out):
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--dataset", "imdb", "--data_dir", data_dir))
    assert msg.startswith("unknown dataset 'imdb' (known: sst2, ")
    assert "agnews" in msg and "--train-file" in msg
    assert not out.exists()


# 10 --------------------------------------------------------------------------------------------------------------
def test_unknown_method(capsys, tiny_model_dir, files, out):
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"], "--method", "freelbb"))
    assert msg.startswith("unknown method 'freelbb' (known: base, freelb, ")
    assert not out.exists()


# 11 --------------------------------------------------------------------------------------------------------------
def test_evaluate_split_without_a_file(capsys, tiny_model_dir, data_dir, tmp_path):
    metrics = tmp_path / "out" / "metrics.json"
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    msg = user_error(capsys, ["evaluate", "--model", str(tiny_model_dir), "--dataset", "sst2",
                              "--data-dir", str(data_dir), "--split", "test", "--output", str(metrics)])
    assert msg.startswith("dataset 'sst2' has no labelled 'test' split")
    assert f"test.tsv in {data_dir / 'sst2_glue'}" in msg
    assert msg.endswith("available: train, dev")
    assert not metrics.parent.exists()
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before  # no eval_*.json next to the model


# 12 --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["env-unset", "empty-data-dir"])
def test_named_dataset_offline_without_local_copy(capsys, monkeypatch, tiny_model_dir, tmp_path, out, where):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CARLRAR_DATA_DIR", raising=False)
    extra = ()
    if where == "empty-data-dir":
        (tmp_path / "empty").mkdir()
        extra = ("--data_dir", tmp_path / "empty")
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--dataset", "agnews", *extra))
    assert msg.startswith("no local copy of 'agnews'")
    assert "CARLRAR_DATA_DIR" in msg and "ag_news/" in msg
    if where == "env-unset":
        assert "CARLRAR_DATA_DIR is not set" in msg
    else:
        assert f"{tmp_path / 'empty' / 'ag_news'} does not exist" in msg
    assert not out.exists()


# 14 --------------------------------------------------------------------------------------------------------------
def test_predict_missing_model_directory(capsys, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a wonderful film\nawful\n", encoding="utf-8")
    model, output = tmp_path / "no_such_model", tmp_path / "out" / "predictions.jsonl"
    msg = user_error(capsys, ["predict", "--model", str(model), "--file", str(texts), "--output", str(output)])
    assert msg == f"{model}: no such model directory"
    assert not output.parent.exists()


# 15 --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (("--eps", "0.1,nan"), "eps = nan: must be a finite number ≥ 0"),
    (("--eps", "-0.1"), "eps = -0.1: must be a finite number ≥ 0"),
    (("--step-size", "0"), "step_size = 0.0: must be a finite number > 0"),
    (("--steps", "-1"), "steps = -1: must be a whole number ≥ 0"),
    (("--distance_alphas", "inf"), "distance_alphas = inf: must be a finite number ≥ 0"),
], ids=["nan-eps", "negative-eps", "zero-step-size", "negative-steps", "infinite-alpha"])


def test_bad_attack_knobs(capsys, tiny_model_dir, files, flags, expected):
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    msg = user_error(capsys, ["attack", "--model", str(tiny_model_dir), "--file", str(files["dev"]), *flags])
    assert msg == expected
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before  # no attack_*.json next to the model


def test_bad_attack_section_of_a_protocol(capsys, tmp_path):
    protocol = tmp_path / "p.yaml"
    protocol.write_text("attack:\n  eps: [0.1, -1]\n", encoding="utf-8")
    msg = user_error(capsys, ["reproduce", "--protocol", str(protocol), "--results", str(tmp_path / "r")])
    assert msg == f"{protocol}: attack: eps = -1: must be a finite number ≥ 0"
    protocol.write_text("attack:\n  epsilon: [0.1]\n", encoding="utf-8")
    msg = user_error(capsys, ["reproduce", "--protocol", str(protocol), "--results", str(tmp_path / "r")])
    assert msg == f"{protocol}: attack: unknown key(s) epsilon"
    assert not (tmp_path / "r").exists()



def test_bad_extends_of_a_protocol(capsys, tmp_path):
    """extends: names another protocol; a missing one, a cycle and a non-name each fail in one line, before any run."""
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    cases = [("extends: nowhere\n", f"{one}: extends: unknown protocol 'nowhere': not a file and not one of "),
             ("extends: [cpu]\n", f"{one}: extends: expected a protocol name or file, got ['cpu']"),
             ("extends: two.yaml\n", f"{two}: extends: 'one.yaml' extends it back (a cycle)")]
    two.write_text("extends: one.yaml\n", encoding="utf-8")
    for content, expected in cases:
        one.write_text(content, encoding="utf-8")
        msg = user_error(capsys, ["reproduce", "--protocol", str(one), "--results", str(tmp_path / "r")])
        assert msg.startswith(expected), msg
    assert not (tmp_path / "r").exists()

# 16 --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (None, "{path}: file not found"),
    ("text\tlabel\nawful\t0\n", "{path}: not a JSONL file written by carlrar generate"),
    ('{"text": "awful", "label": "0"}\n', "{path}: no samples with 'generated' and 'label' fields"),
], ids=["missing", "not-jsonl", "not-samples"])


def test_augment_bad_samples(capsys, tmp_path, content, expected):
    path = tmp_path / "samples.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    msg = user_error(capsys, ["augment", "--samples", str(path), "--output", str(tmp_path / "aug.tsv")])
    assert msg == expected.format(path=path)
    assert not (tmp_path / "aug.tsv").exists()


# 17 (issue 15) ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (("--lr", "nan"), "lr = nan: must be a finite number > 0"),
    (("--epochs", "inf"), "epochs = inf: must be a finite number ≥ 0"),
    (("--seed", "-1"), "seed = -1: must be a whole number in [0, 4294967295]"),
    (("--train_subset", "-5"), "train_subset = -5: must be a whole number ≥ 1"),
    (("--warmup_ratio", "nan"), "warmup_ratio = nan: must be a finite number in [0, 1]"),
    (("--adv_lr", "-0.1", "--method", "freelb"), "adv_lr = -0.1: must be a finite number ≥ 0"),
    (("--threads", "100000"), "threads = 100000: must be a whole number in [0, 1024]"),  # was a segfault
    (("--carl_proj_dim", "10000000", "--method", "carl"), "carl_proj_dim = 10000000: must be a whole number in "
     "[0, 65536]"),
], ids=["nan-lr", "inf-epochs", "negative-seed", "negative-subset", "nan-warmup", "negative-adv-lr", "huge-threads",
        "huge-proj-dim"])


def test_out_of_range_training_options(capsys, tiny_model_dir, files, out, flags, expected):
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"], *flags))
    assert msg == expected
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_max_length_beyond_the_models_positions(capsys, tiny_model_dir, files, out, tmp_path, command):
    """The tiny model has 128 positions."""
    if command == "train":
        argv = train_argv(tiny_model_dir, out, "--train_file", files["train"], "--max_length", "512")
    else:
        argv = [command, "--model", str(tiny_model_dir), "--file", str(files["dev"]), "--max-length", "512",
                "--output", str(out / "result.json")]
    msg = user_error(capsys, argv)
    assert msg == "max_length = 512: this model takes at most 128 tokens"
    assert not out.exists()


@pytest.mark.parametrize("command, flags, expected", [
    ("evaluate", ("--batch-size", "0"), "batch_size = 0: must be a whole number ≥ 1"),
    ("attack", ("--limit", "-1"), "limit = -1: must be a whole number ≥ 1"),
    ("attack", ("--eps", "nan"), "eps = nan: must be a finite number ≥ 0"),
    ("predict", ("--max-length", "0"), "max_length = 0: must be a whole number ≥ 2"),
], ids=["zero-batch", "negative-limit", "nan-eps", "zero-max-length"])


def test_bad_numbers_fail_before_the_model_loads(capsys, monkeypatch, tmp_path, files, command, flags, expected):
    monkeypatch.setattr("carlrar.models.load_trained", lambda *a: pytest.fail("the model was loaded"))
    model = tmp_path / "model"
    model.mkdir()
    assert user_error(capsys, [command, "--model", str(model), "--file", str(files["dev"]), *flags]) == expected
    assert list(model.iterdir()) == []


@pytest.mark.parametrize("command, flags, make, expected", [
    ("evaluate", ("--output",), "dir", "{p}: is a directory, expected a file"),
    ("augment", ("--samples",), "dir", "{p}: is a directory, expected a file"),
    ("train", ("--config",), "dir", "{p}: is a directory, expected a file"),
    ("train", ("--output_dir",), "file", "{p}: is a file, expected a directory"),
    ("compare", (), "file", "{p}: is a file, expected a directory"),
], ids=["evaluate-output-dir", "augment-samples-dir", "train-config-dir", "train-output-dir-file", "compare-file"])


def test_a_path_of_the_wrong_kind(capsys, tiny_model_dir, files, tmp_path, command, flags, make, expected):
    p = tmp_path / "thing"
    p.mkdir() if make == "dir" else p.write_text("x")
    base = {"evaluate": ["--model", str(tiny_model_dir), "--file", str(files["dev"])],
            "augment": ["--output", str(tmp_path / "aug.tsv")], "compare": [],
            "train": ["--model", str(tiny_model_dir), "--train_file", str(files["train"])]}[command]
    assert user_error(capsys, [command, *base, *flags, str(p)]) == expected.format(p=p)


def test_output_in_a_missing_folder_is_made(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"text": "a", "generated": "b", "label": "1", "edit_rate": 0.5, "changed": true}\n')
    main(["augment", "--samples", str(samples), "--output", str(tmp_path / "new" / "deeper" / "aug.tsv")])
    assert (tmp_path / "new" / "deeper" / "aug.tsv").read_text() == "text\tlabel\nb\t1\n"


def test_a_model_without_a_trained_head_is_named(capsys, tiny_model_dir, files, tmp_path):
    """The tiny model is a bare encoder: evaluating it scores a random head, which the user is told."""
    main(["evaluate", "--model", str(tiny_model_dir), "--file", str(files["dev"]),
          "--output", str(tmp_path / "e.json")])
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "classifier.weight" in warnings[0] and "random" in warnings[0]


# 19 (issue 15) ---------------------------------------------------------------------------------------------------
def test_corrupt_model_weights(capsys, tiny_model_dir, files, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])  # truncated
    msg = user_error(capsys, ["evaluate", "--model", str(model), "--file", str(files["dev"])])
    assert msg.startswith(f"cannot load model from {model}: ")
    assert not list(model.glob("eval_*"))


def test_compare_a_truncated_final_metrics(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_metrics.json").write_text('{"method": "base", "dev": {"accur')
    assert user_error(capsys, ["compare", str(run)]).startswith(f"{run / 'final_metrics.json'}: unreadable (")


def test_augment_a_sample_missing_a_key(capsys, tmp_path):
    samples, out = tmp_path / "s.jsonl", tmp_path / "aug.tsv"
    good = '{"text": "a", "generated": "b", "label": "1", "edit_rate": 0.5, "changed": true}'
    samples.write_text(good + "\n" + good.replace(', "edit_rate": 0.5', "") + "\n")
    assert user_error(capsys, ["augment", "--samples", str(samples), "--output", str(out)]).startswith(
        f"{samples}:2: sample has no 'edit_rate'")
    assert not out.exists()


@pytest.mark.parametrize("errno_name", ["EROFS", "ENOSPC", "EACCES"])
def test_a_failed_write_is_one_line_and_leaves_no_partial_file(capsys, monkeypatch, tmp_path, errno_name):
    import errno

    samples, out = tmp_path / "s.jsonl", tmp_path / "aug.tsv"
    samples.write_text('{"text": "a", "generated": "b", "label": "1", "edit_rate": 0.5, "changed": true}\n')
    real = Path.write_text

    def half_then_fail(self, text, *a, **kw):  # the disk fills (or the mount turns read-only) mid-write
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    msg = user_error(capsys, ["augment", "--samples", str(samples), "--output", str(out)])
    assert msg == f"cannot write {out}: {os.strerror(getattr(errno, errno_name))}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]  # no aug.tsv, no temporary file


def test_attack_results_are_valid_json(tiny_model_dir, files, tmp_path, monkeypatch):
    """Non-finite numbers in a result (e.g. a NaN distance) are written as null: never NaN, which is not JSON."""
    import json

    import carlrar.attack

    real = carlrar.attack.attack_split
    monkeypatch.setattr(carlrar.attack, "attack_split",
                        lambda *a, **kw: {**real(*a, **kw), "clean_accuracy": float("nan")})
    out = tmp_path / "a.json"
    main(["attack", "--model", str(tiny_model_dir), "--file", str(files["dev"]), "--eps", "0.1", "--steps", "1",
          "--distance-alphas", "", "--output", str(out)])
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["clean_accuracy"] is None
