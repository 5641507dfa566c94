"""Bad data files (missing, empty, undecodable, wrong columns or labels): one ``error: ...`` line, exit status 2,
nothing written. The contract and the fixtures are test_bad_input's; the numbers are that file's case numbers."""

import pytest

from carlrar.data import load_files

from conftest import POSITIVE, write_tsv
from test_bad_input import DEV_ROWS, TRAIN_ROWS, train_argv, user_error
from test_bad_input import data_dir, files, hermetic, out  # noqa: F401 (fixtures, hermetic autouse)


# 1 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "dev"])
def test_missing_file(capsys, tiny_model_dir, files, out, tmp_path, split):
    files[split] = tmp_path / f"no_such_{split}.tsv"
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"],
                                        "--dev_file", files["dev"]))
    assert msg == f"{files[split]}: file not found"
    assert not out.exists()


# 2 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"  \n\t\n \r\n  "], ids=["zero-bytes", "whitespace-only"])
@pytest.mark.parametrize("split", ["train", "dev"])
def test_empty_file(capsys, tiny_model_dir, files, out, split, content):
    files[split].write_bytes(content)
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"],
                                        "--dev_file", files["dev"]))
    assert msg == f"{files[split]}: file is empty"
    assert not out.exists()


# 3 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, missing", [((), "text"),
                                            (("--text_column", "sentence", "--label_column", "polarity"), "polarity")])
def test_missing_column(capsys, tiny_model_dir, tmp_path, out, flags, missing):
    train = write_tsv(tmp_path / "sst.tsv", TRAIN_ROWS, header=("sentence", "label"))
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", train, *flags))
    assert msg.startswith(f"{train}: ")
    assert f"no column {missing!r}" in msg
    assert "(columns: sentence, label)" in msg
    assert not out.exists()


# 4 ---------------------------------------------------------------------------------------------------------------
def test_rows_with_empty_text_are_dropped_with_a_warning(capsys, tmp_path):
    train = tmp_path / "train.tsv"
    rows = [f"{t}\t{y}" for t, y in TRAIN_ROWS]
    rows.insert(1, "\t1")  # line 3 (after the header)
    rows.insert(4, "   \t0")  # line 6
    rows.append(" \t1")  # line 20 (header + 16 rows + 2 inserted + this)
    train.write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    ds = load_files(train, text_column="text", label_column="label")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(f"warning: {train}: dropped 3 row(s) with empty text")
    assert "(line 3, 6, 20)" in warnings[0]
    assert len(ds.splits["train"]) + len(ds.splits["dev"]) == len(TRAIN_ROWS)
    assert all(t.strip() for s in ds.splits.values() for t in s.texts)


# 5 ---------------------------------------------------------------------------------------------------------------
def test_unknown_label_in_dev_file(capsys, tiny_model_dir, files, out):
    write_tsv(files["dev"], DEV_ROWS + [("a film", "neutral")], ("text", "label"))
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"],
                                        "--dev_file", files["dev"]))
    assert msg.startswith(f"{files['dev']}: unknown label(s) 'neutral'")
    assert "known: '0', '1'" in msg
    assert not out.exists()


def test_unknown_label_in_named_dataset_dev(capsys, tiny_model_dir, data_dir, out):
    dev = write_tsv(data_dir / "sst2_glue" / "dev.tsv", DEV_ROWS + [("a film", 2)])
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--dataset", "sst2", "--data_dir", data_dir))
    assert msg.startswith(f"{dev}: unknown label(s) '2'")
    assert not out.exists()


# 6 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "with-bom"])
def test_non_utf8_bytes(capsys, tiny_model_dir, files, out, bom):
    # the bad byte starts line 3, right after a newline: an off-by-BOM offset would blame line 2
    files["train"].write_bytes(bom + b"text\tlabel\na wonderful film\t1\n\xffawful\t0\n")
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", files["train"],
                                        "--dev_file", files["dev"]))
    assert msg.startswith(f"{files['train']}:3: not valid UTF-8 (byte 0xff")
    assert not out.exists()


# 7 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["files", "dataset"])
def test_only_one_class_in_train(capsys, tiny_model_dir, tmp_path, data_dir, out, source):
    positives = [(t, 1) for t in POSITIVE]
    if source == "files":
        train = write_tsv(tmp_path / "pos.tsv", positives, ("text", "label"))
        dev = write_tsv(tmp_path / "pos_dev.tsv", positives[:3], ("text", "label"))
        argv = train_argv(tiny_model_dir, out, "--train_file", train, "--dev_file", dev)
        name = "'1'"
    else:
        train = write_tsv(data_dir / "sst2_glue" / "train.tsv", positives)
        argv = train_argv(tiny_model_dir, out, "--dataset", "sst2", "--data_dir", data_dir)
        name = "'positive'"
    msg = user_error(capsys, argv)
    assert msg.startswith(f"{train}: only one class ({name}) in train")
    assert not out.exists()


# 13 --------------------------------------------------------------------------------------------------------------
def test_invalid_jsonl_line(capsys, tiny_model_dir, tmp_path, out):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a wonderful film", "label": "pos"}\n\n{"text": "awful", "label": "neg"}\n'
                     '{"text": "i hated it", "label": neg}\n', encoding="utf-8")
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", train))
    assert msg.startswith(f"{train}:4: invalid JSON")  # line numbers count the blank line too
    assert not out.exists()


# 18 (issue 15) ---------------------------------------------------------------------------------------------------
def test_nul_byte_and_duplicate_columns(capsys, tiny_model_dir, tmp_path, out):
    train = tmp_path / "train.tsv"
    train.write_bytes(b"text\tlabel\na wonderful film\t1\nawf\x00ul\t0\n")
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", train))
    assert msg.startswith(f"{train}:3: NUL byte at column 4")
    train.write_text("text\tlabel\ttext\na\t1\tb\n")
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", train))
    assert msg == f"{train}:1: column 'text' appears twice (columns 1 and 3)"
    assert not out.exists()


def test_jsonl_row_without_the_label_names_the_key(capsys, tiny_model_dir, tmp_path, out):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "good", "label": "1"}\n{"text": "bad", "label": "0"}\n{"text": "meh"}\n')
    msg = user_error(capsys, train_argv(tiny_model_dir, out, "--train_file", train))
    assert msg == f"{train}:3: no key 'label' (keys: text)"
