"""Run configuration: dataclasses are the single source for CLI flags, YAML keys and their documentation.

``HfArgumentParser`` turns the fields into ``--flag`` / ``--flag_name`` options; a ``--config run.yaml`` and a
``--preset NAME`` (``carlrar/presets/NAME.yaml``) supply defaults, and flags given on the command line win.
Precedence: dataclass default < preset < config file < command line.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import yaml

from carlrar.errors import UserError
from carlrar.validation import SEED_MAX, check_number, check_path

PRESETS = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Limits:
    """The values a config's fields take (``check``): numbers ≥ ``minimum`` or > ``above`` and ≤ ``maximum`` (every
    numeric field declares a lower bound), paths of a kind (field → kind, see ``carlrar.validation.path_problem``)."""

    minimum: dict[str, float] = field(default_factory=dict)
    above: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)


def config_field(default, help: str, **argparse_kwargs):
    """A config field: ``help`` (and e.g. ``choices``) go to argparse through HfArgumentParser."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


_f = config_field


@dataclass
class TrainConfig:
    # what to train
    method: str = _f("base", "training method (see `carlrar methods`)")
    model: str = _f("minilm", "HF hub name, local directory, or alias: minilm, albert-base-v2, albert-base-v2-scratch")
    output_dir: str | None = _f(None, "where the model, config and metrics go (default runs/<dataset>-<method>)")
    # data
    dataset: str | None = _f(None, "named dataset: sst2, sst2-sentence, agnews, yelp-p, yahoo")
    data_dir: str | None = _f(None, "folder with the dataset folders (default $CARLRAR_DATA_DIR, then the hub)")
    train_file: str | None = _f(None, "generic CSV/TSV (with header) or JSONL training file")
    dev_file: str | None = _f(None, "generic dev file (default: a seeded 10%% of train)")
    test_file: str | None = _f(None, "generic test file")
    text_column: str = _f("text", "text column / key of generic files")
    label_column: str = _f("label", "label column / key of generic files (names or ids)")
    train_subset: int | None = _f(None, "train on a seeded random subset of this many examples")
    validation_size: int = _f(0, "set aside this many training examples (seed 0, before --train_subset) as a "
                              "validation split: the best checkpoint is chosen on it, dev is only reported "
                              "(0: choose on dev)")
    max_length: int = _f(128, "truncate inputs to this many tokens")
    group_by_length: bool = _f(True, "length-grouped batches (sort within chunks of 100 batches); --no_group_by_length off")
    # optimisation (paper: Adam, lr 1e-5, batch 32; 16 for AG News)
    lr: float = _f(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = _f(0.1, "fraction of steps with linear warm-up, then --lr_schedule")
    lr_schedule: str = _f("linear", "after warm-up: linear (decay to 0 at the last step) or constant",
                          choices=["linear", "constant"])
    batch_size: int = _f(32, "examples per optimiser step per process, before accumulation")
    grad_accum: int = _f(1, "gradient accumulation steps (effective batch = batch_size × grad_accum × processes)")
    epochs: float = _f(3.0, "training epochs (ignored when --max_steps > 0)")
    max_steps: int = _f(0, "stop after this many optimiser steps (0: use --epochs)")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: off)")
    init_from: str | None = _f(None, "start from another run's latest checkpoint (its output directory): its "
                               "weights and, unless --init_weights_only, its optimiser, schedule, RNG and data "
                               "position, so this run continues it with this method (a branch)")
    init_weights_only: bool = _f(False, "--init_from: take only the weights; start at step 0")
    seed: int = _f(42, "seed for init, data order and perturbations")
    # evaluation, logging, checkpoints
    eval_steps: int = _f(500, "evaluate on dev every N steps (0: only at epoch ends); the best model is kept")
    eval_batch_size: int = _f(128, "batch size for evaluation")
    log_steps: int = _f(50, "log loss / examples/s / fraction of peak every N steps")
    diagnostics_steps: int = _f(25, "every N steps: each objective term's gradient norm per module group and the "
                                "cosines between terms, into diagnostics.jsonl (0: off)")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")
    mixed_precision: str = _f("no", "autocast the training passes (through Accelerate): no, bf16, or fp16 (GPU "
                              "only, with a gradient scaler); weights, optimiser state, δ and CARL's memory banks "
                              "stay float32 either way, and so do the contrastive scores",
                              choices=["no", "bf16", "fp16"])
    overwrite: bool = _f(False, "start afresh even if output_dir holds a finished or interrupted run")
    skip_nonfinite: bool = _f(False, "skip optimiser steps whose loss or gradient is NaN/inf (counted in the "
                              "metrics) instead of stopping with an error")
    trust_remote_code: bool = _f(False, "allow a hub model's own Python code to run (off: only stock architectures)")
    # where the values came from
    config: str | None = _f(None, "YAML file of defaults; command-line flags win")
    preset: str | None = _f(None, "named preset (carlrar/presets/*.yaml), e.g. the paper's Table 1 settings")

    LIMITS: ClassVar[Limits] = Limits(
        minimum={"batch_size": 1, "grad_accum": 1, "max_length": 2, "eval_batch_size": 1, "log_steps": 1,
                 "eval_steps": 0, "max_steps": 0, "epochs": 0, "threads": 0, "validation_size": 0,
                 "diagnostics_steps": 0, "train_subset": 1, "weight_decay": 0, "warmup_ratio": 0, "grad_clip": 0,
                 "seed": 0},
        # threads: far beyond any machine's cores torch cannot start them (100000 crashed the process)
        above={"lr": 0}, maximum={"warmup_ratio": 1, "seed": SEED_MAX, "threads": 1024},
        paths={"model": "model", "output_dir": "new_dir", "data_dir": "dir", "train_file": "file", "dev_file": "file",
               "test_file": "file", "init_from": "run", "config": "file"})

    def __post_init__(self):
        check(self)

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.dataset or Path(self.train_file or 'files').stem}-{self.method}")


