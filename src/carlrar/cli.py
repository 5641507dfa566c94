"""``carlrar`` command line: train, evaluate, attack, generate, augment, predict, compare, methods, reproduce,
report, search.

This module parses flags and calls the module that does the work (``evaluate``, ``attack``, ``generate``,
``train``); the commands over many runs (compare, reproduce, report, search) are in ``cli_grid``, the flag parser
in ``validation``. Every option is spelled ``--a-b`` or ``--a_b``, in every
command. Errors in the user's input print one line (``error: ...``) and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import typing
from pathlib import Path

from carlrar.cli_grid import cmd_compare, cmd_report, cmd_reproduce, cmd_search
from carlrar.errors import UserError
from carlrar.ownership import refuse_input  # standard library only: cheap to import for every command
from carlrar.validation import SEED_MAX, ArgumentParser, check_path, checks_value, number, parsed, path, text


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
    p.add_argument("--model", required=True, type=path("model"), help="output directory of carlrar train (or any "
                   "HF classifier)")
    _data_args(p)
    p.add_argument("--output", type=path("new_file"), help="JSON file for the metrics (default "
                   "MODEL/eval_<dataset>_<split>.json)")
    args = p.parse_args(argv)
    out = _result_path(args, "eval")
    model, tokenizer, names, data = _model_and_data(args)
    metrics = evaluate_split(model, data, names, tokenizer.pad_token_id, args.batch_size, progress="evaluate")
    _write_result(out, args, metrics)
    print_metrics(metrics, names, f"{args.model} on {_tag(args)}")
    print(f"metrics written to {out}", file=sys.stderr)


def cmd_attack(argv: list[str]):
    from carlrar.attack import print_attack, run_attack

    p = ArgumentParser(prog="carlrar attack", description="k-PGD on the word embeddings: accuracy under attack "
                       "per ε (Table 5) and distances between R and R^adv per step size α (Table 4)")
    p.add_argument("--model", required=True, type=path("model"))
    _data_args(p)
    _attack_args(p)
    _subset_args(p, "attack only a seeded random subset of this many examples")
    p.add_argument("--recipe", type=text, help="instead of k-PGD, text-level attacks: TextAttack recipes, "
                   "comma-separated, of deepwordbug, pruthi, pwws (needs make textattack), or rar-samples (RAR's "
                   "text-form samples of carlrar generate, --samples) on the --limit/--seed subset")
    p.add_argument("--query-budget", type=number(whole=True, low=1), help="--recipe: at most this many model "
                   "queries per example (default: no limit)")
    p.add_argument("--samples", type=path("file"), help="--recipe rar-samples: the JSONL of carlrar generate (RAR's "
                   "text-form samples of the same examples) to replay against --model")
    p.add_argument("--output", type=path("new_file"), help="JSON file (default MODEL/attack_<dataset>_<split>.json; "
                   "--recipe: a JSONL of examples, MODEL/textattack_<dataset>_<split>.jsonl, and OUT_summary.json)")
    args = p.parse_args(argv)
    if args.recipe:
        return _text_attack(args)
    attack, out = _attack_config(args), _result_path(args, "attack")  # bad knobs fail before the model loads
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    result = run_attack(model, data, tokenizer.pad_token_id, attack, args.batch_size, args.seed)
    _write_result(out, args, result)
    print_attack(result, f"{args.model} on {_tag(args)}")
    print(f"results written to {out}", file=sys.stderr)


def _text_attack(args):
    """carlrar attack --recipe: each recipe on the (seeded subset of the) split; examples as JSONL, summaries beside."""
    from carlrar.textattack_recipes import (parse_recipes, print_summary, require_textattack, run_identity,
                                            run_recipes)

    from carlrar.generate import read_samples

    recipes = parse_recipes(args.recipe)
    require_textattack(recipes, args.samples)  # one line, before the model loads
    samples = read_samples(Path(args.samples)) if args.samples else None
    out = _result_path(args, "textattack", ".jsonl")
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    about = {"model": str(args.model), **run_identity(args.model), "data": _tag(args), "limit": args.limit,
             "samples": args.samples}
    summary = run_recipes(model, tokenizer, data, names, recipes, out, args.query_budget, args.seed,
                          args.max_length, about, samples=samples)
    print_summary(summary)
    print(f"examples written to {out}, summary to {summary['summary_file']}", file=sys.stderr)


def cmd_generate(argv: list[str]):
    from carlrar.generate import generate_split, print_samples, summarize, write_samples
    from carlrar.models import load_tokenizer, load_trained

    p = ArgumentParser(prog="carlrar generate", description="text-form adversarial samples decoded from RAR's "
                       "reconstructor on k-PGD-attacked inputs (Table 6), and their transfer to a --target model")
    p.add_argument("--model", required=True, type=path("model"), help="a model trained with --method rar or carl-rar")
    _data_args(p)
    _attack_args(p, "eps", "steps", "step_size", "norm", eps=[0.1])
    p.add_argument("--target", type=path("model"), help="another trained model to fool with the generated texts "
                   "(e.g. plain fine-tuning)")
    p.add_argument("--max-edit-rate", type=number(low=0, high=1), help="keep samples with at most this token edit "
                   "rate")
    _subset_args(p, "a seeded random subset of this many examples")
    p.add_argument("--output", type=path("new_file"), help="JSONL or CSV of samples (default "
                   "MODEL/generated_<dataset>_<split>.jsonl)")
    args = p.parse_args(argv)
    attack = _attack_config(args)
    if len(attack.eps) != 1:
        raise UserError(f"--eps {','.join(f'{e:g}' for e in attack.eps)}: carlrar generate attacks at one radius")
    eps, out = attack.eps[0], _result_path(args, "generated", ".jsonl")
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    if "reconstructor" not in model.heads:
        raise UserError(f"{args.model} has no reconstructor: train it with --method rar or carl-rar")
    target = load_trained(args.target) if args.target else None
    records = generate_split(model, tokenizer, data, data.texts, names, eps, attack.steps, attack.step_size,
                             attack.norm, args.batch_size, target, load_tokenizer(args.target)
                             if target is not None else None, args.max_length)
    if args.max_edit_rate is not None:
        records = [r for r in records if r["edit_rate"] <= args.max_edit_rate]
    summary = summarize(records)
    summary_file = write_samples(records, out, {"model": args.model, "target": args.target, "eps": eps,
                                                "steps": attack.steps, **summary})
    print(json.dumps(summary, indent=2))
    print_samples(records)
    print(f"samples written to {out}, summary to {summary_file}", file=sys.stderr)


def cmd_augment(argv: list[str]):
    from carlrar.generate import augment

    p = ArgumentParser(prog="carlrar augment", description="turn generated samples into a training file "
                       "(TSV with header text, label) usable with --train-file")
    p.add_argument("--samples", required=True, type=path("file"), help="JSONL written by carlrar generate")
    p.add_argument("--output", required=True, type=path("new_file"), help="TSV to write")
    p.add_argument("--with-originals", action="store_true", help="also write the original texts")
    p.add_argument("--max-edit-rate", type=number(low=0, high=1))
    args = p.parse_args(argv)
    refuse_input(Path(args.output), {"samples": args.samples}, "output")
    rows, generated = augment(Path(args.samples), Path(args.output), args.with_originals, args.max_edit_rate)
    print(f"{rows} rows written to {args.output} ({generated} generated)", file=sys.stderr)


def cmd_predict(argv: list[str]):
    from carlrar.data import read_texts
    from carlrar.evaluate import predictions
    from carlrar.models import check_max_length, load_tokenizer, load_trained
    from carlrar.ownership import json_text, write_whole

    p = ArgumentParser(prog="carlrar predict", description="label and probabilities per text, as JSONL")
    p.add_argument("--model", required=True, type=path("model"))
    p.add_argument("--file", type=path("file"), help="CSV/TSV/JSONL (uses --text-column) or plain text, one per "
                   "line; default stdin")
    p.add_argument("--text-column", default="text", type=text)
    p.add_argument("--output", type=path("new_file"), help="JSONL output file (default stdout)")
    p.add_argument("--max-length", type=number(whole=True, low=2), default=128)
    p.add_argument("--batch-size", type=number(whole=True, low=1), default=64)
    args = p.parse_args(argv)
    if args.output:
        refuse_input(Path(args.output), {"file": args.file}, "output")
    texts = read_texts(args.file, args.text_column)
    model, tokenizer = load_trained(args.model), load_tokenizer(args.model)
    check_max_length(model, tokenizer, args.max_length)
    lines = [json_text(r) for r in predictions(model, tokenizer, texts, args.max_length, args.batch_size)]
    if args.output:
        write_whole(Path(args.output), "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))


def cmd_selfcheck(argv: list[str]):
    from carlrar.selfcheck import run_selfcheck

    p = ArgumentParser(prog="carlrar selfcheck", description="every method on this device: a few steps on a tiny "
                       "built-in corpus, save, reload, 3-step attack; one verdict each (exit status 1 if one fails)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: this machine's accelerator, else cpu")
    p.add_argument("--steps", type=number(whole=True, low=2), default=20, help="optimiser steps per method "
                   "(default 20)")
    args = p.parse_args(argv)
    if not all(v.ok for v in run_selfcheck(args.device, args.steps)):
        sys.exit(1)


def cmd_methods(argv: list[str]):
    from carlrar.methods import METHODS

    for name, spec in METHODS.items():
        print(f"{name:10s} {spec.doc}")


def _data_args(p: ArgumentParser):
    p.add_argument("--dataset", default="sst2", type=text, help="named dataset (default sst2)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test", "validation"],
                   help="validation: the examples --model's run set aside from train (--validation_size) and chose "
                   "its checkpoint on (default dev)")
    p.add_argument("--data-dir", type=path("dir"), help="folder with the dataset folders (default "
                   "$CARLRAR_DATA_DIR, then the hub)")
    p.add_argument("--file", type=path("file"), help="a labelled CSV/TSV/JSONL file instead of --dataset")
    p.add_argument("--text-column", default="text", type=text)
    p.add_argument("--label-column", default="label", type=text)
    p.add_argument("--max-length", type=number(whole=True, low=2), default=128)
    p.add_argument("--batch-size", type=number(whole=True, low=1), default=128)


def _subset_args(p: ArgumentParser, limit_help: str):
    p.add_argument("--limit", type=number(whole=True, low=1), help=limit_help)
    p.add_argument("--seed", type=number(whole=True, low=0, high=SEED_MAX), default=0)


def _tag(args) -> str:
    """What output files are named after: the --file's stem, else DATASET_SPLIT."""
    return Path(args.file).stem if args.file else f"{args.dataset}_{args.split}"


