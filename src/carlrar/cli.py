"""``carlrar`` command line: train, evaluate, attack, generate, augment, predict, compare, methods, reproduce,
report, search.

This module parses flags and calls the module that does the work (``evaluate``, ``attack``, ``generate``,
``report``, ``reproduce``, ``search``, ``train``). Every option is spelled ``--a-b`` or ``--a_b``, in every
command. Errors in the user's input print one line (``error: ...``) and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from carlrar.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a one-line user error instead of a usage block, and that takes every
    ``--a-b`` option as ``--a_b`` too: ``carlrar train`` (HfArgumentParser) takes both, so one spelling works in
    every command. --help shows the dashed spelling."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after "--" everything is a positional value
        return super().parse_known_args([*map(self._dashed, args[:end]), *args[end:]], namespace)

    def _dashed(self, arg: str) -> str:
        """``--a_b`` (or ``--a_b=V``) → ``--a-b`` when that is an option here; anything else is left as it is."""
        flag, eq, value = arg.partition("=")
        dashed = "--" + flag[2:].replace("_", "-")
        if flag.startswith("--") and dashed != flag and dashed in self._option_string_actions:
            return dashed + eq + value
        return arg


def _quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_train(argv: list[str]):
    from carlrar.config import TrainConfig, parse_args
    from carlrar.methods import METHODS, config_classes
    from carlrar.train import train

    parsed = parse_args((TrainConfig, *config_classes()), argv)
    cfg = parsed[0]
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    by_class = {type(c): c for c in parsed[1:]}
    train(cfg, *[by_class[c] for c in METHODS[cfg.method].config_classes])


def cmd_evaluate(argv: list[str]):
    from carlrar.evaluate import evaluate_split, print_metrics

    p = ArgumentParser(prog="carlrar evaluate", description="accuracy, macro-F1, per-class, confusion")
    p.add_argument("--model", required=True, help="output directory of carlrar train (or any HF classifier)")
    _data_args(p)
    p.add_argument("--output", help="JSON file for the metrics (default MODEL/eval_<dataset>_<split>.json)")
    args = p.parse_args(argv)
    model, tokenizer, names, data = _model_and_data(args)
    metrics = evaluate_split(model, data, names, tokenizer.pad_token_id, args.batch_size, progress="evaluate")
    out = _write_result(args, "eval", metrics)
    print_metrics(metrics, names, f"{args.model} on {_tag(args)}")
    print(f"metrics written to {out}", file=sys.stderr)


def cmd_attack(argv: list[str]):
    from carlrar.attack import print_attack, run_attack

    p = ArgumentParser(prog="carlrar attack", description="k-PGD on the word embeddings: accuracy under attack "
                       "per ε (Table 5) and distances between R and R^adv per step size α (Table 4)")
    p.add_argument("--model", required=True)
    _data_args(p)
    _attack_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="attack only a seeded random subset of this many examples")
    p.add_argument("--output", help="JSON file (default MODEL/attack_<dataset>_<split>.json)")
    args = p.parse_args(argv)
    attack = _attack_config(args)  # bad knobs fail before the model loads
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    result = run_attack(model, data, tokenizer.pad_token_id, attack, args.batch_size, args.seed)
    out = _write_result(args, "attack", result)
    print_attack(result, f"{args.model} on {_tag(args)}")
    print(f"results written to {out}", file=sys.stderr)


def cmd_generate(argv: list[str]):
    from transformers import AutoTokenizer

    from carlrar.generate import generate_split, print_samples, summarize, write_samples
    from carlrar.models import load_trained

    p = ArgumentParser(prog="carlrar generate", description="text-form adversarial samples decoded from RAR's "
                       "reconstructor on k-PGD-attacked inputs (Table 6), and their transfer to a --target model")
    p.add_argument("--model", required=True, help="a model trained with --method rar or carl-rar")
    _data_args(p)
    _attack_args(p, "eps", "steps", "step_size", "norm", eps=[0.1])
    p.add_argument("--target", help="another trained model to fool with the generated texts (e.g. plain fine-tuning)")
    p.add_argument("--max-edit-rate", type=float, default=None, help="keep samples with at most this token edit rate")
    p.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSONL or CSV of samples (default MODEL/generated_<dataset>_<split>.jsonl)")
    args = p.parse_args(argv)
    attack = _attack_config(args)
    if len(attack.eps) != 1:
        raise UserError(f"--eps {','.join(f'{e:g}' for e in attack.eps)}: carlrar generate attacks at one radius")
    eps = attack.eps[0]
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    if "reconstructor" not in model.heads:
        raise UserError(f"{args.model} has no reconstructor: train it with --method rar or carl-rar")
    target = load_trained(args.target) if args.target else None
    records = generate_split(model, tokenizer, data, data.texts, names, eps, attack.steps, attack.step_size,
                             attack.norm, args.batch_size, target, AutoTokenizer.from_pretrained(args.target)
                             if target is not None else None, args.max_length)
    if args.max_edit_rate is not None:
        records = [r for r in records if r["edit_rate"] <= args.max_edit_rate]
    summary = summarize(records)
    out = Path(args.output or Path(args.model) / f"generated_{_tag(args)}.jsonl")
    summary_file = write_samples(records, out, {"model": args.model, "target": args.target, "eps": eps,
                                                "steps": attack.steps, **summary})
    print(json.dumps(summary, indent=2))
    print_samples(records)
    print(f"samples written to {out}, summary to {summary_file}", file=sys.stderr)


def cmd_augment(argv: list[str]):
    from carlrar.generate import augment

    p = ArgumentParser(prog="carlrar augment", description="turn generated samples into a training file "
                       "(TSV with header text, label) usable with --train-file")
    p.add_argument("--samples", required=True, help="JSONL written by carlrar generate")
    p.add_argument("--output", required=True, help="TSV to write")
    p.add_argument("--with-originals", action="store_true", help="also write the original texts")
    p.add_argument("--max-edit-rate", type=float, default=None)
    args = p.parse_args(argv)
    rows, generated = augment(Path(args.samples), Path(args.output), args.with_originals, args.max_edit_rate)
    print(f"{rows} rows written to {args.output} ({generated} generated)", file=sys.stderr)


def cmd_predict(argv: list[str]):
    from transformers import AutoTokenizer

    from carlrar.data import read_texts
    from carlrar.evaluate import predictions
    from carlrar.models import load_trained

    p = ArgumentParser(prog="carlrar predict", description="label and probabilities per text, as JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--file", help="CSV/TSV/JSONL (uses --text-column) or plain text, one per line; default stdin")
    p.add_argument("--text-column", default="text")
    p.add_argument("--output", help="JSONL output file (default stdout)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    texts = read_texts(args.file, args.text_column)
    model, tokenizer = load_trained(args.model), AutoTokenizer.from_pretrained(args.model)
    lines = [json.dumps(r) for r in predictions(model, tokenizer, texts, args.max_length, args.batch_size)]
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        print("\n".join(lines))


def cmd_compare(argv: list[str]):
    from carlrar.compare import compare_runs, print_comparison

    p = ArgumentParser(prog="carlrar compare", description="side-by-side table of trained runs: clean dev accuracy "
                       "and accuracy under attack from each run's final_metrics.json and attack_*.json")
    p.add_argument("runs", nargs="+", help="output directories of carlrar train")
    args = p.parse_args(argv)
    print_comparison(*compare_runs(args.runs))


def _set_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    import yaml

    return key, yaml.safe_load(value)


def cmd_reproduce(argv: list[str]):
    from carlrar.reproduce import Protocol, reproduce

    p = ArgumentParser(prog="carlrar reproduce", description="the paper's comparison as a resumable grid of runs "
                       "(methods × datasets × seeds): train → dev (+ test) → k-PGD per ε → R vs R^adv distances")
    p.add_argument("--results", required=True, help="results folder (index.json, runs/*.json, models/)")
    p.add_argument("--protocol", default="cpu", help="protocol name (carlrar/protocols/*.yaml) or YAML file "
                   "(default cpu)")
    p.add_argument("--methods", help="comma-separated methods (default: the protocol's)")
    p.add_argument("--datasets", help="comma-separated datasets (default: the protocol's)")
    p.add_argument("--seeds", help="a number N (seeds 0..N-1) or comma-separated seeds (default: the protocol's)")
    p.add_argument("--set", dest="options", action="append", type=_set_option, default=[], metavar="KEY=VALUE",
                   help="a training option for every run, e.g. --set train_subset=2000 (repeatable)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's resumable checkpoint")
    args = p.parse_args(argv)
    protocol = Protocol.load(args.protocol)
    protocol.narrow(args.methods, args.datasets, args.seeds)
    command = "carlrar reproduce " + " ".join(argv)
    index = reproduce(protocol, Path(args.results), dict(args.options), args.keep_checkpoints, command)
    if any(r["status"] == "failed" for r in index["runs"].values()):
        sys.exit(1)
    print(f"all runs done; tables and plots: carlrar report {args.results}", file=sys.stderr)


def cmd_report(argv: list[str]):
    from carlrar.report import write_report

    p = ArgumentParser(prog="carlrar report", description="the paper's tables (mean ± std over seeds, paired "
                       "bootstrap CIs vs FreeLB) and plots from a carlrar reproduce folder")
    p.add_argument("results", help="the --results folder of carlrar reproduce")
    args = p.parse_args(argv)
    out, pngs = write_report(Path(args.results))
    print(out.read_text(encoding="utf-8").split("\n## Plots")[0])
    print(f"report written to {out}; plots: {', '.join(p.name for p in pngs)}", file=sys.stderr)


def cmd_search(argv: list[str]):
    from carlrar.config import TrainConfig, parse_args
    from carlrar.methods import METHODS, config_classes
    from carlrar.search import SPACE, TABLE_8, search

    p = ArgumentParser(prog="carlrar search", description="Optuna search over the paper's Table 8 bounds "
                       "(γ, α, ε, n), objective dev accuracy, resumable (SQLite); other options as carlrar train",
                       add_help=False)
    p.add_argument("--study-dir", required=True, help="folder for study.db, one folder per trial, best.yaml")
    p.add_argument("--trials", type=int, default=20, help="completed + pruned trials to reach (default 20)")
    p.add_argument("--sampler", choices=["tpe", "grid"], default="tpe")
    p.add_argument("--params", default=",".join(TABLE_8), help=f"which to search, of {', '.join(SPACE)} "
                   f"(default Table 8's {','.join(TABLE_8)})")
    p.add_argument("--search-seed", type=int, default=0, help="the sampler's seed")
    if argv in (["-h"], ["--help"]):
        p.print_help()
        print("\nAll carlrar train options are accepted too (e.g. --preset demo --method freelb).")
        return
    args, rest = p.parse_known_args(argv)
    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    parsed = parse_args((TrainConfig, *config_classes()), rest, prog="carlrar search")
    cfg = parsed[0]
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    by_class = {type(c): c for c in parsed[1:]}
    configs = (cfg, *[by_class[c] for c in METHODS[cfg.method].config_classes])
    names = [n.strip() for n in args.params.split(",") if n.strip()]
    study = search(configs, Path(args.study_dir), args.trials, args.sampler, names, args.search_seed)
    best = study.best_trial
    print(f"best trial {best.number}: selection accuracy {best.value:.4f} with "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.params.items()))
    print(f"best configuration written to {Path(args.study_dir) / 'best.yaml'} "
          f"(carlrar train --config {Path(args.study_dir) / 'best.yaml'})", file=sys.stderr)


def cmd_methods(argv: list[str]):
    from carlrar.methods import METHODS

    for name, spec in METHODS.items():
        print(f"{name:10s} {spec.doc}")


def _data_args(p: ArgumentParser):
    p.add_argument("--dataset", default="sst2", help="named dataset (default sst2)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-dir", help="folder with the dataset folders (default $CARLRAR_DATA_DIR, then the hub)")
    p.add_argument("--file", help="a labelled CSV/TSV/JSONL file instead of --dataset")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)


def _tag(args) -> str:
    """What output files are named after: the --file's stem, else DATASET_SPLIT."""
    return Path(args.file).stem if args.file else f"{args.dataset}_{args.split}"