def _coerce(value, tp, where: str):
    """Check a YAML value against a field type; a wrong value is a one-line error naming the key. YAML gives typed
    values, so only the forgiving readings are allowed: a number or a numeric text for a number (``1e-5`` unquoted
    is text to YAML), yes / no for a switch; never a switch for a number, nor a list, mapping or number for text."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None and type(None) in typing.get_args(tp):
        return None
    tp = args[0] if args else tp
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        kind = "text" if tp is str else tp.__name__
        raise UserError(f"{where}: cannot read {value!r} as {kind}") from None


def from_mapping(cls, data: dict, where: str):
    """A config dataclass from a protocol's mapping (keys as the fields, ``-`` or ``_``); missing keys keep their
    defaults; an unknown key or a bad value is one line naming ``where``."""
    return from_mappings((cls,), data, where)[0]


def from_mappings(classes: tuple[type, ...], data: dict, where: str) -> tuple:
    """``from_mapping`` for one mapping that holds the fields of several config dataclasses (no field in two), e.g. a
    protocol's ``attack:`` section: k-PGD's knobs and the dev subset it attacks. One instance per class."""
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    names = [{f.name for f in dataclasses.fields(cls)} for cls in classes]
    unknown = sorted(set(options).difference(*names))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}")
    try:
        return tuple(cls(**{k: v for k, v in options.items() if k in own}) for cls, own in zip(classes, names))
    except (UserError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def check(config):
    """A config's ``choices`` (field metadata), numbers (finite and within its class's ``LIMITS``; every element of
    a list) and paths (of their kind), as one-line user errors. Called from each config's ``__post_init__``, so
    flags, YAML values and the Python API are all checked before anything runs. A numeric field without a lower
    bound, or a ``*_file`` / ``*_dir`` field without a path kind, is a programming error: a new option cannot skip
    the checks."""
    limits = getattr(type(config), "LIMITS", Limits())
    minimum, above, maximum, paths = limits.minimum, limits.above, limits.maximum, limits.paths
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, choices = getattr(config, f.name), f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{f.name} = {value!r}: choose one of {', '.join(map(str, choices))}")
        kinds = {a for a in (*typing.get_args(hints[f.name]), hints[f.name]) for a in (a, *typing.get_args(a))}
        whole = int in kinds
        if whole or float in kinds:
            if f.name not in minimum and f.name not in above:
                raise TypeError(f"{type(config).__name__}.{f.name}: declare its lower bound in LIMITS")
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                check_number(f.name, v, whole, minimum.get(f.name), maximum.get(f.name), above.get(f.name))
        if f.name.endswith(("_file", "_dir")) and f.name not in paths:
            raise TypeError(f"{type(config).__name__}.{f.name}: declare its path kind in LIMITS")
        if f.name in paths:
            check_path(value, paths[f.name], f.name)


def read_yaml(path: Path) -> dict:
    """A YAML mapping, or a one-line user error naming the file (and the line, for syntax errors)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)  # syntax errors know their line
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    return data


def coerce_options(data: dict, classes: tuple[type, ...], where: str) -> dict:
    """Option names (``-`` or ``_``) and values checked against the dataclasses' fields and types."""
    fields = {f.name: hints[f.name] for c in classes
              for hints in [typing.get_type_hints(c)] for f in dataclasses.fields(c)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UserError(f"{where}: unknown option {key!r}")
        out[name] = _coerce(value, fields[name], f"{where}: {key}")
    return out


def read_yaml_defaults(path: Path, classes: tuple[type, ...]) -> dict:
    return coerce_options(read_yaml(path), classes, str(path))


def parse_args(classes: tuple[type, ...], argv: list[str], prog: str = "carlrar train"):
    """Parse ``argv`` into one instance per dataclass, applying --preset and --config defaults first."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(classes, prog=prog)
    parser.error = _argparse_error
    first, _ = parser.parse_known_args(argv)
    defaults = {}
    if getattr(first, "preset", None):
        path = PRESETS / f"{first.preset}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise UserError(f"unknown preset {first.preset!r} (known: {known})")
        defaults.update(read_yaml_defaults(path, classes))
    if getattr(first, "config", None):
        defaults.update(read_yaml_defaults(Path(first.config), classes))
    parser.set_defaults(**defaults)
    *configs, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)} (see {prog} --help)")
    return tuple(configs)


def _argparse_error(message: str):
    """argparse prints its usage and exits; bad flags are one-line user errors like everything else."""
    raise UserError(message)


def to_dict(*configs) -> dict:
    return {k: v for c in configs for k, v in dataclasses.asdict(c).items()}


def write_yaml(path: Path, data: dict):
    from carlrar.ownership import write_whole

    write_whole(Path(path), yaml.safe_dump(data, sort_keys=False))

