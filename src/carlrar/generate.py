"""Text-form adversarial samples from RAR's reconstructor (the paper's Table 6), and how often they transfer.

Each example is attacked with k-PGD on its word embeddings; the reconstructor's argmax at every real position of
the adversarial token states is decoded into text. The paper shows six such samples; we also measure how often a
generated text fools a separate ``target`` model (e.g. plain fine-tuning) that was right on the original.
``write_samples`` stores them (JSONL or CSV, with a summary beside); ``augment`` turns them into a training file.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from carlrar.attack import pgd_attack
from carlrar.data import Collator, EncodedSplit, eval_batches
from carlrar.errors import UserError
from carlrar.evaluate import predict_texts
from carlrar.ownership import json_text, write_whole


@torch.no_grad()
def reconstruct(model, input_ids, attention_mask, delta) -> torch.Tensor:
    """The reconstructor's argmax ids (B × len) on the token states of E + δ."""
    out = model(input_ids, attention_mask, delta=delta)
    return model.heads["reconstructor"](out.token_states).argmax(-1)


def generate_split(model, tokenizer, encoded: EncodedSplit, texts: list[str], label_names: list[str],
                   eps: float, steps: int, step_size: float | None = None, norm: str = "l2", batch_size: int = 64,
                   target=None, target_tokenizer=None, max_length: int = 128, progress: bool = True) -> list[dict]:
    """One record per example: original and generated text, gold label, token edit rate, predictions of the RAR
    model (and of ``target``) on both texts."""
    if "reconstructor" not in model.heads:
        raise UserError("this model has no reconstructor: train it with --method rar or carl-rar")
    model.eval()
    collate = Collator(tokenizer.pad_token_id)
    generated, edit_rate = [None] * len(encoded), [0.0] * len(encoded)
    batches = eval_batches(encoded.lengths, batch_size)
    for idx in tqdm(batches, desc="generate", disable=not (progress and sys.stderr.isatty()), leave=False):
        b = {k: v.to(model.device) for k, v in collate([encoded[i] for i in idx]).items()}
        ids, mask = b["input_ids"], b["attention_mask"]
        delta = pgd_attack(model, ids, mask, b["labels"], eps, steps, step_size or max(eps, 1e-12) / 4, norm)
        new = reconstruct(model, ids, mask, delta)
        for row, i in enumerate(b["index"].tolist()):
            n = int(mask[row].sum())
            generated[i] = tokenizer.decode(new[row, :n].tolist(), skip_special_tokens=True)
            edit_rate[i] = (new[row, :n] != ids[row, :n]).float().mean().item()
    originals = [tokenizer.decode(encoded.input_ids[i], skip_special_tokens=True) for i in range(len(encoded))]
    records = [{"text": texts[i], "original_decoded": originals[i], "generated": generated[i],
                "label": label_names[encoded.labels[i]], "edit_rate": round(edit_rate[i], 4),
                "changed": generated[i] != originals[i]} for i in range(len(encoded))]
    judges = [("model", model, tokenizer)] + ([("target", target, target_tokenizer)] if target is not None else [])
    for name, judge, tok in judges:
        names = [judge.config.id2label[k] for k in range(judge.config.num_labels)]
        # the decoded original, not the raw text: both sides then went through the same decode (case, spacing)
        for field, column in (("original", originals), ("generated", generated)):
            preds = predict_texts(judge, tok, column, max_length).argmax(-1).tolist()
            for r, p in zip(records, preds):
                r[f"{name}_on_{field}"] = names[p]
    return records


def summarize(records: list[dict], max_edit_rate: float | None = None) -> dict:
    """Fraction changed, mean token edit rate and — with a target — the transfer success rate: among the kept
    samples whose (decoded) original the target got right, the fraction whose generated text it gets wrong; an
    unchanged sample counts as not fooling it."""
    kept = [r for r in records if max_edit_rate is None or r["edit_rate"] <= max_edit_rate]
    out = {"n": len(records), "kept": len(kept),
           "changed": sum(r["changed"] for r in kept) / max(len(kept), 1),
           "mean_edit_rate": sum(r["edit_rate"] for r in kept) / max(len(kept), 1)}
    for judge in ("model", "target"):
        if kept and f"{judge}_on_original" in kept[0]:
            right = [r for r in kept if r[f"{judge}_on_original"] == r["label"]]
            fooled = [r for r in right if r["changed"] and r[f"{judge}_on_generated"] != r["label"]]
            out[f"{judge}_fooled"] = len(fooled) / max(len(right), 1)
    if "target_fooled" in out:
        out["transfer_success_rate"] = out.pop("target_fooled")
    return out


def write_samples(records: list[dict], out: Path, summary: dict) -> Path:
    """Samples as JSONL (or CSV when ``out`` ends in .csv), and ``summary`` as OUT_summary.json beside them; each
    file written whole or not at all."""
    out = Path(out)
    if out.suffix == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["text"])
        writer.writeheader()
        writer.writerows(records)
        write_whole(out, buffer.getvalue())
    else:
        write_whole(out, "".join(json_text(r) + "\n" for r in records))
    summary_file = out.with_name(out.stem + "_summary.json")
    write_whole(summary_file, json_text(summary, indent=2))
    return summary_file


def print_samples(records: list[dict], n: int = 5):
    for r in records[:n]:
        print(f"[{r['label']}] {r['original_decoded']}\n   → {r['generated']}  (edit rate {r['edit_rate']:.2f})")


SAMPLE_KEYS = ("text", "generated", "label", "edit_rate", "changed")  # what augment reads of each sample


def read_samples(path: Path) -> list[dict]:
    """The JSONL of ``carlrar generate``; anything else is a one-line user error naming the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a JSONL file written by carlrar generate") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: not a JSONL file written by carlrar generate") from None
        if not isinstance(record, dict) or not {"generated", "label"} <= set(record):
            raise UserError(f"{path}: no samples with 'generated' and 'label' fields")
        missing = [k for k in SAMPLE_KEYS if k not in record]
        if missing:
            raise UserError(f"{path}:{n}: sample has no {missing[0]!r} (a line of carlrar generate has "
                            f"{', '.join(SAMPLE_KEYS)})")
        records.append(record)
    if not records:
        raise UserError(f"{path}: no samples with 'generated' and 'label' fields")
    return records


def augment(samples: Path, output: Path, with_originals: bool = False,
            max_edit_rate: float | None = None) -> tuple[int, int]:
    """A training TSV (header text, label; usable with --train-file) from generated samples: the changed, non-empty
    generated texts within ``max_edit_rate``, then with ``with_originals`` every original text.
    Returns (rows written, generated rows)."""
    records = read_samples(samples)
    keep = [r for r in records if r["changed"] and r["generated"].split()
            and (max_edit_rate is None or r["edit_rate"] <= max_edit_rate)]
    clean = lambda t: " ".join(t.replace("\t", " ").split())  # noqa: E731  (TSV: no tabs or newlines)
    rows = [(clean(r["generated"]), r["label"]) for r in keep]
    rows += [(clean(r["text"]), r["label"]) for r in records] if with_originals else []
    write_whole(Path(output), "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return len(rows), len(keep)
