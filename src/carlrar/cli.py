"""``carlrar`` command line: train, evaluate, attack, generate, augment, predict, compare, methods, reproduce,
report, search.

Errors in the user's input print one line (``error: ...``) and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from carlrar.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a one-line user error instead of a usage block."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


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


def _model_and_data(args, limit: int | None = None, seed: int = 0):
    """The trained model, its tokenizer, and the requested split with labels mapped onto the model's."""
    from transformers import AutoTokenizer

    from carlrar.data import EncodedSplit, Split, encode_labels, load_dataset, read_examples, subset
    from carlrar.models import label_names, load_trained

    ds = None if args.file else load_dataset(args.dataset, args.data_dir)  # bad data fails before the model loads
    if ds is not None:
        ds.split(args.split)
    model = load_trained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    names = label_names(model)
    if args.file:
        texts, raw = read_examples(Path(args.file), [args.text_column], args.label_column)
        to_id = {n: i for i, n in enumerate(names)}
        if not set(raw) <= set(to_id) and all(r.isdigit() and int(r) < len(names) for r in raw):
            to_id = {str(i): i for i in range(len(names))}  # labels given as ids
        split = Split(texts, encode_labels(raw, to_id, args.file), args.file)
    else:
        split = ds.split_for_model(args.split, names)
    return model, tokenizer, names, EncodedSplit(subset(split, limit, seed), tokenizer, args.max_length)


def cmd_evaluate(argv: list[str]):
    from carlrar.evaluate import evaluate_split, print_metrics

    p = ArgumentParser(prog="carlrar evaluate", description="accuracy, macro-F1, per-class, confusion")
    p.add_argument("--model", required=True, help="output directory of carlrar train (or any HF classifier)")
    _data_args(p)
    p.add_argument("--output", help="JSON file for the metrics (default MODEL/eval_<dataset>_<split>.json)")
    args = p.parse_args(argv)
    model, tokenizer, names, data = _model_and_data(args)
    metrics = evaluate_split(model, data, names, tokenizer.pad_token_id, args.batch_size, progress="evaluate")
    tag = Path(args.file).stem if args.file else f"{args.dataset}_{args.split}"
    out = Path(args.output or Path(args.model) / f"eval_{tag}.json")
    out.write_text(json.dumps({"model": str(args.model), "data": tag, **metrics}, indent=2))
    print_metrics(metrics, names, f"{args.model} on {tag}")
    print(f"metrics written to {out}", file=sys.stderr)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_attack(argv: list[str]):
    from carlrar.attack import attack_split, print_attack

    p = ArgumentParser(prog="carlrar attack", description="k-PGD on the word embeddings: accuracy under attack "
                       "per ε (Table 5) and distances between R and R^adv per step size α (Table 4)")
    p.add_argument("--model", required=True)
    _data_args(p)
    p.add_argument("--eps", type=_floats, default=[0.02, 0.075, 0.1], help="attack radii (default 0.02,0.075,0.1)")
    p.add_argument("--steps", type=int, default=10, help="K: PGD steps (default 10)")
    p.add_argument("--step-size", type=float, default=None, help="α for the ε attacks (default ε/4)")
    p.add_argument("--distance-alphas", type=_floats, default=[0.1, 0.075],
                   help="step sizes for the unprojected R vs R^adv distances (default 0.1,0.075; '' to skip)")
    p.add_argument("--norm", choices=["l2", "linf"], default="l2")
    p.add_argument("--init-mag", type=float, default=0.0, help="random init magnitude (default 0: zero init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="attack only a seeded random subset of this many examples")
    p.add_argument("--output", help="JSON file (default MODEL/attack_<dataset>_<split>.json)")
    args = p.parse_args(argv)
    if args.steps < 0 or any(e < 0 for e in args.eps) or (args.step_size is not None and args.step_size <= 0):
        raise UserError("--steps, --eps must be ≥ 0 and --step-size > 0")
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    result = attack_split(model, data, tokenizer.pad_token_id, args.eps, args.steps, args.step_size, args.norm,
                          args.distance_alphas, args.batch_size, args.init_mag, args.seed)
    tag = Path(args.file).stem if args.file else f"{args.dataset}_{args.split}"
    out = Path(args.output or Path(args.model) / f"attack_{tag}.json")
    out.write_text(json.dumps({"model": str(args.model), "data": tag, **result}, indent=2))
    print_attack(result, f"{args.model} on {tag}")
    print(f"results written to {out}", file=sys.stderr)


def cmd_generate(argv: list[str]):
    from transformers import AutoTokenizer

    from carlrar.generate import generate_split, summarize
    from carlrar.models import load_trained

    p = ArgumentParser(prog="carlrar generate", description="text-form adversarial samples decoded from RAR's "
                       "reconstructor on k-PGD-attacked inputs (Table 6), and their transfer to a --target model")
    p.add_argument("--model", required=True, help="a model trained with --method rar or carl-rar")
    _data_args(p)
    p.add_argument("--eps", type=float, default=0.1, help="attack radius (default 0.1)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step-size", type=float, default=None, help="default ε/4")
    p.add_argument("--norm", choices=["l2", "linf"], default="l2")
    p.add_argument("--target", help="another trained model to fool with the generated texts (e.g. plain fine-tuning)")
    p.add_argument("--max-edit-rate", type=float, default=None, help="keep samples with at most this token edit rate")
    p.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSONL or CSV of samples (default MODEL/generated_<dataset>_<split>.jsonl)")
    args = p.parse_args(argv)
    if args.eps < 0 or args.steps < 0 or (args.step_size is not None and args.step_size <= 0):
        raise UserError("--eps and --steps must be ≥ 0 and --step-size > 0")
    model, tokenizer, names, data = _model_and_data(args, limit=args.limit, seed=args.seed)
    if "reconstructor" not in model.heads:
        raise UserError(f"{args.model} has no reconstructor: train it with --method rar or carl-rar")
    target = load_trained(args.target) if args.target else None
    records = generate_split(model, tokenizer, data, data.texts, names, args.eps, args.steps, args.step_size,
                             args.norm, args.batch_size, target, AutoTokenizer.from_pretrained(args.target)
                             if target is not None else None, args.max_length)
    if args.max_edit_rate is not None:
        records = [r for r in records if r["edit_rate"] <= args.max_edit_rate]
    summary = summarize(records)
    tag = Path(args.file).stem if args.file else f"{args.dataset}_{args.split}"
    out = Path(args.output or Path(args.model) / f"generated_{tag}.jsonl")
    if out.suffix == ".csv":
        import csv

        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["text"])
            writer.writeheader()
            writer.writerows(records)
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary_file = out.with_name(out.stem + "_summary.json")
    summary_file.write_text(json.dumps({"model": args.model, "target": args.target, "eps": args.eps,
                                        "steps": args.steps, **summary}, indent=2))
    print(json.dumps(summary, indent=2))
    for r in records[:5]:
        print(f"[{r['label']}] {r['original_decoded']}\n   → {r['generated']}  (edit rate {r['edit_rate']:.2f})")
    print(f"samples written to {out}, summary to {summary_file}", file=sys.stderr)


