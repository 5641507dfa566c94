"""Output locations: carlrar deletes or replaces only what it can prove it wrote (never a user's file, never the
command's own input), one live run per directory (its lock released however the run ends), and a failed write is
one line that leaves no half-written temporary behind.

Module level uses the CLI and the standard library only: on code from before these guarantees the tests fail on
the bug itself, not on an import."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from carlrar.cli import main
from conftest import TOY_TRAIN, write_tsv

MARKER, LOCK = ".carlrar-run", ".carlrar-lock"  # the files carlrar's proof of ownership and its lock live in


def run_cli(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of one CLI call."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def train_argv(model, train_file, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--train_file", str(train_file), "--text_column", "sentence",
            "--output_dir", str(out), "--max_steps", "2", "--batch_size", "8", *map(str, extra)]


def one_error(code, err) -> str:
    """The single ``error:`` line of a refused command (exit status 2)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


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
    line = one_error(*run_cli(capsys, train_argv(tiny_model_dir, victim / "mydata.tsv", victim, *overwrite)))
    assert "mydata.tsv" in line and str(victim) in line  # names the first foreign file
    assert snapshot(victim) == before  # nothing deleted, nothing added


# folders holding only carlrar's names, yet not provably carlrar's (no marker), or with a user's file inside one
# of carlrar's folders: each must be left exactly as it is, and the error names what stops the run
LOOKALIKES = {
    "copied-config": ({"carlrar_config.yaml": "lr: 0.001\n"}, "{out}"),
    "config-and-checkpoint": ({"carlrar_config.yaml": "lr: 0.001\n", "checkpoint/mydata.tsv": "DATA"}, "{out}"),
    "config-and-carlrar-names": ({"carlrar_config.yaml": "lr: 0.001\n", "metrics.jsonl": "my log\n",
                                  "config.json": "{}", "vocab.txt": "my words\n"}, "{out}"),
    "marked-checkpoint": ({MARKER: "{}", "checkpoint/mydata.tsv": "DATA"}, "checkpoint/mydata.tsv"),
    "marked-old-checkpoint": ({MARKER: "{}", "carlrar_config.yaml": "lr: 0.001\n",
                               "checkpoint.old/trainer_state.json": "{}", "checkpoint.old/mine/notes.txt": "x"},
                              "checkpoint.old/mine"),
}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("layout", LOOKALIKES)
def test_a_folder_that_only_looks_like_a_run_is_never_emptied(capsys, tiny_model_dir, toy_files, tmp_path, layout,
                                                              overwrite):
    files, named = LOOKALIKES[layout]
    out = tmp_path / "v3"
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content)
    before = snapshot(out)
    line = one_error(*run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out, *overwrite)))
    assert named.format(out=out) in line, line
    assert snapshot(out) == before  # nothing deleted, nothing added (not even a lock file)


def test_data_inside_the_output_directory_is_refused(tmp_path):
    from carlrar.checkpoint import prepare_output_dir
    from carlrar.errors import UserError

    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    data = write_tsv(out / "metrics.jsonl", TOY_TRAIN)  # even under one of carlrar's own names
    with pytest.raises(UserError, match="is inside the --output_dir"):
        prepare_output_dir(out, {"overwrite": True, "train_file": str(data)})
    assert data.read_text().startswith("sentence")


def test_overwrite_replaces_only_carlrar_files_and_unmarked_runs_are_refused(capsys, tiny_model_dir, toy_files,
                                                                              tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out))[0] == 0
    assert (out / MARKER).is_file()
    (out / "attack_dev.json").write_text("{}")  # a carlrar attack result beside the model: stale after overwrite
    assert run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out, "--overwrite"))[0] == 0
    assert (out / MARKER).is_file() and not (out / "attack_dev.json").exists()
    (out / "mine.txt").write_text("keep me")
    line = one_error(*run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out, "--overwrite")))
    assert "mine.txt" in line
    assert (out / "mine.txt").read_text() == "keep me" and (out / "final_metrics.json").exists()
    (out / "mine.txt").unlink()
    (out / MARKER).unlink()  # a run from before the marker: its files cannot be proven carlrar's
    before = snapshot(out)
    for overwrite in ([], ["--overwrite"]):
        line = one_error(*run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out, *overwrite)))
        assert str(out) in line and "delete" in line and "--output_dir" in line, line
        assert snapshot(out) == before


def test_output_dir_that_is_a_file(capsys, tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("x")
    line = one_error(*run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out)))
    assert str(out) in line
    assert out.read_text() == "x"


HOLD = """
import fcntl, os, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.truncate(0); fh.write(str(os.getpid())); fh.flush()
print("held", flush=True)
time.sleep(60)
"""


def lock_is_free(folder) -> bool:
    """Whether another open file description could take the folder's lock now (flock: even in this process)."""
    with open(folder / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def test_a_second_run_refuses_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(capsys, tiny_model_dir,
                                                                                      toy_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        line = one_error(*run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out)))
        assert f"PID {holder.pid}" in line and str(out) in line
        assert snapshot(out) == before
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    assert run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out))[0] == 0
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 2