def _model_and_data(args, limit: int | None = None, seed: int = 0):
    """The model of --model and the data of ``_data_args``, as ``load_model_and_split`` returns them."""
    from carlrar.evaluate import load_model_and_split

    return load_model_and_split(args.model, args.dataset, args.split, args.data_dir, args.file, args.text_column,
                                args.label_column, args.max_length, limit, seed)


def _result_path(args, kind: str, suffix: str = ".json") -> Path:
    """--output, else MODEL/<kind>_<tag><suffix> (beside the model); checked writable before any work."""
    out = Path(args.output or Path(args.model) / f"{kind}_{_tag(args)}{suffix}")
    check_path(str(out), "new_file")
    refuse_input(out, {"file": args.file}, "output")
    return out


def _write_result(out: Path, args, result: dict):
    """``result`` with the model and data it is about, written whole (or not at all)."""
    from carlrar.ownership import json_text, write_whole

    write_whole(out, json_text({"model": str(args.model), "data": _tag(args), **result}, indent=2))


@checks_value  # AttackConfig checks the numbers (finite, in range)
def _floats(values: str, name: str) -> list[float]:
    try:
        return [float(x) for x in values.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name} = {values!r}: expected comma-separated numbers") from None



def _attack_args(p: ArgumentParser, *names: str, **defaults):
    """Flags from the fields of ``AttackConfig`` (those in ``names``; all without), help from their metadata;
    ``defaults`` override the dataclass's (generate attacks at one ε)."""
    from carlrar.attack import AttackConfig

    hints = typing.get_type_hints(AttackConfig)
    for f in [f for f in dataclasses.fields(AttackConfig) if not names or f.name in names]:
        default = defaults.get(f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        parse = {list[float]: _floats, float | None: parsed(float), int: parsed(int)}.get(hints[f.name], text)
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
            "reproduce": cmd_reproduce, "report": cmd_report, "search": cmd_search,
            "selfcheck": cmd_selfcheck}


ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-V"], ["--version"]):
        from carlrar import __version__

        print(f"carlrar {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: carlrar {" + ",".join(COMMANDS) + "} [options]   (carlrar COMMAND --help for options; "
              "carlrar --version)",
              file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    _quiet_libraries()
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine's, not carlrar's: a full disk, a read-only location, no permission
        if e.errno not in ENVIRONMENT:
            raise
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
