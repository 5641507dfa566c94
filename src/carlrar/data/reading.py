"""Reading: files, named datasets and the hub → labelled splits of texts with a stable index.

Where data comes from, in order: ``--train-file/--dev-file/--test-file`` (generic CSV/TSV/JSONL), then a named
dataset from ``--data-dir`` or ``$CARLRAR_DATA_DIR`` (the layouts of ``shared/data``), then the Hugging Face hub.
Every training example keeps its position in the train split as ``index``: CARL's memory banks are rows by index.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from carlrar.errors import UserError

SPLITS = ("train", "dev", "test")
csv.field_size_limit(sys.maxsize)


@dataclass
class Split:
    """Texts and integer labels of one split; ``index[i]`` is example i's position in this split."""

    texts: list[str]
    labels: list[int]
    source: str

    def __len__(self):
        return len(self.texts)


@dataclass
class TextDataset:
    name: str
    label_names: list[str]
    splits: dict[str, Split] = field(default_factory=dict)
    unlabelled: dict[str, str] = field(default_factory=dict)  # split → file that has no label column
    missing: dict[str, str] = field(default_factory=dict)  # split → where its file was looked for

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raw = self.unlabelled.get(name)
            why = f" ({raw} has no labels)" if raw else f" ({self.missing.get(name, 'no such file')})"
            raise UserError(f"dataset {self.name!r} has no labelled {name!r} split{why}; "
                            f"available: {', '.join(self.splits)}")
        return self.splits[name]

    def split_for_model(self, name: str, model_labels: list[str]) -> Split:
        """Split ``name`` with label ids renumbered to a trained model's ``id2label`` order."""
        split = self.split(name)
        extra = sorted(set(self.label_names) - set(model_labels))
        if extra:
            raise UserError(f"dataset {self.name!r} has labels the model does not know: {', '.join(extra)}")
        remap = [model_labels.index(n) for n in self.label_names]
        return Split(split.texts, [remap[y] for y in split.labels], split.source)


# ---------------------------------------------------------------------------------------------------------------
# Named datasets: the layouts of shared/data (see its README) and their hub equivalents.


@dataclass(frozen=True)
class DatasetSpec:
    folder: str
    files: dict[str, tuple[str, ...]]  # split → candidate file names, first existing wins
    header: bool
    text_columns: tuple  # column names (header) or positions (headerless), joined with a space
    label_column: str | int
    labels: tuple[tuple[str, str], ...] = ()  # (raw value, name) in label-id order; empty → from train
    unescape_newlines: bool = False  # Yelp / Yahoo store newlines as a literal backslash-n
    hub: tuple = ()  # (path, config) for datasets.load_dataset


SENTIMENT = (("0", "negative"), ("1", "positive"))
DATASETS: dict[str, DatasetSpec] = {
    "sst2": DatasetSpec("sst2_glue", {"train": ("train.tsv",), "dev": ("dev.tsv",), "test": ("test.tsv",)},
                        True, ("sentence",), "label", SENTIMENT, hub=("glue", "sst2")),
    "sst2-sentence": DatasetSpec("sst2_sentence", {"train": ("train.tsv",), "dev": ("dev.tsv",),
                                                   "test": ("test.tsv",)},
                                 True, ("sentence",), "label", SENTIMENT),
    "agnews": DatasetSpec("ag_news", {"train": ("train.csv",), "dev": ("dev.csv",),
                                      "test": ("test.csv", "test_500_per_class.csv")},
                          False, (1, 2), 0, (("1", "World"), ("2", "Sports"), ("3", "Business"), ("4", "Sci/Tech")),
                          hub=("ag_news", None)),
    "yelp-p": DatasetSpec("yelp_polarity", {"train": ("train.csv", "train_first200.csv"), "dev": ("dev.csv",),
                                            "test": ("test.csv", "test_first20.csv")},
                          False, (1,), 0, (("1", "negative"), ("2", "positive")), unescape_newlines=True,
                          hub=("yelp_polarity", None)),
    "yahoo": DatasetSpec("yahoo_answers", {"train": ("train.csv", "train_2topics.csv"), "dev": ("dev.csv",),
                                           "test": ("test.csv", "test_2topics.csv")},
                         False, (0,), 1, unescape_newlines=True, hub=("yahoo_answers_topics", None)),
}
DEV_FRACTION_WHEN_MISSING = 0.1  # Yelp-P / Yahoo samples ship without dev: carve a seeded dev from train