def test_the_lock_is_held_while_training_and_released_after(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """While the run trains, another open file description of the lock cannot take it; after, it can."""
    from carlrar.methods import Method
    from carlrar.train import train
    from test_train import cfg_for

    out, real, seen = tmp_path / "run", Method.training_step, []

    def probe(self, *a, **kw):
        with open(out / LOCK) as fh:
            seen.append("free" if lock_is_free(out) else fh.read().strip())
        return real(self, *a, **kw)

    monkeypatch.setattr(Method, "training_step", probe)
    train(cfg_for(tiny_model_dir, toy_files, out, max_steps=2))
    assert seen and set(seen) == {str(os.getpid())}
    assert lock_is_free(out)  # released when the run finished


def interrupted(*a, **kw):
    raise KeyboardInterrupt  # Ctrl-C in the middle of a grid's run


def test_the_lock_is_released_however_the_run_ends(tiny_model_dir, toy_files, tmp_path, capsys, monkeypatch):
    """``search`` prunes a trial by raising from ``on_evaluate``: the trial's folder must not stay locked (nor a
    results folder whose grid was interrupted)."""
    from carlrar.train import train
    from test_train import cfg_for

    class Pruned(Exception):
        pass

    def prune(step, accuracy):
        raise Pruned()

    out = tmp_path / "trial"
    with pytest.raises(Pruned):
        train(cfg_for(tiny_model_dir, toy_files, out, max_steps=4), on_evaluate=prune)
    assert lock_is_free(out)

    results = tmp_path / "results"
    monkeypatch.setattr("carlrar.data.load_dataset", lambda *a, **kw: None)  # the data is not the point here
    monkeypatch.setattr("carlrar.reproduce.execute_run", interrupted)
    assert run_cli(capsys, ["reproduce", "--results", str(results), "--protocol", "cpu", "--seeds", "1"])[0] == 130
    assert lock_is_free(results)


RACE = "import sys; from carlrar.cli import main; main(sys.argv[1:])"


def test_two_runs_racing_for_one_fresh_directory(tiny_model_dir, toy_files, tmp_path):
    """Started together into one fresh folder: one trains, the other refuses with one line; the log stays whole."""
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, toy_files["train"], out, "--dev_file", toy_files["dev"], "--eval_steps", "2")
    argv[argv.index("--max_steps") + 1] = "12"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, *argv], stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(err for code, err in results if code == 2)
    assert len([x for x in err.splitlines() if x.startswith("error: ")]) == 1 and str(out) in err, err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicated or out-of-order steps


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


def full_disk(monkeypatch, where: str):
    """The disk fills while ``where`` writes: half a file, then the error that library raises."""
    from safetensors import SafetensorError

    def safetensors_full(tensors, filename, *a, **kw):
        os.makedirs(os.path.dirname(filename), exist_ok=True)
        open(filename, "wb").write(b"\0" * 100)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    def torch_full(self, output_dir=None, *a, **kw):  # torch.save's zip writer hides the errno
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, "optimizer.bin"), "wb").write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4310")

    if where == "checkpoint-model":
        monkeypatch.setattr("carlrar.checkpoint.save_model", lambda model, filename: safetensors_full({}, filename))
    elif where == "checkpoint-state":
        import shutil

        monkeypatch.setattr("accelerate.Accelerator.save_state", torch_full)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    else:  # the best model, written beside the run through Hugging Face's save_pretrained
        monkeypatch.setattr("transformers.modeling_utils.PreTrainedModel.save_pretrained",
                            lambda self, folder, **kw: safetensors_full({}, os.path.join(folder, "model.safetensors")))


@pytest.mark.parametrize("where", ["checkpoint-model", "checkpoint-state", "best-model"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary(capsys, tiny_model_dir, toy_files, tmp_path,
                                                                      monkeypatch, where):
    out = tmp_path / "run"
    full_disk(monkeypatch, where)
    code, err = run_cli(capsys, train_argv(tiny_model_dir, toy_files["train"], out, "--eval_steps", "2"))
    errors = [x for x in err.splitlines() if x.startswith("error: ")]  # after the run's progress lines
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: cannot write ") and "No space left on device" in errors[0], errors
    assert str(out) in errors[0]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], sorted(p.name for p in out.rglob("*"))
    assert not (out / "checkpoint").exists()  # no half checkpoint swapped in


@pytest.mark.parametrize("command", ["predict", "evaluate", "attack", "augment"])
@pytest.mark.parametrize("how", ["same-path", "other-spelling", "hard-link"])
def test_output_never_overwrites_the_commands_input(capsys, tiny_model_dir, tmp_path, monkeypatch, command, how):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "in.jsonl"
    if command == "augment":
        source.write_text('{"text": "a", "generated": "b", "label": "1", "edit_rate": 0.5, "changed": true}\n')
    else:
        source.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in TOY_TRAIN[:4]))
    output = {"same-path": str(source), "other-spelling": f"./sub/../{source.name}", "hard-link": "link.jsonl"}[how]
    (tmp_path / "sub").mkdir()
    if how == "hard-link":
        os.link(source, tmp_path / "link.jsonl")
    before = snapshot(tmp_path)
    flag = "--samples" if command == "augment" else "--file"
    model = [] if command == "augment" else ["--model", str(tiny_model_dir)]
    line = one_error(*run_cli(capsys, [command, *model, flag, str(source), "--output", output]))
    assert flag in line and "--output" in line, line
    assert snapshot(tmp_path) == before


def test_safetensors_leftovers_of_a_killed_save_count_as_carlrars(tiny_model_dir, toy_files, tmp_path):
    """A kill -9 while safetensors writes leaves its temporary file ('.tmp' + 6 characters) in the run folder or in
    checkpoint.tmp/: carlrar wrote it, so a marked run folder holding one is still carlrar's to resume or replace."""
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--train_file", str(toy_files["train"]), "--dev_file",
            str(toy_files["dev"]), "--text_column", "sentence", "--output_dir", str(out), "--max_steps", "2",
            "--batch_size", "8", "--eval_steps", "1"]
    main(args)
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / ".tmpyMcMtW").write_bytes(b"half a tensor")
    (out / ".tmpAb12Cd").write_bytes(b"half a tensor")
    main(args + ["--overwrite"])
    assert not (out / ".tmpAb12Cd").exists() and not (out / "checkpoint.tmp").exists()
    assert (out / "final_metrics.json").is_file()
