"""Clean evaluation: accuracy, macro-F1, per-class accuracy, confusion matrix; and prediction on raw text.

``load_model_and_split`` is the common start of ``carlrar evaluate / attack / generate``: a trained model and one
split with its labels in the model's order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from carlrar.data import (Collator, EncodedSplit, carve_validation, eval_batches, load_dataset, read_labelled_file,
                          subset)


@torch.no_grad()
def predict_logits(model, encoded: EncodedSplit, pad_token_id: int, batch_size: int = 128,
                   progress: str | None = None) -> torch.Tensor:
    """Logits for every example of ``encoded``, in dataset order (batches are sorted by length for speed)."""
    was_training = model.training
    model.eval()
    collate = Collator(pad_token_id)
    logits = torch.empty(len(encoded), model.config.num_labels)
    batches = eval_batches(encoded.lengths, batch_size)
    for idx in tqdm(batches, desc=progress, disable=progress is None or not sys.stderr.isatty(), leave=False):
        batch = collate([encoded[i] for i in idx])
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        logits[batch["index"]] = model(ids, mask).logits.float().cpu()
    model.train(was_training)
    return logits


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (len(texts) × labels) for raw texts, in input order."""
    was_training = model.training
    model.eval()
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    probs = torch.empty(len(texts), model.config.num_labels)
    collate = Collator(tokenizer.pad_token_id)
    for idx in eval_batches([len(x) for x in ids], batch_size):
        batch = collate([{"input_ids": ids[i], "label": 0, "index": i} for i in idx])
        inputs = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        probs[batch["index"]] = model(*inputs).logits.float().softmax(-1).cpu()
    model.train(was_training)
    return probs


def predictions(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 64) -> list[dict]:
    """Per text: the predicted label and every label's probability (6 decimals), as ``carlrar predict`` writes."""
    from carlrar.models import label_names

    probs = predict_texts(model, tokenizer, texts, max_length, batch_size)
    names = label_names(model)
    return [{"text": t, "label": names[int(p.argmax())],
             "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}} for t, p in zip(texts, probs)]


def load_model_and_split(model_dir: str, dataset: str | None = "sst2", split: str = "dev",
                         data_dir: str | None = None, file: str | None = None, text_column: str = "text",
                         label_column: str = "label", max_length: int = 128, limit: int | None = None,
                         seed: int = 0):
    """The trained model, its tokenizer, its label names and the requested split (``file``, else ``split`` of
    ``dataset``; a seeded ``limit`` subset), encoded, with labels mapped onto the model's."""
    from carlrar.models import check_max_length, label_names, load_tokenizer, load_trained

    carve = validation_size_of(model_dir, dataset, file) if split == "validation" else None
    ds = None if file else load_dataset(dataset, data_dir)  # bad data fails before the model loads
    if ds is not None:
        ds.split("train" if carve else split)
    model = load_trained(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    check_max_length(model, tokenizer, max_length)
    names = label_names(model)
    if file:
        data = read_labelled_file(file, text_column, label_column, names)
    elif carve:  # the examples the run chose its checkpoint on: carved from train exactly as training carved them
        data = carve_validation(ds.split_for_model("train", names), carve)[0]
    else:
        data = ds.split_for_model(split, names)
    return model, tokenizer, names, EncodedSplit(subset(data, limit, seed), tokenizer, max_length)


def validation_size_of(model_dir: str, dataset: str | None, file: str | None) -> int:
    """How many training examples ``model_dir``'s run set aside as its validation split (``--split validation``:
    the split its checkpoint was chosen on), from its carlrar_config.yaml; one-line errors when it has none."""
    from carlrar.checkpoint import yaml_load
    from carlrar.errors import UserError

    if file:
        raise UserError("--split validation is carved from a named dataset's training split, not from --file")
    config_file = Path(model_dir) / "carlrar_config.yaml"
    saved = yaml_load(config_file) if config_file.is_file() else {}
    if not saved.get("validation_size"):
        raise UserError(f"--split validation: {model_dir} has no carlrar_config.yaml with a validation_size (it "
                        "was not trained by carlrar train --validation_size N)")
    if saved.get("train_file") or saved.get("dataset") != dataset:
        raise UserError(f"--split validation: {model_dir} was trained on "
                        f"{saved.get('train_file') or saved.get('dataset')!r}, not on --dataset {dataset!r}")
    return int(saved["validation_size"])


def classification_metrics(preds: list[int], labels: list[int], label_names: list[str]) -> dict:
    """Accuracy, macro-F1 (mean of per-class F1, 0 where undefined), per-class accuracy (= recall), confusion.

    ``confusion[i][j]`` counts examples of gold class i predicted as j.
    """
    k = len(label_names)
    confusion = [[0] * k for _ in range(k)]
    for p, y in zip(preds, labels):
        confusion[y][p] += 1
    f1s, per_class = [], {}
    for c in range(k):
        tp = confusion[c][c]
        gold = sum(confusion[c])
        predicted = sum(confusion[r][c] for r in range(k))
        precision = tp / predicted if predicted else 0.0
        recall = tp / gold if gold else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        per_class[label_names[c]] = recall if gold else None
    n = len(labels)
    return {"accuracy": sum(confusion[c][c] for c in range(k)) / n if n else 0.0,
            "macro_f1": sum(f1s) / k, "per_class_accuracy": per_class, "confusion": confusion, "n": n}


def evaluate_split(model, encoded: EncodedSplit, label_names: list[str], pad_token_id: int,
                   batch_size: int = 128, progress: str | None = None) -> dict:
    logits = predict_logits(model, encoded, pad_token_id, batch_size, progress)
    preds = logits.argmax(-1).tolist()
    metrics = classification_metrics(preds, list(encoded.labels), label_names)
    metrics["loss"] = torch.nn.functional.cross_entropy(logits, torch.tensor(encoded.labels)).item()
    return metrics


def print_metrics(metrics: dict, label_names: list[str], title: str):
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("examples", str(metrics["n"]))
    table.add_row("accuracy", f"{metrics['accuracy']:.4f}")
    table.add_row("macro-F1", f"{metrics['macro_f1']:.4f}")
    for name, acc in metrics["per_class_accuracy"].items():
        table.add_row(f"accuracy ({escape(name)})", "–" if acc is None else f"{acc:.4f}")
    console.print(table)
    confusion = Table(title="confusion (rows: gold, columns: predicted)")
    confusion.add_column("")
    for name in label_names:
        confusion.add_column(escape(name), justify="right")
    for name, row in zip(label_names, metrics["confusion"]):
        confusion.add_row(escape(name), *map(str, row))
    console.print(confusion)