def cmd_augment(argv: list[str]):
    p = ArgumentParser(prog="carlrar augment", description="turn generated samples into a training file "
                       "(TSV with header text, label) usable with --train-file")
    p.add_argument("--samples", required=True, help="JSONL written by carlrar generate")
    p.add_argument("--output", required=True, help="TSV to write")
    p.add_argument("--with-originals", action="store_true", help="also write the original texts")
    p.add_argument("--max-edit-rate", type=float, default=None)
    args = p.parse_args(argv)
    try:
        records = [json.loads(line) for line in Path(args.samples).read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        raise UserError(f"{args.samples}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{args.samples}: not a JSONL file written by carlrar generate") from None
    if not records or not all("generated" in r and "label" in r for r in records):
        raise UserError(f"{args.samples}: no samples with 'generated' and 'label' fields")
    keep = [r for r in records if r["changed"] and r["generated"].split()
            and (args.max_edit_rate is None or r["edit_rate"] <= args.max_edit_rate)]
    clean = lambda t: " ".join(t.replace("\t", " ").split())  # noqa: E731  (TSV: no tabs or newlines)
    rows = [(clean(r["generated"]), r["label"]) for r in keep]
    rows += [(clean(r["text"]), r["label"]) for r in records] if args.with_originals else []
    Path(args.output).write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    print(f"{len(rows)} rows written to {args.output} ({len(keep)} generated)", file=sys.stderr)


def cmd_predict(argv: list[str]):
    from transformers import AutoTokenizer

    from carlrar.data import read_examples
    from carlrar.evaluate import predict_texts
    from carlrar.models import label_names, load_trained

    p = ArgumentParser(prog="carlrar predict", description="label and probabilities per text, as JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--file", help="CSV/TSV/JSONL (uses --text-column) or plain text, one per line; default stdin")
    p.add_argument("--text-column", default="text")
    p.add_argument("--output", help="JSONL output file (default stdout)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.file and Path(args.file).suffix in (".csv", ".tsv", ".jsonl"):
        texts, _ = read_examples(Path(args.file), [args.text_column], None, need_labels=False)
    else:
        try:
            raw = Path(args.file).read_text(encoding="utf-8") if args.file else sys.stdin.read()
        except FileNotFoundError:
            raise UserError(f"{args.file}: file not found") from None
        except UnicodeDecodeError:
            raise UserError(f"{args.file or 'stdin'}: not valid UTF-8") from None
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise UserError(f"{args.file or 'stdin'}: no text to predict")
    model, tokenizer = load_trained(args.model), AutoTokenizer.from_pretrained(args.model)
    probs = predict_texts(model, tokenizer, texts, args.max_length, args.batch_size)
    names = label_names(model)
    lines = [json.dumps({"text": t, "label": names[int(p.argmax())],
                         "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}) for t, p in zip(texts, probs)]
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        print("\n".join(lines))


def cmd_compare(argv: list[str]):
    from rich.console import Console
    from rich.table import Table

    p = ArgumentParser(prog="carlrar compare", description="side-by-side table of trained runs: clean dev accuracy "
                       "and accuracy under attack from each run's final_metrics.json and attack_*.json")
    p.add_argument("runs", nargs="+", help="output directories of carlrar train")
    args = p.parse_args(argv)
    rows, eps = [], []
    for run in map(Path, args.runs):
        final = run / "final_metrics.json"
        if not final.is_file():
            raise UserError(f"{run}: no final_metrics.json (not a finished carlrar run)")
        metrics = json.loads(final.read_text())
        attacks = [json.loads(f.read_text()) for f in sorted(run.glob("attack_*.json"))]
        by_eps = {a["eps"]: a for r in attacks[:1] for a in r["attacks"]}
        eps += [e for e in by_eps if e not in eps]
        rows.append((run, metrics, by_eps))
    table = Table(title="clean dev accuracy and accuracy under k-PGD (cos(R, R^adv) in brackets)")
    for col in ["run", "method", "dev acc", *[f"ε={e:g}" for e in eps], "ex/s"]:
        table.add_column(col, justify="left" if col in ("run", "method") else "right")
    for run, m, by_eps in rows:
        cells = [f"{by_eps[e]['accuracy']:.4f} ({by_eps[e]['mean_cos']:.3f})" if e in by_eps else "–" for e in eps]
        table.add_row(str(run), m["method"], f"{m['dev']['accuracy']:.4f}", *cells, f"{m['examples_per_s']:.0f}")
    Console(width=200).print(table)


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
    if args.methods:
        protocol.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.datasets:
        protocol.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected a number or comma-separated integers") from None
        protocol.seeds = list(range(seeds[0])) if len(seeds) == 1 and "," not in args.seeds else seeds
    if not (protocol.methods and protocol.datasets and protocol.seeds):
        raise UserError("the grid is empty: give at least one method, dataset and seed")
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
    from carlrar.search import TABLE_8, search

    p = ArgumentParser(prog="carlrar search", description="Optuna search over the paper's Table 8 bounds "
                       "(γ, α, ε, n), objective dev accuracy, resumable (SQLite); other options as carlrar train",
                       add_help=False)
    p.add_argument("--study-dir", required=True, help="folder for study.db, one folder per trial, best.yaml")
    p.add_argument("--trials", type=int, default=20, help="completed + pruned trials to reach (default 20)")
    p.add_argument("--sampler", choices=["tpe", "grid"], default="tpe")
    p.add_argument("--params", default=",".join(TABLE_8), help=f"which to search (default {','.join(TABLE_8)})")
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
    print(f"best trial {best.number}: dev accuracy {best.value:.4f} with "
          + ", ".join(f"{k} {v:.4g}" for k, v in best.params.items()))
    print(f"best configuration written to {Path(args.study_dir) / 'best.yaml'} "
          f"(carlrar train --config {Path(args.study_dir) / 'best.yaml'})", file=sys.stderr)


def cmd_methods(argv: list[str]):
    from carlrar.methods import METHODS

    for name, cls in METHODS.items():
        print(f"{name:10s} {(cls.__doc__ or '').strip().splitlines()[0]}")


def _data_args(p: ArgumentParser):
    p.add_argument("--dataset", default="sst2", help="named dataset (default sst2)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-dir", help="folder with the dataset folders (default $CARLRAR_DATA_DIR, then the hub)")
    p.add_argument("--file", help="a labelled CSV/TSV/JSONL file instead of --dataset")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)


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
