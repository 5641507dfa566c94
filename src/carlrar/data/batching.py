"""Batching: a split tokenised once, padded per batch, and batches grouped by length.

Training draws length-grouped batches from ``LengthGroupedBatchSampler`` (deterministic given seed and epoch, the
same global batches on every process); evaluation sorts by length (``eval_batches``) and restores order by index.
"""

from __future__ import annotations

import random

import torch

from carlrar.data.reading import Split


class EncodedSplit(torch.utils.data.Dataset):
    """Token ids of a split, tokenised once; items carry label and dataset index."""

    def __init__(self, split: Split, tokenizer, max_length: int):
        enc = tokenizer(split.texts, truncation=True, max_length=max_length)
        self.texts = split.texts
        self.input_ids = enc["input_ids"]
        self.labels = split.labels
        self.lengths = [len(ids) for ids in self.input_ids]

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "label": self.labels[i], "index": i}


class Collator:
    """Pad a list of items to the longest in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            mask[row, : len(it["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([it["label"] for it in items]),
                "index": torch.tensor([it["index"] for it in items])}


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length: shuffle, sort within chunks of ``chunk_batches`` batches, shuffle batch order.

    With ``group_by_length=False`` it is plain shuffled batching. Deterministic given (seed, epoch). With several
    processes every one draws the same global batches and keeps its slice ``batch[rank::num_replicas]``, so the
    global batch does not depend on the number of processes. ``start`` skips batches already done (resume).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 shuffle: bool = True, chunk_batches: int = 100, rank: int = 0, num_replicas: int = 1):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length, self.shuffle, self.chunk_batches = group_by_length, shuffle, chunk_batches
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        full, tail = divmod(len(self.lengths), self.batch_size)
        return full + (1 if tail >= self.num_replicas or (tail and not full) else 0)

    def global_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            chunk = self.batch_size * self.chunk_batches
            order = [i for s in range(0, len(order), chunk)
                     for i in sorted(order[s:s + chunk], key=lambda i: -self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.num_replicas:  # a process would get no rows
            batches[-2:] = [batches[-2] + batches[-1]]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter([b[self.rank::self.num_replicas] for b in self.global_batches()[self.start:]])


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches sorted by length (no training signal, just less padding); order is restored by index."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
