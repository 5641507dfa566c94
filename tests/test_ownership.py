"""Output directories: carlrar deletes or replaces only what it can prove it wrote, and one live run per directory."""

import fcntl
import os
import subprocess
import sys
import time

import pytest

from carlrar.checkpoint import prepare_output_dir
from carlrar.cli import main
from carlrar.errors import UserError
from carlrar.ownership import LOCK, MARKER
from carlrar.train import train
from conftest import TOY_TRAIN, write_tsv
from test_train import cfg_for


def run_cli(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of one CLI call."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def victim_folder(tmp_path):
    """A user's folder: their training data, a copied carlrar config and a file of notes."""
    victim = tmp_path / "victim"
    victim.mkdir()
    write_tsv(victim / "mydata.tsv", TOY_TRAIN)
    (victim / "carlrar_config.yaml").write_text("lr: 0.001\n")
    (victim / "notes.txt").write_text("my notes\n")
    return victim


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_training_into_a_users_folder_keeps_every_file(capsys, tiny_model_dir, tmp_path, overwrite):
    victim = victim_folder(tmp_path)
    before = snapshot(victim)
    code, err = run_cli(capsys, ["train", "--model", str(tiny_model_dir), "--train_file", str(victim / "mydata.tsv"),
                                 "--text_column", "sentence", "--output_dir", str(victim), "--max_steps", "2",
                                 "--batch_size", "8", *overwrite])
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "mydata.tsv" in lines[0] and str(victim) in lines[0]  # names the first foreign file
    assert snapshot(victim) == before  # nothing deleted, nothing added


def test_a_lone_copied_config_is_not_a_run(tiny_model_dir, toy_files, tmp_path):
    """A folder holding only carlrar_config.yaml (copied there by the user) carries no marker: refused, kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "carlrar_config.yaml").write_text("lr: 0.001\n")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="carlrar_config.yaml.*not written by carlrar"):
            train(cfg_for(tiny_model_dir, toy_files, out, overwrite=overwrite))
        assert [p.name for p in out.iterdir()] == ["carlrar_config.yaml"]


def test_data_inside_the_output_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    data = write_tsv(out / "metrics.jsonl", TOY_TRAIN)  # even under one of carlrar's own names
    with pytest.raises(UserError, match="inside the output directory"):
        prepare_output_dir(out, {"overwrite": True, "train_file": str(data)})
    assert data.read_text().startswith("sentence")


def test_overwrite_replaces_only_carlrar_files_and_legacy_runs_are_adopted(tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, toy_files, out, max_steps=2))
    assert (out / MARKER).is_file()
    (out / "attack_dev.json").write_text("{}")  # a carlrar attack result beside the model: stale after overwrite
    (out / MARKER).unlink()  # a run written before the marker existed: all its names are carlrar's
    (out / LOCK).unlink()
    train(cfg_for(tiny_model_dir, toy_files, out, max_steps=2, overwrite=True))
    assert (out / MARKER).is_file() and not (out / "attack_dev.json").exists()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine.txt"):
        train(cfg_for(tiny_model_dir, toy_files, out, max_steps=2, overwrite=True))
    assert (out / "mine.txt").read_text() == "keep me" and (out / "final_metrics.json").exists()


def test_output_dir_that_is_a_file(capsys, tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("x")
    code, err = run_cli(capsys, ["train", "--model", str(tiny_model_dir), "--train_file", str(toy_files["train"]),
                                 "--text_column", "sentence", "--output_dir", str(out)])
    assert code == 2 and err.count("error:") == 1 and str(out) in err, err
    assert out.read_text() == "x"


HOLD = """
import fcntl, os, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.truncate(0); fh.write(str(os.getpid())); fh.flush()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_refuses_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(capsys, tiny_model_dir,
                                                                                      toy_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        code, err = run_cli(capsys, ["train", "--model", str(tiny_model_dir), "--train_file",
                                     str(toy_files["train"]), "--text_column", "sentence", "--output_dir", str(out),
                                     "--max_steps", "2", "--batch_size", "8"])
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("error: ") and f"PID {holder.pid}" in lines[0] and str(out) in lines[0]
        assert snapshot(out) == before
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    final = train(cfg_for(tiny_model_dir, toy_files, out, max_steps=2))
    assert final["steps"] == 2


def test_the_lock_is_held_while_training_and_released_after(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """While the run trains, another open file description of the lock cannot take it; after, it can."""
    from carlrar.methods import Method

    out, real, seen = tmp_path / "run", Method.training_step, []

    def probe(self, *a, **kw):
        with open(out / LOCK, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                fh.seek(0)
                seen.append(fh.read().strip())
        return real(self, *a, **kw)

    monkeypatch.setattr(Method, "training_step", probe)
    train(cfg_for(tiny_model_dir, toy_files, out, max_steps=2))
    assert seen and set(seen) == {str(os.getpid())}
    with open(out / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the run finished


def test_two_runs_racing_for_one_fresh_directory(tmp_path):
    """Started together: exactly one gets the directory, the other refuses."""
    out = tmp_path / "run"
    script = ("import sys, time; from pathlib import Path; from carlrar.checkpoint import prepare_output_dir\n"
              "from carlrar.errors import UserError\n"
              "try:\n    prepare_output_dir(Path(sys.argv[1]), {'overwrite': False})\n    print('won', flush=True)\n"
              "    time.sleep(120)\nexcept UserError as e:\n    print('lost', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        assert sorted(p.stdout.readline().strip() for p in procs) == ["lost", "won"]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_one_reproduce_per_results_folder(capsys, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr("carlrar.data.load_dataset", lambda *a, **kw: None)  # the data is not the point here
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(results / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_cli(capsys, ["reproduce", "--results", str(results), "--protocol", "cpu"])
        assert code == 2 and err.count("\n") == 1 and f"PID {holder.pid}" in err, err
        assert not (results / "index.json").exists()
    finally:
        holder.kill()
        holder.wait()