def read_table(path: Path, header: bool | None = None) -> tuple[list[str] | None, list[tuple[int, list]]]:
    """Read CSV / TSV / JSONL rows as (line number, fields); JSONL rows are dicts. Errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # strip it here so error offsets count from the file start
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = raw[:at].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[at]:02x} at offset {at})") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    refuse_nul(path, text)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                if not isinstance(rows[-1][1], dict):
                    raise UserError(f"{path}:{n}: expected a JSON object, got {type(rows[-1][1]).__name__}")
        return None, rows
    tsv = path.suffix == ".tsv"
    reader = csv.reader(text.splitlines(), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows = [(n, r) for n, r in enumerate(reader, 1) if r]
    if header is None:
        header = True
    columns = [c.strip() for c in rows.pop(0)[1]] if header else None
    for i, name in enumerate(columns or []):
        if name in columns[:i]:  # which one would be read is a guess: refuse it
            raise UserError(f"{path}:1: column {name!r} appears twice (columns {columns.index(name) + 1} and {i + 1})")
    if header and not rows:
        raise UserError(f"{path}: file has a header but no rows")
    return columns, rows


def refuse_nul(path, text: str):
    """A NUL byte is never text: a binary or corrupted file. Named by line and column."""
    at = text.find("\0")
    if at >= 0:
        line_start = text.rfind("\n", 0, at) + 1
        raise UserError(f"{path}:{text.count(chr(10), 0, at) + 1}: NUL byte at column {at - line_start + 1} "
                        "(a binary or corrupted file?)")


def read_examples(path: Path, text_columns, label_column, header: bool | None = None,
                  unescape_newlines: bool = False, need_labels: bool = True) -> tuple[list[str], list[str]]:
    """Texts and raw label strings from one file. Rows with empty text are dropped with a one-line warning."""
    columns, rows = read_table(path, header)

    def position(col):
        if columns is None or isinstance(col, int):
            return col
        if col not in columns:
            raise UserError(f"{path}: no column {col!r} (columns: {', '.join(columns)})")
        return columns.index(col)

    texts, labels, empty = [], [], []
    if columns is None and rows and isinstance(rows[0][1], dict):  # JSONL: every row an object with every key
        for n, row in rows:
            for col in list(text_columns) + ([label_column] if need_labels else []):
                if col not in row:
                    raise UserError(f"{path}:{n}: no key {col!r} (keys: {', '.join(row)})")
        get = lambda r, c: r.get(c)  # noqa: E731
    else:
        text_columns = [position(c) for c in text_columns]
        label_column = position(label_column) if need_labels else None
        get = lambda r, c: r[c] if c < len(r) else None  # noqa: E731
    for n, row in rows:
        parts = [get(row, c) for c in text_columns]
        if any(p is None for p in parts) or (need_labels and get(row, label_column) is None):
            raise UserError(f"{path}:{n}: row has too few fields")
        text = " ".join(str(p).strip() for p in parts).strip()
        if unescape_newlines:
            text = text.replace("\\n", " ").strip()
        if not text:
            empty.append(n)
            continue
        texts.append(text)
        label = str(get(row, label_column)).strip() if need_labels else ""
        if need_labels and not label:
            raise UserError(f"{path}:{n}: empty label")
        labels.append(label)
    if empty:
        print(f"warning: {path}: dropped {len(empty)} row(s) with empty text (line {', '.join(map(str, empty[:5]))}"
              f"{', ...' if len(empty) > 5 else ''})", file=sys.stderr)
    if not texts:
        raise UserError(f"{path}: no rows with text")
    return texts, labels


def label_map_from(raw_labels: list[str], fixed: tuple = ()) -> tuple[list[str], dict[str, int]]:
    """Label names in id order and raw value → id. Integer-like labels sort numerically, names alphabetically."""
    if fixed:
        return [name for _, name in fixed], {raw: i for i, (raw, _) in enumerate(fixed)}
    values = sorted(set(raw_labels), key=lambda v: (0, int(v), v) if v.lstrip("-").isdigit() else (1, 0, v))
    return values, {v: i for i, v in enumerate(values)}


def encode_labels(raw: list[str], to_id: dict[str, int], where: str) -> list[int]:
    unknown = sorted(set(raw) - set(to_id))
    if unknown:
        raise UserError(f"{where}: unknown label(s) {', '.join(map(repr, unknown[:5]))} "
                        f"(known: {', '.join(map(repr, to_id))})")
    return [to_id[r] for r in raw]


def check_train(raw_labels: list[str], source, names: dict[str, str] | None = None) -> list[str]:
    """Train needs two classes; checked before dev / test labels so the message names the real problem."""
    if len(set(raw_labels)) < 2:
        only = (names or {}).get(raw_labels[0], raw_labels[0])
        raise UserError(f"{source}: only one class ({only!r}) in train; a classifier needs at least two")
    return raw_labels


def carve_dev(texts, labels, seed: int = 0):
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, int(len(order) * DEV_FRACTION_WHEN_MISSING))
    dev, train = sorted(order[:n_dev]), sorted(order[n_dev:])
    pick = lambda idx, xs: [xs[i] for i in idx]  # noqa: E731
    return (pick(train, texts), pick(train, labels)), (pick(dev, texts), pick(dev, labels))


def load_files(train_file, dev_file=None, test_file=None, text_column="text", label_column="label",
               name="files") -> TextDataset:
    """Generic CSV/TSV (with header) or JSONL files. Without a dev file, 10% of train (seeded) becomes dev."""
    files = {"train": train_file, "dev": dev_file, "test": test_file}
    if not train_file:
        raise UserError("--train-file is required when no --dataset is given")
    read = {s: read_examples(Path(f), [text_column], label_column) for s, f in files.items() if f}
    names, to_id = label_map_from(check_train(read["train"][1], train_file))
    if "dev" not in read:
        read["train"], read["dev"] = carve_dev(*read["train"])
        files["dev"] = f"{train_file} (seeded 10% held out)"
    ds = TextDataset(name, names)
    for split, (texts, raw) in read.items():
        ds.splits[split] = Split(texts, encode_labels(raw, to_id, str(files[split])), str(files[split]))
    return ds


def load_named(name: str, data_dir: str | None = None) -> TextDataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)}; or pass --train-file)")
    spec = DATASETS[name]
    root = data_dir or os.environ.get("CARLRAR_DATA_DIR")
    folder = Path(root) / spec.folder if root else None
    if folder is not None and folder.is_dir():
        return _load_local(name, spec, folder)
    return _load_hub(name, spec, folder)


def _load_local(name: str, spec: DatasetSpec, folder: Path) -> TextDataset:
    found = {s: next((folder / f for f in spec.files[s] if (folder / f).is_file()), None) for s in SPLITS}
    if found["train"] is None:
        raise UserError(f"{folder}: no train file (looked for {', '.join(spec.files['train'])})")
    read, unlabelled = {}, {}
    for split, path in found.items():
        if path is None:
            continue
        if spec.header and split == "test" and spec.label_column not in read_table(path, True)[0]:
            unlabelled[split] = str(path)  # the GLUE SST-2 test split ships without labels
            continue
        read[split] = read_examples(path, spec.text_columns, spec.label_column, spec.header, spec.unescape_newlines)
    names, to_id = label_map_from(check_train(read["train"][1], found["train"], dict(spec.labels)),
                                  spec.labels)
    sources = {s: str(p) for s, p in found.items() if p}
    if "dev" not in read:
        read["train"], read["dev"] = carve_dev(*read["train"])
        sources["dev"] = f"{found['train']} (seeded 10% held out)"
    missing = {s: f"no {' or '.join(spec.files[s])} in {folder}" for s, p in found.items() if p is None}
    ds = TextDataset(name, names, unlabelled=unlabelled, missing=missing)
    for split, (texts, raw) in read.items():
        ds.splits[split] = Split(texts, encode_labels(raw, to_id, sources[split]), sources[split])
    return ds


# The paper's subset sizes per class (train, dev, test); None = the full split.
HUB_SUBSETS = {"agnews": (15000, 500, 500), "yelp-p": (30000, 1000, 1000), "yahoo": (12000, 400, 400)}
YAHOO_TOPICS = 5  # the paper uses 5 of the 10 topics; we take topic ids 0-4


def _load_hub(name: str, spec: DatasetSpec, looked_in: Path | None) -> TextDataset:
    where = f"{looked_in} does not exist" if looked_in else "CARLRAR_DATA_DIR is not set"
    hint = (f"no local copy of {name!r} ({where}) and the Hugging Face hub is unreachable; "
            f"point --data-dir or CARLRAR_DATA_DIR at a folder holding {spec.folder}/")
    if not spec.hub or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(hint)
    try:
        import datasets

        hub = datasets.load_dataset(*[p for p in spec.hub if p])
    except Exception as e:  # any network / hub failure is the same user-facing problem
        raise UserError(f"{hint} ({type(e).__name__})") from None
    text_key = {"sst2": "sentence", "yelp-p": "text", "agnews": "text"}.get(name)
    if name == "yahoo":
        names = hub["train"].features["topic"].names[:YAHOO_TOPICS]
        cols = lambda d: ([" ".join([a, b, c]) for a, b, c in  # noqa: E731
                           zip(d["question_title"], d["question_content"], d["best_answer"])], d["topic"])
    else:
        names = hub["train"].features["label"].names
        cols = lambda d: (d[text_key], d["label"])  # noqa: E731
    ds = TextDataset(name, [spec.labels[i][1] if spec.labels else n for i, n in enumerate(names)])
    if name == "sst2":
        for split, hub_split in (("train", "train"), ("dev", "validation")):
            texts, labels = cols(hub[hub_split])
            ds.splits[split] = Split([t.strip() for t in texts], list(labels), f"hub:glue/sst2/{hub_split}")
        return ds
    n_train, n_dev, n_test = HUB_SUBSETS[name]
    rng = random.Random(0)
    train_pool, test_pool = cols(hub["train"]), cols(hub["test"])
    for split, pool, counts in (("train", train_pool, (n_train, n_dev)), ("test", test_pool, (n_test,))):
        by_label = {c: [i for i, y in enumerate(pool[1]) if y == c] for c in range(len(names))}
        for c in by_label:
            rng.shuffle(by_label[c])
        start = 0
        for part, n in zip((split, "dev") if split == "train" else (split,), counts):
            idx = sorted(i for c in by_label for i in by_label[c][start:start + n])
            rng.shuffle(idx)
            ds.splits[part] = Split([pool[0][i].replace("\\n", " ").strip() for i in idx],
                                    [pool[1][i] for i in idx], f"hub:{spec.hub[0]}/{split} (seeded subset)")
            start += n
    return ds


def load_dataset(dataset: str | None = None, data_dir: str | None = None, train_file=None, dev_file=None,
                 test_file=None, text_column="text", label_column="label") -> TextDataset:
    if train_file or not dataset:
        return load_files(train_file, dev_file, test_file, text_column, label_column)
    return load_named(dataset, data_dir)


def subset(split: Split, n: int | None, seed: int) -> Split:
    """A seeded random subset of n examples (indices are re-numbered 0..n-1)."""
    if not n or n >= len(split):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split)), n))
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx], f"{split.source} (seeded {n})")


def carve_validation(split: Split, n: int, seed: int = 0) -> tuple[Split, Split]:
    """(validation, rest): a seeded random n examples of a training split set aside for model selection, so that
    dev is only ever reported. Seed 0 by default: every run of a comparison chooses on the same examples."""
    if n >= len(split):
        raise UserError(f"validation_size = {n}: the training split has only {len(split)} examples")
    chosen = set(random.Random(seed).sample(range(len(split)), n))
    pick = lambda keep: Split([t for i, t in enumerate(split.texts) if (i in chosen) == keep],  # noqa: E731
                              [y for i, y in enumerate(split.labels) if (i in chosen) == keep],
                              f"{split.source} ({'validation' if keep else 'without validation'} {n})")
    return pick(True), pick(False)


def read_labelled_file(path: str, text_column: str, label_column: str, model_labels: list[str]) -> Split:
    """A labelled file for a trained model: labels given as the model's label names, or else as its label ids."""
    texts, raw = read_examples(Path(path), [text_column], label_column)
    to_id = {n: i for i, n in enumerate(model_labels)}
    if not set(raw) <= set(to_id) and all(r.isdigit() and int(r) < len(model_labels) for r in raw):
        to_id = {str(i): i for i in range(len(model_labels))}  # labels given as ids
    return Split(texts, encode_labels(raw, to_id, path), path)


def read_texts(path: str | None, text_column: str = "text") -> list[str]:
    """Texts to label: a column of a CSV/TSV/JSONL file, else one text per non-empty line of a file (or stdin)."""
    if path and Path(path).suffix in (".csv", ".tsv", ".jsonl"):
        texts, _ = read_examples(Path(path), [text_column], None, need_labels=False)
    else:
        try:
            raw = Path(path).read_text(encoding="utf-8") if path else sys.stdin.read()
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except UnicodeDecodeError:
            raise UserError(f"{path or 'stdin'}: not valid UTF-8") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        refuse_nul(path or "stdin", raw)
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise UserError(f"{path or 'stdin'}: no text to predict")
    return texts