def _model_and_data(args, limit: int | None = None, seed: int = 0):
    """The model of --model and the data of ``_data_args``, as ``load_model_and_split`` returns them."""
    from carlrar.evaluate import load_model_and_split

    return load_model_and_split(args.model, args.dataset, args.split, args.data_dir, args.file, args.text_column,
                                args.label_column, args.max_length, limit, seed)


def _write_result(args, kind: str, result: dict) -> Path:
    """``result`` with the model and data it is about, to --output or MODEL/<kind>_<tag>.json."""
    out = Path(args.output or Path(args.model) / f"{kind}_{_tag(args)}.json")
    out.write_text(json.dumps({"model": str(args.model), "data": _tag(args), **result}, indent=2))
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _attack_args(p: ArgumentParser, *names: str, **defaults):
    """Flags from the fields of ``AttackConfig`` (those in ``names``; all without), help from their metadata;
    ``defaults`` override the dataclass's (generate attacks at one ε)."""
    from carlrar.attack import AttackConfig

    hints = typing.get_type_hints(AttackConfig)
    for f in [f for f in dataclasses.fields(AttackConfig) if not names or f.name in names]:
        default = defaults.get(f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        parse = {list[float]: _floats, float | None: float}.get(hints[f.name], hints[f.name])
        shown = ",".join(f"{x:g}" for x in default) if isinstance(default, list) else default
        p.add_argument(f"--{f.name.replace('_', '-')}", type=parse, default=default, choices=f.metadata.get("choices"),
                       help=f.metadata["help"] + ("" if default is None else f" (default {shown})"))


def _attack_config(args):
    """The ``AttackConfig`` of the flags ``_attack_args`` added (the others keep their defaults); checked here."""
    from carlrar.attack import AttackConfig

    return AttackConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AttackConfig)
                           if hasattr(args, f.name)})


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "attack": cmd_attack, "predict": cmd_predict,
            "generate": cmd_generate, "augment": cmd_augment, "compare": cmd_compare, "methods": cmd_methods,
            "reproduce": cmd_reproduce, "report": cmd_report, "search": cmd_search}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: carlrar {" + ",".join(COMMANDS) + "} [options]   (carlrar COMMAND --help for options)",
              file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    _quiet_libraries()
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
