"""A standing fuzz test of every flag of every command: generated bad values (non-finite, out of range, not a
number, the wrong kind of path, not a choice) must give exit status 2 and exactly one ``error:`` line naming the
flag or the path, with nothing written. Flags are found by introspection (each command's parser, the config
dataclasses behind ``train`` and ``search``), so a flag added later is fuzzed too, and one without a checking type
fails here. Whatever gets past validation hits a sentinel instead of loading a model: the test stays fast."""

import dataclasses
import typing

import pytest

from carlrar import cli
from carlrar.attack import AttackConfig
from carlrar.config import TrainConfig
from carlrar.methods import config_classes

PATH_CASES = {"file": ["a_dir", "missing.tsv"], "dir": ["a_file.txt", "missing_dir"],
              "new_file": ["a_dir", "a_file.txt/x.json"], "new_dir": ["a_file.txt", "a_file.txt/sub"],
              "model": ["a_file.txt", "./missing_model"], "run": ["a_file.txt"]}


class Reached(BaseException):
    """The command got past validation to real work (a BaseException: no ``except Exception`` swallows it)."""


class Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace of good inputs, and sentinels where each command's work would start."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file.txt").write_text("x\n")
    (tmp_path / "data.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "samples.jsonl").write_text("{}\n")

    def reached(*a, **kw):
        raise Reached()

    for target in ("carlrar.train.load_splits", "carlrar.evaluate.load_model_and_split", "carlrar.data.read_texts",
                   "carlrar.generate.augment", "carlrar.compare.compare_runs", "carlrar.report.write_report",
                   "carlrar.search.search", "carlrar.data.load_dataset", "carlrar.selfcheck.run_selfcheck"):
        monkeypatch.setattr(target, reached)
    return tmp_path


BASE = {"evaluate": {"--model": "model", "--file": "data.tsv", "--output": "out/e.json"},
        "attack": {"--model": "model", "--file": "data.tsv", "--output": "out/a.json"},
        "generate": {"--model": "model", "--file": "data.tsv", "--output": "out/g.jsonl"},
        "predict": {"--model": "model", "--file": "data.tsv", "--output": "out/p.jsonl"},
        "augment": {"--samples": "samples.jsonl", "--output": "out/aug.tsv"},
        "compare": {"runs": "run"}, "report": {"results": "results"}, "reproduce": {"--results": "out/results"},
        "search": {"--study-dir": "out/study", "--model": "model", "--train_file": "data.tsv"},
        "train": {"--model": "model", "--train_file": "data.tsv", "--output_dir": "out/run"}, "selfcheck": {}}


def number_cases(whole: bool, low=None, high=None, above=None) -> list[str]:
    cases = ["nan", "inf", "-inf", "abc"] + (["1.5"] if whole else [])
    if low is not None:
        cases.append(str(int(low) - 1) if whole else f"{low - 0.5:g}")
    if above is not None:
        cases.append(f"{above:g}")
    if high is not None:
        cases.append(str(int(high) + 1) if whole else f"{high + 0.5:g}")
    return cases


def field_cases(cls, name: str) -> list[tuple[str, str]]:
    """(bad value, what the error must name) for a config dataclass field, from its type and LIMITS."""
    hint = typing.get_type_hints(cls)[name]
    kinds = {a for a in (hint, *typing.get_args(hint)) for a in (a, *typing.get_args(a))}
    limits, f = cls.LIMITS, next(f for f in dataclasses.fields(cls) if f.name == name)
    if int in kinds or float in kinds:
        cases = number_cases(int in kinds, limits.minimum.get(name), limits.maximum.get(name), limits.above.get(name))
        return [(v, f"{name} = ") for v in cases]
    if name in limits.paths:
        return [(v, v) for v in PATH_CASES[limits.paths[name]]]
    if f.metadata.get("choices"):
        return [("not-a-choice", "not-a-choice")]
    return []


def action_cases(action) -> list[tuple[str, str]]:
    """(bad value, what the error must name) for an argparse option, from its checking type or choices."""
    rule = getattr(action.type, "func", None)
    name = action.option_strings[0].lstrip("-").replace("-", "_") if action.option_strings else action.dest
    if action.nargs == 0:  # a switch: no value to get wrong
        return []
    if action.choices:
        return [("not-a-choice", "not-a-choice")]
    assert getattr(rule, "checks_value", False), f"{action.option_strings or action.dest}: no checking type"
    if hasattr(rule, "limits"):
        return [(v, f"{name} = ") for v in number_cases(**rule.limits)]
    if hasattr(rule, "kind"):
        return [(v, v) for v in PATH_CASES[rule.kind]]
    if name in {f.name for f in dataclasses.fields(AttackConfig)}:  # parsed here, checked by AttackConfig
        return field_cases(AttackConfig, name)
    if name == "set":
        return [("novalue", "novalue"), ("lr=nan", "lr = ")]
    return [("", f"{name} = "), ("   ", f"{name} = ")]  # text


def parser_of(command: str, monkeypatch):
    def capture(self, *a, **kw):
        raise Captured(self)

    with monkeypatch.context() as m:
        m.setattr(cli.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(Captured) as got:
            cli.COMMANDS[command]([])
    return got.value.parser


def cases_of(command: str, monkeypatch) -> list[tuple[str, str, str]]:
    """(flag, bad value, what the error must name) for every flag of ``command``."""
    out = []
    if command != "train":
        for action in parser_of(command, monkeypatch)._actions:
            flag = action.option_strings[-1] if action.option_strings else action.dest
            out += [(flag, v, need) for v, need in action_cases(action)]
    if command in ("train", "search"):
        for cls in (TrainConfig, *config_classes()):
            out += [(f"--{f.name}", v, need) for f in dataclasses.fields(cls) for v, need in field_cases(cls, f.name)]
    return out


def snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def run(argv: list[str], capsys) -> tuple[object, str]:
    try:
        cli.main(argv)
        return 0, capsys.readouterr().err
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except Reached:
        return "reached work", capsys.readouterr().err


def test_every_bad_value_of_every_flag_is_one_line_and_writes_nothing(ws, capsys, monkeypatch):
    tried, problems = 0, []
    for command in [c for c in cli.COMMANDS if c != "methods"]:
        for flag, value, need in cases_of(command, monkeypatch):
            args = {**BASE[command], flag: value}
            argv = [command, *[v for k, v in args.items() if not k.startswith("-")],
                    *[x for k, v in args.items() if k.startswith("-") for x in (k, v)]]
            before = snapshot(ws)
            code, err = run(argv, capsys)
            lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
            tried += 1
            named = need in lines[0] if lines else False
            if need.endswith(" = ") and lines:  # a number: "NAME = value: ..." or argparse's "argument --NAME: ..."
                named = named or any(f"--{n}" in lines[0] for n in (need[:-3], need[:-3].replace("_", "-")))
            if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or not named:
                problems.append(f"{command} {flag} {value!r}: exit {code}, stderr {err.strip()[-300:]!r}")
            elif snapshot(ws) != before:
                problems.append(f"{command} {flag} {value!r}: wrote {set(snapshot(ws)) ^ set(before)}")
    with capsys.disabled():
        print(f"\nfuzz: {tried} (command, flag, bad value) combinations tried, {tried - len(problems)} clean")
    assert not problems, "\n".join(problems)
    assert tried > 300  # every command's flags were found
